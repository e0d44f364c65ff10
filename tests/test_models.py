"""Tokenizer training, the T5 factory, saving/loading, vocabulary checks and default model sizes."""

import time

import pytest
import torch
from transformers import AutoTokenizer

from tw_rl.config import ArchConfig, load_config
from tw_rl.models.factory import ModelNotAvailableError, build_t5, check_shared_vocab, count_parameters, \
    load_seq2seq, save_seq2seq
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
    save_seq2seq(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, tok2 = load_seq2seq(str(tmp_path / "m"))
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
        load_seq2seq("google/flan-t5-small")
    assert time.perf_counter() - t0 < 10


def test_load_missing_directory_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="empty"):
        load_seq2seq(str(tmp_path / "empty"))


def test_a_decoder_only_model_is_refused_with_what_it_is(tok, tmp_path):
    """A causal LM where an encoder-decoder is expected: named (its architecture) before its weights load, not a
    'could not load' error about missing files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelNotAvailableError, match=r"llama is a decoder-only model \(LlamaForCausalLM\)"):
        load_seq2seq(str(tmp_path / "llama"))
    build_t5(TINY, tok, seed=0).save_pretrained(tmp_path / "t5")  # an encoder-decoder passes the same check
    tok.save_pretrained(tmp_path / "t5")
    assert load_seq2seq(str(tmp_path / "t5"))[0].config.is_encoder_decoder


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
