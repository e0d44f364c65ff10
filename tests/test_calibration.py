"""Budget calibration: the offset search against closed forms, and the offset inside decoding."""

import math

import numpy as np
import pytest
import torch

from tw_rl.evaluation.calibration import bias_of, calibrate_budget
from tw_rl.decoding import decode
from tw_rl.examples import pad_batch


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize("shift,budget", [(1.3, 0.2), (-2.0, 0.1), (4.0, 0.5), (0.0, 0.3)])
def test_offset_matches_the_closed_form(shift, budget):
    # usage(κ) = σ(κ + shift) is met exactly at κ* = logit(b) − shift
    cal = calibrate_budget(lambda k: sigmoid(k + shift), budget, tol=1e-4, max_iter=40)
    assert cal.trace[0][0] == 0.0 and cal.usage_before == pytest.approx(sigmoid(shift))
    assert abs(cal.usage - budget) <= 1e-4
    assert cal.bias == pytest.approx(math.log(budget / (1 - budget)) - shift, abs=2e-3)


def test_already_obeyed_budget_keeps_offset_zero_and_b0_needs_none():
    cal = calibrate_budget(lambda k: 0.2 + 0.001 * k, 0.2, tol=0.005, max_iter=16)
    assert cal.bias == 0.0 and len(cal.trace) == 1
    cal = calibrate_budget(lambda k: 1 / 0, 0.0, tol=0.005, max_iter=16)  # never decodes at b = 0
    assert cal.bias == 0.0 and cal.trace == []


def test_unreachable_budget_returns_the_closest_offset_seen():
    # a step function that jumps over the target: the closest usage seen is returned, after max_iter decodes
    cal = calibrate_budget(lambda k: 0.0 if k < 0.7 else 0.6, 0.2, tol=0.005, max_iter=12)
    assert len(cal.trace) == 12 and cal.usage == 0.0 and cal.bias < 0.7
    assert abs(bias_of(0.0)) < 14 and abs(bias_of(1.0)) < 14  # the search stays finite


def test_decode_adds_the_offset_to_the_tau_logit(toy):
    student, teacher, examples = toy["student"], toy["teacher"], toy["examples"]
    ids, mask = pad_batch([e.student_src[0.2] for e in examples], 0)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher=teacher, teacher_src=[e.teacher_src for e in examples])

    def usage(bias):
        out = decode(student, ids, mask, tau_bias=None if bias is None else torch.full((len(examples),), bias), **kw)
        return out, np.mean([out.teacher_mask[i, :n].mean() for i, n in enumerate(out.lengths)])

    base, u0 = usage(None)
    assert 0 < u0 < 1  # the toy student calls at some steps at b = 0.2, not all
    same, _ = usage(0.0)
    assert np.array_equal(base.actions, same.actions) and np.array_equal(base.tokens, same.tokens)
    assert usage(100.0)[1] == 1.0 and usage(-100.0)[1] == 0.0  # every step calls / no step calls
    grid = [usage(k)[1] for k in (-8.0, -4.0, -1.0, 0.0, 1.0, 4.0, 8.0)]
    assert grid[3] == u0 and all(a <= b for a, b in zip(grid, grid[1:]))  # usage rises with the offset
    assert grid[0] < u0 < grid[-1]  # both ways
    # the offset moves the <τ> logit alone: κ = −100 decodes exactly as the student with <τ> masked
    out, _ = usage(-100.0)
    plain = decode(student, ids, mask, allow_tau=False, **kw)
    assert np.array_equal(out.tokens, plain.tokens) and np.array_equal(out.actions, plain.actions)
    assert not np.array_equal(out.tokens, base.tokens)  # and the toy's own calls changed its outputs


# ----------------------------------------------------------------------------------------------------------------
# calibration.search=secant
# ----------------------------------------------------------------------------------------------------------------
def _count(f):
    seen: list[float] = []
    return seen, lambda x: seen.append(x) or f(x)


def test_secant_is_exact_in_one_decode_where_usage_is_linear():
    from tw_rl.evaluation.calibration import calibrate_threshold

    # random calls: usage ≈ rate. The bracket's prior ends (0, 0) and (1, 1) put the first decode on the target
    seen, f = _count(lambda x: x)
    cal = calibrate_threshold(f, 0.23, tol=1e-9, search="secant")
    assert seen == [pytest.approx(0.23)] and cal.usage == pytest.approx(0.23)
    # bisection needs many halvings for the same tolerance
    assert len(calibrate_threshold(lambda x: x, 0.23, tol=1e-3).trace) >= 6


@pytest.mark.parametrize("name,f", [("cube", lambda x: x ** 3), ("root", lambda x: x ** 0.5),
                                    ("sigmoid", lambda x: 1 / (1 + math.exp(-12 * (x - 0.7)))),
                                    ("steps", lambda x: math.floor((x ** 2) * 200) / 200)])
@pytest.mark.parametrize("target", [0.1, 0.37])
def test_secant_reaches_the_tolerance_on_curved_usage(name, f, target):
    from tw_rl.evaluation.calibration import calibrate_threshold

    cal = calibrate_threshold(f, target, tol=0.01, max_iter=12, search="secant")
    assert abs(cal.usage - target) <= 0.01, (name, cal.trace)
    xs = [x for x, _ in cal.trace]
    assert all(0.0 < x <= 1.0 for x in xs) and len(set(xs)) == len(xs)  # inside the bracket, never twice


def test_secant_with_the_previous_levels_decodes_needs_fewer():
    from tw_rl.evaluation.calibration import calibrate_threshold

    # a chain of budget levels on one curve: each level's search starts from the previous one's decodes
    f = lambda x: x ** 3  # noqa: E731
    cold = warm = 0
    prior: list = []
    for target in (0.1, 0.2, 0.3, 0.4, 0.5):
        a = calibrate_threshold(f, target, tol=0.005, max_iter=16, search="secant")
        b = calibrate_threshold(f, target, tol=0.005, max_iter=16, search="secant", prior=prior)
        assert abs(a.usage - target) <= 0.005 and abs(b.usage - target) <= 0.005
        cold, warm, prior = cold + a.evaluations, warm + b.evaluations, b.trace
    assert warm < cold, (warm, cold)


def test_secant_finds_out_a_target_nothing_reaches():
    from tw_rl.evaluation.calibration import calibrate_threshold

    seen, f = _count(lambda x: 0.2 * x)  # saturates at 0.2 (an oracle that calls only where the student is wrong)
    cal = calibrate_threshold(f, 0.4, max_iter=20, search="secant")
    assert seen[-1] == 1.0 and len(seen) < 8 and cal.usage == pytest.approx(0.2)
    cal = calibrate_threshold(lambda x: 0.0 if x < 0.3 else 0.5, 0.2, max_iter=8, search="secant")  # a jump over
    assert cal.evaluations == 8 and cal.usage in (0.0, 0.5)  # the closest seen, after max_iter
    assert calibrate_threshold(lambda x: 1 / 0, 0.0, search="secant").trace == []
    with pytest.raises(ValueError, match="search="):
        calibrate_threshold(lambda x: x, 0.2, search="golden")


@pytest.mark.parametrize("shift,budget", [(1.3, 0.2), (-2.0, 0.1), (4.0, 0.5), (0.0, 0.3), (-4.2, 0.1)])
def test_secant_offset_matches_the_closed_form(shift, budget):
    # as test_offset_matches_the_closed_form: κ = 0 first, then lines in logits
    cal = calibrate_budget(lambda k: sigmoid(k + shift), budget, tol=1e-4, max_iter=40, search="secant")
    assert cal.trace[0][0] == 0.0 and cal.usage_before == pytest.approx(sigmoid(shift))
    assert cal.bias == pytest.approx(math.log(budget / (1 - budget)) - shift, abs=2e-3)
    slow = calibrate_budget(lambda k: sigmoid(k + shift), budget, tol=1e-4, max_iter=40)
    assert len(cal.trace) <= len(slow.trace), (cal.trace, slow.trace)


def test_secant_budget_levels_start_from_the_previous_level():
    # a student whose raw usage overshoots every budget by the same shift (the SmolLM2 run's phase-2 student):
    # once one level has found κ, the next level's first guess after κ = 0 is already close
    shift = 2.0
    usage_at = lambda k: sigmoid(k + shift)  # noqa: E731
    prior, warm, cold = (), 0, 0
    for b in (0.1, 0.2, 0.3, 0.4):
        cal = calibrate_budget(usage_at, b, tol=0.005, max_iter=16, search="secant", prior=prior)
        alone = calibrate_budget(usage_at, b, tol=0.005, max_iter=16, search="secant")
        assert abs(cal.usage - b) <= 0.005 and cal.trace[0][0] == 0.0
        warm, cold, prior = warm + len(cal.trace), cold + len(alone.trace), cal.trace
    assert warm < cold, (warm, cold)


def test_secant_closes_the_bracket_from_both_sides():
    from tw_rl.evaluation.calibration import calibrate_threshold

    # usage flat for most of the knob and steep near its top (a confidence threshold over a confident student):
    # plain regula falsi creeps up from below (the far end never moves: 23 decodes at 0.05); Illinois halves the
    # surviving end's distance and closes in
    for target, most in ((0.05, 10), (0.1, 8)):
        cal = calibrate_threshold(lambda x: x ** 8, target, tol=0.005, max_iter=40, search="secant")
        assert abs(cal.usage - target) <= 0.005 and cal.evaluations <= most, cal.trace
