"""Phase 0 with decoder-only models: Llama, Qwen2 and GPT-2 teachers and students built, trained (cross-entropy on
the target tokens of ``x ⧺ y``), cached and evaluated as the T5s are, also beside a T5; bad pairs refused before any
training."""

import json

import pytest
import torch
import torch.nn.functional as F

import tw_rl.pretrain as pretrain_mod
from tests.test_pretrain import TINY_RUN
from tw_rl.config import ConfigError, load_config
from tw_rl.data import Pair, load_split
from tw_rl.models.factory import build_model, load_model, save_model
from tw_rl.models.family import CAUSAL, InputTemplate
from tw_rl.models.tokenizer import train_tokenizer
from tw_rl.pretrain import Encoded, collate, encode_pairs, greedy_translate, pretrain, target_logits


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}"] + TINY_RUN + list(overrides))


def _forced_loss(model, enc: Encoded, pad: int) -> float:
    """Mean teacher-forced cross-entropy over every target token of ``enc``."""
    batch = collate(enc, list(range(len(enc.src))), pad)
    with torch.no_grad():
        return F.cross_entropy(target_logits(model, *batch[:3], batch[4]), batch[3][batch[4]]).item()


def test_llama_teacher_and_qwen2_student_train_cache_and_evaluate(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "teacher.arch.model_type=llama", "student.arch.model_type=qwen2",
               "pretrain.teacher_epochs=6")
    s = pretrain(cfg, tmp_path)
    tok = load_model(s["teacher"]["dir"])[1]
    kinds = {"teacher": "LlamaForCausalLM", "student": "Qwen2ForCausalLM"}
    for role in ("teacher", "student"):
        model, _ = load_model(s[role]["dir"])
        assert type(model).__name__ == kinds[role] and s[role]["cached"] is False
        assert s[role]["arch"]["model_type"] == getattr(cfg, role).arch.model_type  # recorded beside the sizes
        assert 0.0 <= s[role]["eval"]["bleu"] <= 100.0 and s[role]["eval"]["examples"] == 16
        loc = s[role]["error_locations"]
        assert 0.0 <= loc["other_token_accuracy"] <= 1.0 and 0.0 < loc["rare_piece_share"] < 1.0
    assert s["teacher"]["params"] > s["student"]["params"]

    # training happened: the trained teacher's teacher-forced loss on held-out pairs is far below an untrained one's
    test = load_split(cfg.data, cfg.data.test_split)
    template = InputTemplate(tok, CAUSAL)
    enc = encode_pairs(test, tok, cfg.data.max_src_tokens, cfg.data.max_tgt_tokens, template=template)
    teacher = load_model(s["teacher"]["dir"])[0]
    untrained = build_model(cfg.teacher.arch, tok, 1001, pretrain_mod.max_positions(cfg, template)).eval()
    trained_loss, untrained_loss = _forced_loss(teacher, enc, tok.pad_token_id), _forced_loss(untrained, enc, 0)
    assert trained_loss < 0.7 * untrained_loss, (trained_loss, untrained_loss)
    assert s["teacher"]["error_locations"]["other_token_accuracy"] > 0.3  # an untrained model is at ~1/|V|

    # a second call reuses both models and the evaluation
    def boom(*a, **k):
        raise AssertionError("retrained or re-evaluated a cached model")

    monkeypatch.setattr(pretrain_mod, "train_model", boom)
    monkeypatch.setattr(pretrain_mod, "evaluate_model", boom)
    again = pretrain(cfg, tmp_path)
    assert again["teacher"]["cached"] and again["student"]["cached"]
    assert again["teacher"]["eval"] == s["teacher"]["eval"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["artefacts"]["teacher"]["settings"]["teacher.arch.model_type"] == "llama"
    assert manifest["artefacts"]["teacher"]["settings"]["teacher.input_template"] == "plain"

    # another kind is another model: only the student is trained again
    monkeypatch.undo()
    calls = []
    real = pretrain_mod.train_model
    monkeypatch.setattr(pretrain_mod, "train_model", lambda m, e, ep, c, seed, desc: calls.append(desc) or
                        real(m, e, ep, c, seed, desc))
    third = pretrain(_cfg(tmp_path, "teacher.arch.model_type=llama", "student.arch.model_type=llama",
                          "pretrain.teacher_epochs=6"), tmp_path)
    assert calls == ["student"] and third["teacher"]["cached"]
    assert type(load_model(third["student"]["dir"])[0]).__name__ == "LlamaForCausalLM"


def test_gpt2_teacher_trains_and_a_size_gpt2_cannot_take_fails_before_any_training(tmp_path, monkeypatch):
    calls = []
    real = pretrain_mod.train_model
    monkeypatch.setattr(pretrain_mod, "train_model", lambda m, e, ep, c, seed, desc: calls.append(desc) or
                        real(m, e, ep, c, seed, desc))
    bad = _cfg(tmp_path / "bad", "teacher.arch.model_type=gpt2", "teacher.arch.d_kv=16",
               "student.arch.model_type=gpt2", "student.arch.d_kv=2")
    with pytest.raises(ConfigError, match=r"gpt2.*set arch\.d_kv=4"):  # the student's size, before the teacher trains
        pretrain(bad, tmp_path / "bad")
    assert calls == []
    cfg = _cfg(tmp_path / "ok", "teacher.arch.model_type=gpt2", "teacher.arch.d_kv=16", "pretrain.teacher_epochs=6",
               "pretrain.student_epochs=0.2")
    s = pretrain(cfg, tmp_path / "ok")
    assert calls == ["teacher", "student"]
    teacher, tok = load_model(s["teacher"]["dir"])
    assert type(teacher).__name__ == "GPT2LMHeadModel"
    assert teacher.config.n_positions == cfg.data.max_src_tokens + 1 + cfg.data.max_tgt_tokens  # + the EOS separator
    enc = encode_pairs(load_split(cfg.data, cfg.data.test_split), tok, cfg.data.max_src_tokens,
                       cfg.data.max_tgt_tokens, template=InputTemplate(tok, CAUSAL))
    untrained = build_model(cfg.teacher.arch, tok, 7, teacher.config.n_positions).eval()
    assert _forced_loss(teacher, enc, 0) < 0.7 * _forced_loss(untrained, enc, 0)


def test_a_t5_teacher_and_a_llama_student_share_the_tokenizer_and_train(tmp_path):
    cfg = _cfg(tmp_path, "student.arch.model_type=llama", "pretrain.student_epochs=2")
    s = pretrain(cfg, tmp_path)
    teacher, tok = load_model(s["teacher"]["dir"])
    student, stok = load_model(s["student"]["dir"])
    assert teacher.config.is_encoder_decoder and type(student).__name__ == "LlamaForCausalLM"
    assert stok.get_vocab() == tok.get_vocab() and student.config.vocab_size == teacher.config.vocab_size
    assert "model_type" not in s["teacher"]["arch"]  # a T5's records are as they were before decoder-only models
    assert s["student"]["trained"] and s["student"]["steps"] == 2 * 10
    assert 0.0 <= s["student"]["eval"]["bleu"] <= 100.0 and "error_locations" in s["student"]


def test_a_given_causal_pair_with_different_tokenizers_is_refused_naming_the_model(tmp_path, monkeypatch):
    tok_a = train_tokenizer(["ka lo mi", "ba lo"] * 20, 50)
    tok_b = train_tokenizer(["zu zu ka", "ka lo"] * 20, 50)
    arch = _cfg(tmp_path, "student.arch.model_type=llama").student.arch
    save_model(build_model(arch, tok_a, 0, 64), tok_a, tmp_path / "teacher")
    save_model(build_model(arch, tok_b, 0, 64), tok_b, tmp_path / "student")
    monkeypatch.setattr(pretrain_mod, "train_model", lambda *a, **k: pytest.fail("trained"))
    cfg = _cfg(tmp_path / "run", f"teacher.name_or_path={tmp_path / 'teacher'}",
               f"student.name_or_path={tmp_path / 'student'}")
    with pytest.raises(ConfigError, match=rf"vocabularies differ between .* and student {tmp_path / 'student'}: "
                                          rf".* student {tmp_path / 'student'} has \d+; first difference at id"):
        pretrain(cfg, tmp_path / "run")


def test_causal_target_logits_are_the_next_token_logits_of_x_then_y():
    """Position t of the output reads x ⧺ y_<t, computed here from the plain forward of each unpadded row."""
    tok = train_tokenizer(["ka lo mi", "ba lo", "mi ka ba lo"] * 10, 60)
    arch = load_config(None, ["student.arch.model_type=qwen2"]).student.arch
    model = build_model(arch, tok, 0, 64).eval()
    enc = encode_pairs([Pair("ka lo", "mi ba lo ka"), Pair("mi", "lo")], tok, 16, 16,
                       template=InputTemplate(tok, CAUSAL))
    assert enc.src[1] == tok("mi")["input_ids"] and enc.src[1][-1] == tok.eos_token_id  # x then EOS
    src, src_mask, dec_in, labels, label_mask = collate(enc, [0, 1], 0)
    with torch.no_grad():
        got = target_logits(model, src, src_mask, dec_in, label_mask)
        want = torch.cat([model(input_ids=torch.tensor([x + y[:-1]])).logits[0, len(x) - 1:]
                          for x, y in zip(enc.src, enc.tgt)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_collate_masks_by_length_when_pad_is_a_real_token():
    """A tokenizer that pads with a real token (SmolLM2 pads with its EOS, which also ends every input) keeps it."""
    enc = Encoded(src=[[5, 2, 6, 2], [7, 2]], tgt=[[8, 2], [9, 9, 2]], origins=["a", "b"])
    src, src_mask, _, _, label_mask = collate(enc, [0, 1], pad_id=2)
    assert src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert label_mask.tolist() == [[True, True, False], [True] * 3]


def test_greedy_translate_of_a_causal_lm_equals_hf_generate_row_by_row():
    """Batched (left-aligned inputs of different lengths, tw-rl's loop) = Hugging Face greedy generate per row."""
    tok = train_tokenizer(["ka lo mi", "ba lo", "mi ka ba lo", "lo lo ka"] * 10, 60)
    arch = load_config(None, ["teacher.arch.model_type=llama"]).teacher.arch
    model = build_model(arch, tok, 3, 64).eval()
    sources = ["ka lo mi", "ba", "mi ka ba lo lo"]
    out = greedy_translate(model, tok, sources, max_new_tokens=6, batch_size=2)
    template = InputTemplate(tok, CAUSAL)
    for src, text in zip(sources, out):
        ids = torch.tensor(template.inputs([src]))
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=1)
        assert text == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
