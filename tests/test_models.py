"""Tokenizer training, the T5 and causal-LM factories, saving/loading either family, vocabulary and pad-token checks
and default model sizes."""

import copy
import dataclasses
import time

import pytest
import torch
from transformers import AutoTokenizer

from tw_rl.config import ArchConfig, ConfigError, load_config
from tw_rl.models import factory
from tw_rl.models.factory import ModelNotAvailableError, build_causal, build_model, build_t5, check_buildable, \
    check_shared_vocab, count_parameters, load_model, load_seq2seq, save_model
from tw_rl.models.family import forced, is_causal
from tw_rl.models.tokenizer import budget_prompt_texts, train_tokenizer

TEXTS = ["ka lo mi", "ba lo", "ka ba mi lo", "mi mi ka", "lorenamo ka", "tibarelu ba mi"] * 20
TINY = ArchConfig(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 80, extra_texts=budget_prompt_texts("teacher budget {pct}%: "))


def test_tokenizer_t5_conventions(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tok("ka lo mi")["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1  # eos appended once
    assert tok.decode(ids, skip_special_tokens=True) == "ka lo mi"
    assert tok.convert_ids_to_tokens(tok("ka q")["input_ids"])[-2] == "<unk>"  # unseen character


def test_budget_prompts_are_compact(tok):
    prompts = budget_prompt_texts("teacher budget {pct}%: ")
    assert len(prompts) == 101 and prompts[20] == "teacher budget 20%: "
    # "teacher budget 100%: " is 21 characters
    assert max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) <= 8


def test_tokenizer_round_trip_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    samples = TEXTS[:6] + budget_prompt_texts("teacher budget {pct}%: ")[::7] + ["teacher budget 20%: ka lo mi", "zz"]
    assert [tok(s)["input_ids"] for s in samples] == [again(s)["input_ids"] for s in samples]
    assert len(again) == len(tok) and again.pad_token_id == 0 and again.eos_token_id == 1
    batch_a = tok(samples, padding=True, return_tensors="pt")
    batch_b = again(samples, padding=True, return_tensors="pt")
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])


def test_build_save_load_identical_logits(tok, tmp_path):
    model = build_t5(TINY, tok, seed=3).eval()
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (0, 1, 0)
    assert build_t5(TINY, tok, seed=3).shared.weight.equal(model.shared.weight)  # seeded
    assert not build_t5(TINY, tok, seed=4).shared.weight.equal(model.shared.weight)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, tok2 = load_model(str(tmp_path / "m"))
    batch = tok(["ka lo mi", "ba"], padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 6], [0, 7, 1]])
    with torch.no_grad():
        a = model(**batch, decoder_input_ids=dec).logits
        b = loaded(**batch, decoder_input_ids=dec).logits
    assert torch.equal(a, b)
    check_shared_vocab(tok, tok2)


def test_check_shared_vocab_names_sizes_and_first_difference(tok):
    other = train_tokenizer(TEXTS + ["zuzu zuzu zuzu"] * 30, 90)
    with pytest.raises(ValueError, match=rf"teacher has {len(tok)} tokens, student has {len(other)}.*first "
                                         rf"difference at id \d+"):
        check_shared_vocab(tok, other)
    check_shared_vocab(tok, tok)


def test_load_hub_name_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match=r"not available offline.*local directory"):
        load_model("google/flan-t5-small")
    assert time.perf_counter() - t0 < 10


def test_load_missing_directory_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="empty"):
        load_model(str(tmp_path / "empty"))


CAUSAL_TINY = ArchConfig(d_model=16, d_ff=40, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_build_causal_sizes_ids_tied_and_seeded(tok, kind):
    arch = dataclasses.replace(CAUSAL_TINY, model_type=kind)
    rng = torch.get_rng_state()
    model = build_causal(arch, tok, seed=3, max_positions=48)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    c = model.config
    assert is_causal(model) and c.model_type == kind and c.vocab_size == len(tok)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (16, 2, 2)
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (0, 1, 1)  # no BOS in the task's tokenizer: its EOS
    assert c.max_position_embeddings == 48
    first = model.transformer.h[0] if kind == "gpt2" else model.model.layers[0]
    if kind == "gpt2":  # GPT-2: d_ff is its inner size, positions are learned
        assert first.mlp.c_fc.weight.shape == (16, 40) and model.transformer.wpe.weight.shape == (48, 16)
    else:  # d_kv is the head size: q projects to num_heads · d_kv
        assert first.mlp.gate_proj.weight.shape == (40, 16) and c.head_dim == 8
        assert first.self_attn.q_proj.weight.shape == (2 * 8, 16) and first.self_attn.k_proj.weight.shape == (16, 16)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as the T5s
    same = build_model(arch, tok, seed=3, max_positions=48)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    other = build_causal(arch, tok, seed=4, max_positions=48)
    assert not torch.equal(other.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with_head = dataclasses.replace(arch, d_kv=16)  # a head size of its own changes Llama and Qwen2 only
    if kind != "gpt2":
        q = build_causal(with_head, tok, 0, 48).model.layers[0].self_attn.q_proj.weight
        assert q.shape == (2 * 16, 16)


def test_build_model_dispatches_and_leaves_t5_as_it_was(tok):
    assert torch.equal(build_model(TINY, tok, 5, 64).shared.weight, build_t5(TINY, tok, 5).shared.weight)
    assert dataclasses.asdict(TINY)["model_type"] == "t5"


def test_sizes_a_kind_cannot_take_are_config_errors_naming_the_key(tok):
    gpt2 = dataclasses.replace(CAUSAL_TINY, model_type="gpt2", d_kv=4)  # GPT-2's head is d_model / num_heads = 8
    with pytest.raises(ConfigError, match=r"gpt2.*set arch\.d_kv=8"):
        check_buildable(gpt2, tok, 64)
    with pytest.raises(ConfigError, match=r"d_model=15 is not a multiple of num_heads=2"):
        build_causal(dataclasses.replace(CAUSAL_TINY, model_type="llama", d_model=15), tok, 0, 64)
    check_buildable(dataclasses.replace(CAUSAL_TINY, model_type="qwen2"), tok, 64)
    check_buildable(TINY, tok, 64)


def _without_pad(tok):
    """The same vocabulary, no pad token."""
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    return bare


def test_a_causal_lm_without_a_pad_token_is_refused_with_the_fix(tok, tmp_path, monkeypatch):
    bare = _without_pad(tok)
    assert bare.pad_token_id is None and bare.get_vocab() == tok.get_vocab()
    llama = dataclasses.replace(CAUSAL_TINY, model_type="llama")
    with pytest.raises(ModelNotAvailableError, match=r"building a llama model: .*has no pad token.*tok\.pad_token ="):
        check_buildable(llama, bare, 64)
    with pytest.raises(ModelNotAvailableError, match="has no pad token"):
        build_causal(llama, bare, 0, 64)
    with pytest.raises(ConfigError, match="no pad or no eos token"):  # a T5 cannot be built without one either
        check_buildable(TINY, bare, 64)
    save_model(build_causal(llama, tok, 0, 64), bare, tmp_path / "nopad")
    monkeypatch.setattr(factory, "load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ModelNotAvailableError, match=r"nopad: the tokenizer .* has no pad token.*name_or_path"):
        load_model(str(tmp_path / "nopad"))


def test_load_model_round_trips_a_causal_lm(tok, tmp_path):
    """A saved causal LM loads as one (AutoModelForCausalLM by its own config, not refused as it once was), with the
    same logits; the old name load_seq2seq loads it too."""
    model = build_causal(dataclasses.replace(CAUSAL_TINY, model_type="qwen2"), tok, 1, 64).eval()
    save_model(model, tok, tmp_path / "qwen2")
    loaded, tok2 = load_model(str(tmp_path / "qwen2"))
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    check_shared_vocab(tok, tok2)
    ids, mask = tok(["ka lo mi", "ba"], padding=True, return_tensors="pt").values()
    dec = torch.tensor([[0, 5, 6], [0, 7, 1]])
    with torch.no_grad():
        a = forced(model, ids, mask.bool(), dec_ids=dec).logits
        b = forced(loaded, ids, mask.bool(), dec_ids=dec).logits
    assert torch.equal(a, b)
    assert type(load_seq2seq(str(tmp_path / "qwen2"))[0]).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ModelNotAvailableError, match=r"could not load a model .* from the directory .*gone"):
        (tmp_path / "gone").mkdir()
        load_model(str(tmp_path / "gone"))


class _VocabOnly:
    """What build_t5 reads from a tokenizer: its size and the pad/eos ids."""

    def __init__(self, n):
        self.n, self.pad_token_id, self.eos_token_id = n, 0, 1

    def __len__(self):
        return self.n


def test_default_teacher_is_at_least_10x_the_student():
    cfg = load_config(None, [])
    fake = _VocabOnly(cfg.tokenizer.vocab_size)
    teacher = count_parameters(build_t5(cfg.teacher.arch, fake, 0))
    student = count_parameters(build_t5(cfg.student.arch, fake, 0))
    assert teacher >= 10 * student
    # tied embeddings are counted once
    m = build_t5(TINY, fake, 0)
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    assert m.lm_head.weight is m.shared.weight


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_the_teacher_server_loads_either_family_from_a_directory(tok, tmp_path, kind):
    """TeacherServer(model_dir) builds its Teacher from a seq2seq model or a causal LM by the directory's config, and
    answers as a Teacher on the saved model does."""
    import asyncio

    from tw_rl.teacher import Teacher
    from tw_rl.teacher_server import TeacherServer

    arch = TINY if kind == "t5" else dataclasses.replace(CAUSAL_TINY, model_type=kind)
    model = build_model(arch, tok, 2, 64).eval()
    save_model(model, tok, tmp_path / kind)
    server = TeacherServer(tmp_path / kind, vocab_size=len(tok))
    assert type(server.teacher.model) is type(model) and not server.teacher.model.training
    src, prefixes = [[5, 6, 1], [7, 1]], [[8], []]
    got = asyncio.run(server.next_tokens(src, prefixes))
    want = Teacher(model, vocab_size=len(tok)).next_tokens(src, prefixes)
    assert got[0] == list(want[0]) and got[1] == pytest.approx(list(want[1]), abs=1e-6)
