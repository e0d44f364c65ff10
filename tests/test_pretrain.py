"""Phase 0: a tiny run writes tokenizer, models and pretrain.json; a second call reuses the cache."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tw_rl.pretrain as pretrain_mod
from tw_rl.config import ArchConfig, load_config
from tw_rl.models.factory import build_t5, load_model, save_model
from tw_rl.models.tokenizer import train_tokenizer
from tw_rl.pretrain import AdamWScale, collate, encode_pairs, lr_at, masked_logits, pretrain

TINY_RUN = [
    "data.embedded.n_common=40", "data.embedded.n_rare=60", "data.embedded.n_train=300",
    "data.embedded.n_validation=20", "data.embedded.n_test=24", "tokenizer.vocab_size=200",
    "teacher.arch.d_model=32", "teacher.arch.d_ff=64", "teacher.arch.d_kv=8", "teacher.arch.num_heads=2",
    "teacher.arch.num_layers=1", "teacher.arch.num_decoder_layers=1",
    "student.arch.d_model=8", "student.arch.d_ff=16", "student.arch.d_kv=4", "student.arch.num_heads=2",
    "student.arch.num_layers=1", "student.arch.num_decoder_layers=1",
    "pretrain.teacher_epochs=2", "pretrain.student_epochs=1", "pretrain.batch_size=32", "pretrain.warmup_steps=2",
    "eval.max_examples=16", "num_threads=1",
]


def test_tiny_pretrain_writes_everything_and_reuses_the_cache(tmp_path, monkeypatch):
    cfg = load_config(None, [f"out_dir={tmp_path}"] + TINY_RUN)
    s = pretrain(cfg, tmp_path)
    assert torch.get_num_threads() == cfg.num_threads  # phase 0's own thread count is not left behind
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    for role in ("teacher", "student"):
        d = tmp_path / "models" / role
        assert (d / "model.safetensors").is_file() and (d / "done.json").is_file()
        assert s[role]["dir"] == str(d) and s[role]["cached"] is False
        assert s[role]["steps"] == s[role]["planned_steps"] == math.ceil(300 / 32) * (2 if role == "teacher" else 1)
        assert s[role]["tokens_per_s"] > 0 and s[role]["train_time_s"] > 0
        assert 0.0 <= s[role]["eval"]["bleu"] <= 100.0 and s[role]["eval"]["examples"] == 16
        loc = s[role]["error_locations"]
        assert 0.0 <= loc["rare_piece_accuracy"] <= 1.0 and 0.0 < loc["rare_piece_share"] < 1.0
        model, tok = load_model(str(d))
        assert len(tok) == s["vocab_size"]
    assert s["teacher"]["params"] > s["student"]["params"]
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert saved["teacher"]["eval"]["bleu"] == s["teacher"]["eval"]["bleu"]
    assert saved["bleu_gap"] == pytest.approx(s["teacher"]["eval"]["bleu"] - s["student"]["eval"]["bleu"])

    # second call: nothing is trained or re-evaluated
    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(pretrain_mod, "train_model", boom)
    monkeypatch.setattr(pretrain_mod, "evaluate_model", boom)
    again = pretrain(cfg, tmp_path)
    assert again["teacher"]["cached"] and again["student"]["cached"]
    assert again["student"]["eval"] == s["student"]["eval"]
    assert again["teacher"]["steps"] == s["teacher"]["steps"]

    # a changed student setting retrains the student only
    monkeypatch.undo()
    calls = []
    real = pretrain_mod.train_model
    monkeypatch.setattr(pretrain_mod, "train_model", lambda m, e, ep, c, seed, desc: calls.append(desc) or
                        real(m, e, ep, c, seed, desc))
    cfg2 = load_config(None, [f"out_dir={tmp_path}"] + TINY_RUN + ["student.arch.d_ff=24"])
    third = pretrain(cfg2, tmp_path)
    assert calls == ["student"]
    assert third["teacher"]["cached"] and not third["student"]["cached"]


def test_training_lowers_the_loss(tmp_path):
    cfg = load_config(None, TINY_RUN + ["pretrain.teacher_epochs=4"])
    from tw_rl.data.embedded import EmbeddedTask

    task = EmbeddedTask(cfg.data.embedded)
    tok = train_tokenizer(task.texts(), 200)
    enc = encode_pairs(task.split("train"), tok, 40, 32)
    model = build_t5(cfg.teacher.arch, tok, 0)
    batch = collate(enc, list(range(64)), 0)
    with torch.no_grad():
        before = F.cross_entropy(masked_logits(model, *batch[:3], batch[4]), batch[3][batch[4]]).item()
    stats = pretrain_mod.train_model(model, enc, 4.0, cfg, 0, "test")
    with torch.no_grad():
        after = F.cross_entropy(masked_logits(model, *batch[:3], batch[4]), batch[3][batch[4]]).item()
    assert after < 0.7 * before
    assert stats["steps"] == 4 * math.ceil(300 / 32)


def test_masked_logits_equal_full_logits_at_target_positions():
    tok = train_tokenizer(["ka lo mi", "ba lo", "mi ka ba lo"] * 10, 60)
    arch = ArchConfig(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)
    model = build_t5(arch, tok, 0).eval()
    from tw_rl.data import Pair

    enc = encode_pairs([Pair("ka lo", "mi ba lo ka"), Pair("mi", "lo")], tok, 16, 16)
    src, src_mask, dec_in, labels, label_mask = collate(enc, [0, 1], 0)
    assert label_mask.sum() == sum(len(t) for t in enc.tgt)
    assert dec_in[0, 0] == 0 and torch.equal(dec_in[:, 1:], labels[:, :-1])
    with torch.no_grad():
        full = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec_in).logits[label_mask]
        part = masked_logits(model, src, src_mask, dec_in, label_mask)
    assert torch.allclose(full, part, atol=1e-5)


def test_encode_pairs_length_limits():
    from tw_rl.data import DataError, Pair

    tok = train_tokenizer(["ka lo mi", "ba lo"] * 10, 40)
    pairs = [Pair("ka lo", "mi", "x:1"), Pair("ka lo mi ba lo mi", "mi", "x:2")]
    with pytest.raises(DataError, match="x:2"):
        encode_pairs(pairs, tok, 5, 8)
    assert encode_pairs(pairs, tok, 5, 8, on_error="skip").origins == ["x:1"]


def test_adamwscale_scales_steps_by_tensor_rms_and_schedule():
    big = torch.nn.Parameter(torch.full((4,), 10.0))
    small = torch.nn.Parameter(torch.full((4,), 0.1))
    opt = AdamWScale([big, small], lr=0.01)
    (big.sum() + small.sum()).backward()
    opt.step()
    # first Adam step is lr·sign(grad); scaled by each tensor's RMS
    assert torch.allclose(big.detach(), torch.full((4,), 10.0 - 0.01 * 10.0), atol=1e-5)
    assert torch.allclose(small.detach(), torch.full((4,), 0.1 - 0.01 * 0.1), atol=1e-7)
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_a_given_teacher_is_used_not_trained_and_its_tokenizer_shared(tmp_path, monkeypatch):
    first = load_config(None, [f"out_dir={tmp_path / 'a'}"] + TINY_RUN + ["pretrain.student_epochs=0.2"])
    s = pretrain(first, tmp_path / "a")
    calls = []
    real = pretrain_mod.train_model
    monkeypatch.setattr(pretrain_mod, "train_model", lambda m, e, ep, c, seed, desc: calls.append(desc) or
                        real(m, e, ep, c, seed, desc))
    cfg = load_config(None, [f"out_dir={tmp_path / 'b'}", f"teacher.name_or_path={s['teacher']['dir']}"] + TINY_RUN
                      + ["pretrain.student_epochs=0.2"])
    t = pretrain(cfg, tmp_path / "b")
    assert calls == ["student"]
    assert t["teacher"]["source"] == s["teacher"]["dir"] and t["teacher"]["trained"] is False
    assert t["teacher"]["eval"]["bleu"] == pytest.approx(s["teacher"]["eval"]["bleu"])
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text()

    # a student whose vocabulary differs from the teacher's is refused
    other = tmp_path / "other"
    tok = train_tokenizer(["zu zu ka", "ka lo"] * 20, 50)
    arch = ArchConfig(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1, num_decoder_layers=1)
    save_model(build_t5(arch, tok, 0), tok, other)
    bad = load_config(None, [f"out_dir={tmp_path / 'c'}", f"teacher.name_or_path={s['teacher']['dir']}",
                             f"student.name_or_path={other}"] + TINY_RUN)
    with pytest.raises(ValueError, match="vocabularies differ"):
        pretrain(bad, tmp_path / "c")
