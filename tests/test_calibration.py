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
