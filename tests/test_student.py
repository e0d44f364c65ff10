"""The student: <τ> as the last action, the offset δ on teacher tokens, save → load identity."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_t5
from tw_rl.rundir import ArtefactError
from tw_rl.models.student import TAU_TOKEN, Student


def word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_student(tau_head="token"):
    tok = word_tokenizer([f"w{i}" for i in range(13)])
    model = tiny_t5(len(tok))
    student = Student.from_base(model, tok, tau_head=tau_head)
    with torch.no_grad():
        student.delta.normal_()
    return student.eval(), tok


def test_tau_is_the_last_action():
    student, tok = make_student()
    assert student.tau_id == len(tok) - 1 == tok.convert_tokens_to_ids(TAU_TOKEN)
    assert student.n_actions == 17
    ids = torch.tensor([[3, 4, 1]])
    logits = student(ids, ids > 0, torch.tensor([[0, 5]]), torch.tensor([[False, False]]))
    assert logits.shape == (1, 2, 17)


def test_delta_changes_only_teacher_positions():
    student, _ = make_student()
    src = torch.tensor([[3, 4, 5, 1]])
    dec = torch.tensor([[0, 6, 7, 8]])
    plain = student(src, src > 0, dec, torch.zeros_like(dec, dtype=torch.bool))
    marked = student(src, src > 0, dec, torch.tensor([[False, False, True, False]]))
    # causal decoder: positions before the marked token are unchanged, from it on they differ
    torch.testing.assert_close(plain[:, :2], marked[:, :2])
    assert (plain[:, 2:] - marked[:, 2:]).abs().max() > 1e-4
    student.use_delta = False
    torch.testing.assert_close(student(src, src > 0, dec, torch.tensor([[False, False, True, False]])), plain)


def test_incremental_step_equals_full_forward():
    student, _ = make_student()
    src = torch.tensor([[3, 4, 5, 1], [6, 7, 1, 0]])
    smask = src > 0
    dec = torch.tensor([[0, 6, 7, 8], [0, 9, 10, 11]])
    tmask = torch.tensor([[False, True, False, True], [False, False, True, True]])
    full = student(src, smask, dec, tmask)
    acting = student.start(src, smask)
    steps = torch.stack([student.step(acting, dec[:, t], tmask[:, t]) for t in range(4)], 1)
    torch.testing.assert_close(full, steps, atol=1e-5, rtol=1e-5)


def test_save_load_identical_logits(tmp_path):
    student, tok = make_student()
    student.save(tmp_path / "s", tok)
    loaded, tok2 = Student.load(tmp_path / "s")
    loaded.eval()
    assert loaded.tau_id == student.tau_id and tok2.convert_tokens_to_ids(TAU_TOKEN) == student.tau_id
    src = torch.tensor([[3, 4, 5, 1]])
    dec = torch.tensor([[0, 6, 7, 8]])
    tm = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(student(src, src > 0, dec, tm), loaded(src, src > 0, dec, tm), atol=0, rtol=0)


def test_load_rejects_a_plain_model_dir(tmp_path):
    tiny_t5(10).save_pretrained(tmp_path)
    with pytest.raises(ArtefactError, match="not a saved tw-rl student"):
        Student.load(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# the gate head: Q(<τ>) = u(s) + logsumexp_V Q
def raw_logits(student, *args):
    student.tau_head, gate = "token", student.gate_bias
    try:
        return student(*args)
    finally:
        student.tau_head = "gate"


def test_gate_head_factorises_the_policy():
    student, _ = make_student("gate")
    with torch.no_grad():
        student.model.get_output_embeddings().weight[student.tau_id].normal_()
        student.gate_bias.fill_(0.7)
    src, dec = torch.tensor([[3, 4, 5, 1]]), torch.tensor([[0, 6, 7, 8]])
    args = (src, src > 0, dec, torch.tensor([[False, True, False, False]]))
    q, raw = student(*args), raw_logits(student, *args)
    tau = student.tau_id
    u = raw[..., tau] + 0.7
    pi = torch.softmax(q, -1)
    torch.testing.assert_close(pi[..., tau], torch.sigmoid(u))  # π(<τ>|s) = σ(u(s))
    torch.testing.assert_close(pi[..., :tau], (1 - torch.sigmoid(u))[..., None] * torch.softmax(raw[..., :tau], -1))
    torch.testing.assert_close(q[..., :tau], raw[..., :tau], atol=0, rtol=0)  # the token logits are untouched
    steps = []  # the acting forward applies the same head
    acting = student.start(src, src > 0)
    for t in range(4):
        steps.append(student.step(acting, dec[:, t], args[3][:, t]))
    torch.testing.assert_close(torch.stack(steps, 1), q, atol=1e-5, rtol=1e-5)


def test_gate_head_with_a_constant_gate_is_the_confidence_rule(toy):
    """w_τ = 0 and gate bias log θ: greedy decoding calls exactly where the confidence fallback at θ would."""
    import copy
    import math

    import numpy as np

    from tw_rl.evaluation.fallback import confidence_fallback
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch

    base = copy.deepcopy(toy["student"])
    ex = toy["examples"]
    ids, mask = pad_batch([e.student_src[0.2] for e in ex], 0)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher=toy["teacher"], teacher_src=[e.teacher_src for e in ex])
    confidences = []  # the student's top-token probabilities along its own greedy paths: θ = their median
    decode(base, ids, mask, allow_tau=False, tau_rule=lambda t, logits, calls: confidences.append(
        torch.softmax(logits[:, :base.tau_id], -1).amax(-1)) or torch.zeros(len(ex), dtype=torch.bool), **kw)
    c = torch.cat(confidences).sort().values
    k = len(c) // 2  # halfway between two neighbours: no step sits on the threshold up to float rounding
    theta = float(c[k] + c[k + 1]) / 2 if c[k + 1] - c[k] > 1e-4 else float(c[k]) * 1.001
    gate = Student(base.model, base.tau_id, tau_head="gate", gate_bias=math.log(theta)).eval()
    with torch.no_grad():
        gate.model.get_output_embeddings().weight[gate.tau_id].zero_()
    own = decode(gate, ids, mask, **kw)
    rule = decode(gate, ids, mask, allow_tau=False, tau_rule=confidence_fallback(theta, gate.tau_id), **kw)
    assert np.array_equal(own.teacher_mask, rule.teacher_mask) and np.array_equal(own.tokens, rule.tokens)
    assert 0 < own.teacher_mask.sum() < own.lengths.sum()  # the rule fires at some steps, not all
    assert len({tuple(r[:n]) for r, n in zip(own.tokens.tolist(), own.lengths)}) >= 3  # on varied outputs
    assert c[0] < theta < c[-1] and c[-1] - c[0] > 0.1  # the confidences spread around the threshold


def test_gate_head_save_load(tmp_path):
    student, tok = make_student("gate")
    with torch.no_grad():
        student.gate_bias.fill_(-1.25)
    student.save(tmp_path / "s", tok)
    loaded = Student.load(tmp_path / "s")[0].eval()
    assert loaded.tau_head == "gate" and float(loaded.gate_bias) == -1.25
    src, dec = torch.tensor([[3, 4, 5, 1]]), torch.tensor([[0, 6, 7, 8]])
    tm = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(student(src, src > 0, dec, tm), loaded(src, src > 0, dec, tm), atol=0, rtol=0)
    assert make_student()[0].gate_bias is None  # the token head has no gate parameter
    with pytest.raises(ValueError, match="tau_head"):
        Student(tiny_t5(10), 9, tau_head="nope")


@pytest.mark.parametrize("tau_head", ["token", "gate"])
def test_trainable_tau_moves_only_the_tau_decision(tau_head):
    """rl.trainable=tau: an AdamW step on a loss of every action changes the <τ> logit and nothing else — every
    parameter but the output layer's <τ> row (and the gate bias) is as it was, so the token policy is phase 1's."""
    from tw_rl.algos.common import clip_gradients

    src = torch.tensor([[3, 4, 5, 1], [6, 7, 1, 0]])
    dec = torch.tensor([[0, 6, 7, 8], [0, 9, 10, 11]])
    tmask = torch.tensor([[False, True, False, False], [False, False, True, False]])
    for which in ("tau", "all"):
        torch.manual_seed(0)
        student, _ = make_student(tau_head)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        logits0 = student(src, src > 0, dec, tmask).detach()
        student.set_trainable(which)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
        student.train()
        loss = torch.log_softmax(student(src, src > 0, dec, tmask), -1).pow(2).mean()  # touches every action
        loss.backward()
        clip_gradients(student, 1.0)
        opt.step()
        student.eval()
        changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
        logits1 = student(src, src > 0, dec, tmask).detach()
        raw0, raw1 = logits0[..., :student.tau_id], logits1[..., :student.tau_id]
        if which == "tau":
            out = student.model.get_output_embeddings().weight
            names = {k for k, v in student.state_dict().items() if v.data_ptr() == out.data_ptr()}
            assert changed <= names | {"gate_bias"} and changed  # (tied embeddings: one tensor, several names)
            diff = (out - before[next(iter(names))]).abs().sum(-1)
            assert diff[student.tau_id] > 0 and diff[: student.tau_id].max() == 0
            torch.testing.assert_close(raw1, raw0, rtol=0, atol=1e-5)  # the token logits (float rounding only)
            assert (logits1[..., -1] - logits0[..., -1]).abs().max() > 1e-4
        else:
            assert any("encoder" in k for k in changed) and (raw1 - raw0).abs().max() > 1e-4


def test_set_trainable_rejects_unknown_values():
    student, _ = make_student()
    with pytest.raises(ValueError, match="trainable='tokens'"):
        student.set_trainable("tokens")
