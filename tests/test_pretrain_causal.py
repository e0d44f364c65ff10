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


# ----------------------------------------------------------------------------------------------------------------
# a student made of the teacher's layers (student.init_layers), trained on the teacher's outputs
# (pretrain.student_targets=teacher)


_TRAIN, _TEACHER_OUTPUTS = pretrain_mod.train_model, pretrain_mod.teacher_outputs


def _recording_train(monkeypatch, seen: list):
    """``train_model`` as it is, recording ``(desc, a copy of the model's state before training, the data, the
    model)``."""
    real = _TRAIN

    def train(m, e, ep, c, seed, desc):
        seen.append((desc, {k: v.clone() for k, v in m.state_dict().items()}, e, m))
        return real(m, e, ep, c, seed, desc)

    monkeypatch.setattr(pretrain_mod, "train_model", train)


def test_a_student_of_the_teachers_layers_starts_as_them_trains_and_is_cached_by_its_layers(tmp_path, monkeypatch):
    from tw_rl.models.factory import count_parameters, pruned_config

    seen: list = []
    _recording_train(monkeypatch, seen)
    cfg = _cfg(tmp_path, "teacher.arch.model_type=llama", "teacher.arch.num_layers=3", "student.init_layers=[0,2]",
               "student.chat_template=false")
    s = pretrain(cfg, tmp_path)
    assert [d for d, *_ in seen] == ["teacher", "student"]
    teacher, tok = load_model(s["teacher"]["dir"])
    student = load_model(s["student"]["dir"])[0]
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    fresh = type(teacher)(pruned_config(teacher.config, [0, 2]))
    assert s["student"]["params"] == count_parameters(student) == count_parameters(fresh)
    assert s["student"]["params"] < s["teacher"]["params"] and s["teacher"]["params"] - s["student"]["params"] == \
        sum(p.numel() for p in teacher.model.layers[1].parameters())
    assert s["student"]["init_layers"] == [0, 2] and s["student"]["arch"] == {"model_type": "llama", "num_layers": 2}
    # it started as the trained teacher's layers 0 and 2 (and its embeddings, norm, output layer) ...
    before = seen[1][1]
    t_state = teacher.state_dict()
    for key, value in before.items():
        src = key.replace("model.layers.1.", "model.layers.2.")
        assert torch.equal(value, t_state[src]), key
    # ... and was trained from there
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert s["student"]["trained"] and s["student"]["steps"] == 10
    manifest = json.loads((tmp_path / "manifest.json").read_text())["artefacts"]
    settings, inputs = manifest["student"]["settings"], manifest["student"]["inputs"]
    assert settings["student.init_layers"] == [0, 2] and "student.arch.d_model" not in settings
    assert settings["student.init_from"] == inputs["teacher"] == manifest["teacher"]["id"]

    # cached by its layers: student.arch (unused) changes nothing, other layers retrain the student only
    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(pretrain_mod, "train_model", boom)
    again = pretrain(_cfg(tmp_path, "teacher.arch.model_type=llama", "teacher.arch.num_layers=3",
                          "student.init_layers=[0,2]", "student.chat_template=false", "student.arch.d_model=12"),
                     tmp_path)
    assert again["student"]["cached"] and again["teacher"]["cached"]
    seen.clear()
    _recording_train(monkeypatch, seen)
    third = pretrain(_cfg(tmp_path, "teacher.arch.model_type=llama", "teacher.arch.num_layers=3",
                          "student.init_layers=[1]", "student.chat_template=false"), tmp_path)
    assert [d for d, *_ in seen] == ["student"] and load_model(third["student"]["dir"])[0].config.num_hidden_layers == 1
    # a new teacher is a new student
    seen.clear()
    pretrain(_cfg(tmp_path, "teacher.arch.model_type=llama", "teacher.arch.num_layers=3", "student.init_layers=[1]",
                  "student.chat_template=false", "pretrain.teacher_epochs=1"), tmp_path)
    assert [d for d, *_ in seen] == ["teacher", "student"]


def test_init_layers_out_of_a_given_teachers_range_or_of_a_t5_teacher_fail_before_any_training(tmp_path, monkeypatch):
    tok = train_tokenizer(["ka lo mi", "ba lo", "mi ka"] * 30, 80)
    arch = _cfg(tmp_path, "teacher.arch.model_type=qwen2").teacher.arch
    save_model(build_model(arch, tok, 0, 128), tok, tmp_path / "qwen2")
    save_model(build_model(_cfg(tmp_path).teacher.arch, tok, 0, 128), tok, tmp_path / "t5")
    monkeypatch.setattr(pretrain_mod, "train_model", lambda *a, **k: pytest.fail("trained"))
    cfg = _cfg(tmp_path / "a", f"teacher.name_or_path={tmp_path / 'qwen2'}", "student.init_layers=[0,2]")
    with pytest.raises(ConfigError, match=rf"init_layers=\[0, 2\]: the teacher {tmp_path / 'qwen2'} has 1 decoder "
                                          rf"layer \(0\.\.0\); \[2\] is out of range"):
        pretrain(cfg, tmp_path / "a")
    cfg = _cfg(tmp_path / "b", f"teacher.name_or_path={tmp_path / 't5'}", "student.init_layers=[0]")
    with pytest.raises(ConfigError, match=rf"needs a decoder-only teacher .* the teacher {tmp_path / 't5'} is an "
                                          rf"encoder-decoder \(t5\)"):
        pretrain(cfg, tmp_path / "b")


def test_student_targets_teacher_trains_the_student_on_the_teachers_greedy_outputs(tmp_path, monkeypatch):
    from tw_rl.config import source_room
    from tw_rl.decoding import decode_teacher
    from tw_rl.examples import pad_batch
    from tw_rl.models.family import SEQ2SEQ

    seen: list = []
    _recording_train(monkeypatch, seen)
    over = ["student.arch.model_type=llama", "pretrain.student_targets=teacher", "eval.batch_size=16"]
    cfg = _cfg(tmp_path, *over)  # a T5 teacher, a causal student
    s = pretrain(cfg, tmp_path)
    (_, _, teacher_data, _), (_, _, student_data, _) = seen
    teacher, tok = load_model(s["teacher"]["dir"])
    train = load_split(cfg.data, cfg.data.train_split)
    # the student reads its own inputs (the causal template) ...
    mine = encode_pairs(train, tok, source_room(cfg, tok), cfg.data.max_tgt_tokens, template=InputTemplate(tok, CAUSAL))
    assert student_data.src == mine.src and student_data.origins == mine.origins
    # ... and learns the teacher's greedy outputs of its inputs (the seq2seq template), decoded here in one batch
    # in the data's order (phase 0 batches by length) and, for the first 40, one at a time
    theirs = encode_pairs(train, tok, source_room(cfg, tok), cfg.data.max_tgt_tokens,
                          template=InputTemplate(tok, SEQ2SEQ))

    def greedy(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        d = decode_teacher(teacher, ids, mask, max_len=cfg.data.max_tgt_tokens, eos_id=tok.eos_token_id,
                           vocab_size=len(tok), start_id=tok.pad_token_id, pad_id=tok.pad_token_id)
        return [d.tokens[k, :d.lengths[k]].tolist() for k in range(len(rows))]

    want = greedy(theirs.src)
    assert [greedy([src])[0] for src in theirs.src[:40]] == want[:40]
    assert student_data.tgt == want and student_data.tgt != mine.tgt  # not the references
    assert all(1 <= len(t) <= cfg.data.max_tgt_tokens for t in want)
    stats = s["student"]["teacher_targets"]
    assert s["student"]["targets"] == "teacher" and stats["pairs"] == len(train) and stats["cached"] is False
    manifest = json.loads((tmp_path / "manifest.json").read_text())["artefacts"]
    assert manifest["teacher_targets"]["inputs"]["teacher"] == manifest["teacher"]["id"]
    assert manifest["teacher_targets"]["path"] == "models/teacher_targets.json"
    assert manifest["student"]["settings"]["pretrain.student_targets"] == "teacher"
    assert "student_targets" not in json.dumps(manifest["teacher"]["settings"])  # the teacher's record as before

    # cached: nothing decoded or trained again; a new student reuses the targets; a new teacher redoes them
    def boom(*a, **k):
        raise AssertionError("decoded or trained again")

    monkeypatch.setattr(pretrain_mod, "teacher_outputs", boom)
    monkeypatch.setattr(pretrain_mod, "train_model", boom)
    assert pretrain(cfg, tmp_path)["student"]["cached"]
    seen.clear()
    _recording_train(monkeypatch, seen)
    s2 = pretrain(_cfg(tmp_path, *over, "student.arch.d_model=16"), tmp_path)
    assert [d for d, *_ in seen] == ["student"] and s2["student"]["teacher_targets"]["cached"] is True
    assert seen[0][2].tgt == want
    decoded = []
    monkeypatch.setattr(pretrain_mod, "teacher_outputs", lambda *a, **k: decoded.append(1) or _TEACHER_OUTPUTS(*a, **k))
    s3 = pretrain(_cfg(tmp_path, *over, "pretrain.teacher_epochs=1"), tmp_path)
    assert decoded == [1] and not s3["teacher"]["cached"] and not s3["student"]["cached"]
