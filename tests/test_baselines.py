"""The oracle caller and the teacher-alone loop (tw_rl/evaluation/fallback.py, tw_rl/decoding.py) on the toy models of
conftest.py: a random tiny teacher and a student whose greedy tokens often differ from the teacher's."""

import math

import numpy as np
import pytest
import torch

from tw_rl.evaluation.fallback import OracleCalls, oracle_threshold
from tw_rl.decoding import TEACHER_ACTION, TeacherSteps, decode, decode_teacher
from tw_rl.examples import pad_batch

MAX_LEN = 10
BUDGET = 0.2


def sources(toy):
    return [e.teacher_src for e in toy["examples"]]


def oracle_decode(toy, threshold, keep_gains=False):
    """The toy student at the b = 0.2 prompt, its own <τ> masked, the oracle deciding its calls."""
    ex, teacher = toy["examples"], toy["teacher"]
    ids, mask = pad_batch([e.student_src[BUDGET] for e in ex], 0)
    tids, tmask = pad_batch(sources(toy), 0)
    rule = OracleCalls(threshold, toy["V"], TeacherSteps(teacher.model, tids, tmask, toy["V"]), keep_gains)
    out = decode(toy["student"], ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], teacher=teacher,
                 teacher_src=sources(toy), allow_tau=False, tau_rule=rule)
    return out, rule


def rows(out):
    return [out.tokens[i, :n].tolist() for i, n in enumerate(out.lengths)]


def usage(out):
    return float(np.mean([out.teacher_mask[i, :n].sum() / n for i, n in enumerate(out.lengths)]))


def teacher_forced(toy, out):
    """Independently of the rule: along each decoded output, the student's greedy token over V (its own <τ>
    masked, δ on the teacher's tokens, as when it decoded) and the teacher's log-probs ``[B, T, |V|]``."""
    ex, student, V = toy["examples"], toy["student"], toy["V"]
    ids, mask = pad_batch([e.student_src[BUDGET] for e in ex], 0)
    T = out.tokens.shape[1]
    dec = torch.zeros((len(ex), T), dtype=torch.long)
    dec_teacher = torch.zeros((len(ex), T), dtype=torch.bool)
    dec[:, 1:] = torch.as_tensor(out.tokens[:, :-1])
    dec_teacher[:, 1:] = torch.as_tensor(out.teacher_mask[:, :-1])
    with torch.no_grad():
        own = student(ids, mask, dec, dec_teacher)[..., :V].argmax(dim=-1)
    teacher_lp = toy["teacher"].distributions(sources(toy), rows(out))
    return own, teacher_lp


def test_decode_teacher_equals_hugging_face_greedy_generate(toy):
    teacher = toy["teacher"]
    ids, mask = pad_batch(sources(toy), 0)
    out = decode_teacher(teacher.model, ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], vocab_size=toy["V"])
    reference = teacher.generate(sources(toy), MAX_LEN, toy["eos"])
    assert rows(out) == reference
    assert any(len(r) < MAX_LEN for r in reference) and any(len(r) > 2 for r in reference)  # EOS and content
    assert out.terminated.tolist() == [toy["eos"] in r for r in reference]
    for i, n in enumerate(out.lengths):  # every produced token is the teacher's; padding is nobody's
        assert out.teacher_mask[i, :n].all() and not out.teacher_mask[i, n:].any()
        assert (out.actions[i, :n] == TEACHER_ACTION).all()
    scored = teacher.score(sources(toy), reference)  # its log-prob of its own token, teacher-forced
    for i, s in enumerate(scored):
        np.testing.assert_allclose(out.behavior_logprobs[i, :len(s)], s, atol=1e-5)


def test_teacher_steps_refuses_out_of_order_steps(toy):
    ids, mask = pad_batch(sources(toy), 0)
    steps = TeacherSteps(toy["teacher"].model, ids, mask, toy["V"])
    with pytest.raises(ValueError, match="decoder start"):
        steps.step(torch.zeros(len(ids), dtype=torch.long))
    assert steps.step().shape == (len(ids), toy["V"])
    with pytest.raises(ValueError, match="decoder start"):
        steps.step()


def test_oracle_calls_only_where_tokens_differ_and_the_gain_exceeds_the_threshold(toy):
    # the threshold: the median gain over the disagreements of the all-calling oracle, so that it calls at some
    # disagreements and not at others
    _, rule = oracle_decode(toy, -math.inf, keep_gains=True)
    gains = torch.cat([g[own != w] for own, w, g in rule.gains])
    threshold = float(gains.median())
    out, _ = oracle_decode(toy, threshold)
    own, teacher_lp = teacher_forced(toy, out)
    called = disagreements = 0
    for i, n in enumerate(out.lengths):
        for t in range(n):
            w = int(teacher_lp[i, t].argmax())
            s = int(own[i, t])
            gain = float(teacher_lp[i, t, w] - teacher_lp[i, t, s])
            disagreements += s != w
            if out.teacher_mask[i, t]:  # a call: only at a disagreement with a gain over the threshold
                called += 1
                assert s != w and gain > threshold - 1e-5, (i, t, s, w, gain)
                assert out.tokens[i, t] == w
            else:  # no call: agreement, or a gain under the threshold; the student's own token
                assert s == w or gain <= threshold + 1e-5, (i, t, s, w, gain)
                assert out.tokens[i, t] == s
    assert 0 < called < disagreements  # both sides of the rule were exercised: the test can fail


def test_oracle_spans_student_alone_to_teacher_alone(toy):
    """Threshold −inf: a call at every disagreement, so the output is the teacher's greedy output token for token;
    +inf: never a call, the student alone with <τ> masked."""
    lowest, _ = oracle_decode(toy, -math.inf)
    assert rows(lowest) == toy["teacher"].generate(sources(toy), MAX_LEN, toy["eos"])
    assert 0 < lowest.teacher_mask.sum() < lowest.lengths.sum()  # calls, but not where the student agrees
    highest, _ = oracle_decode(toy, math.inf)
    ex = toy["examples"]
    ids, mask = pad_batch([e.student_src[BUDGET] for e in ex], 0)
    alone = decode(toy["student"], ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], allow_tau=False)
    assert rows(highest) == rows(alone) and highest.teacher_mask.sum() == 0
    assert rows(alone) != rows(lowest)
    assert oracle_threshold(0.0) == math.inf and oracle_threshold(1.0) == 0.0
    assert oracle_threshold(math.exp(-2.5)) == pytest.approx(2.5)


def test_oracle_usage_is_monotone_in_the_threshold(toy):
    thresholds = [-math.inf, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
    used = [usage(oracle_decode(toy, th)[0]) for th in thresholds]
    assert all(a >= b for a, b in zip(used, used[1:])), list(zip(thresholds, used))
    assert used[0] > used[len(used) // 2] > used[-1] == 0.0, used  # and it moves


def test_oracle_lookups_are_not_teacher_calls(toy):
    """The teacher's own counters see only the <τ> rows; the look-ups go through TeacherSteps."""
    teacher = toy["teacher"]
    before = teacher.stats["rows"]
    out, _ = oracle_decode(toy, 1.0)
    assert teacher.stats["rows"] - before == out.teacher_mask.sum() > 0


def test_plain_rules_still_get_three_arguments(toy):
    ex = toy["examples"]
    ids, mask = pad_batch([e.student_src[BUDGET] for e in ex], 0)
    seen = []
    rule = lambda *args: seen.append(len(args)) or torch.ones(len(ex), dtype=torch.bool)  # noqa: E731
    out = decode(toy["student"], ids, mask, max_len=4, eos_id=-1, teacher=toy["teacher"], teacher_src=sources(toy),
                 allow_tau=False, tau_rule=rule)
    assert seen == [3] * 4 and out.teacher_mask.all()
