"""Calibration on the validation split: every knob of the evaluation is found here, by one search
(:func:`calibrate_threshold`) on a coordinate ``x ∈ [0, 1]`` along which usage is non-decreasing: bisection (the
default, ``calibration.search=bisect``) or a safeguarded secant search (``secant``, :func:`secant_search`) that
draws a line through the bracket's ends and starts from what the previous budget level found.

**The baselines' knobs** (:func:`calibrate`): the random-call rate, the confidence threshold and the oracle's gain
threshold, each set so that the baseline's validation usage is Training Wheels' validation usage at that budget
(:func:`usage_targets`, decoded greedily with the ``tw`` row's settings), so that the test split chooses no knob.
A calibrated row reports ``usage_target``, ``usage_target_split: "validation"``, its own ``validation_usage`` at the
knob and ``calibration_steps`` (:func:`calibrated_fields`).

**Budget calibration** (:func:`calibrate_student`, :func:`calibrate_run`): one offset ``κ_b`` on the ``<τ>`` logit
per budget level, fitted so that the deployed (greedy) student's mean usage on held-out validation inputs equals
``b`` (SPEC §5; a **[choice]**, docs/design.md). Why this is the Lagrangian, solved where the student is deployed:
with the reward ``r_t − λ_b (c_t − b)`` of SPEC §5 the cost enters the soft-optimal Q-values of ``<τ>`` as ``−λ_b``
(the ``+λ_b b`` part is paid by every action alike and cancels in the policy), so to first order a multiplier acts on
the policy as an offset ``−λ_b/α`` on the ``<τ>`` logit. Phase 2 moves that offset by gradient steps on the student
and overshoots on held-out inputs (docs/results.md: +0.04–0.06 at b = 0.1–0.3). Calibration sets the offset
directly: for every budget level, bisection on ``κ_b`` until the greedy usage on validation data is
``b ± tolerance`` — the dual problem solved for the policy that is actually deployed. The offsets are stored with
the student (``tw_student.json``) and applied by :func:`tw_rl.decoding.decode` whenever the student acts at that
budget (evaluation, ``tw-rl generate``, ``tw_rl.load``); rollouts in phase 2 act with the raw logits. The knob is
searched as ``x ∈ (0, 1)`` with ``κ = logit(x)``; ``x = ½`` is ``κ = 0``, so a student that already obeys a budget
keeps offset 0 after one evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.outputs import Method, run, usages
from tw_rl.evaluation.tw import mean_usage
from tw_rl.rundir import RunDir, atomic_write

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel
    from tw_rl.models.student import Student



# ------------------------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """The result of :func:`calibrate_threshold`: the threshold, the usage it gave, and the usages tried."""

    threshold: float
    usage: float
    trace: list[tuple[float, float]]  # (threshold, usage) per evaluation, in order

    @property
    def evaluations(self) -> int:
        return len(self.trace)


_SATURATION_CHECK = 0.9  # calibrate_threshold decodes x = 1 once bisection, always short, passes this


SEARCHES = ("bisect", "secant")  # calibration.search


@dataclass(frozen=True)
class Scale:
    """Where :func:`secant_search` draws its lines: the knob coordinate through ``knob`` (with its inverse) and the
    usage through ``usage``, both increasing. :data:`LINEAR`: as they are (a random-call rate, whose usage is about
    the rate); :data:`LOGIT`: both as logits (a ``<τ>`` offset ``κ = logit(x)``, whose usage is about
    ``σ(κ + a)``)."""

    knob: Callable[[float], float]
    inverse: Callable[[float], float]
    usage: Callable[[float], float]


def _identity(v: float) -> float:
    return v


_U_MIN = 1e-3  # LOGIT clips usage to [1e-3, 1 − 1e-3]: below one call in a thousand tokens is "none"


def _usage_logit(u: float) -> float:
    u = min(max(u, _U_MIN), 1.0 - _U_MIN)
    return math.log(u / (1.0 - u))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


LINEAR = Scale(_identity, _identity, _identity)
LOGIT = Scale(lambda x: bias_of(x), _sigmoid, _usage_logit)

_SAFEGUARD = 0.02  # secant_search never proposes within this fraction of the bracket's width from either end


def _interpolate(lo: tuple[float, float], hi: tuple[float, float], target: float, scale: Scale) -> float:
    """The ``x`` at which the line through ``lo`` and ``hi`` (``(x, usage)``, ``usage`` below / above ``target``)
    meets ``target`` in ``scale``, kept inside the bracket by :data:`_SAFEGUARD`."""
    (x0, u0), (x1, u1) = lo, hi
    h0, h1, g0, g1, g = scale.knob(x0), scale.knob(x1), scale.usage(u0), scale.usage(u1), scale.usage(target)
    x = scale.inverse(h0 + (g - g0) * (h1 - h0) / (g1 - g0)) if g1 > g0 else (x0 + x1) / 2
    margin = _SAFEGUARD * (x1 - x0)
    return min(max(x, x0 + margin), x1 - margin)


def _secant(a: tuple[float, float], b: tuple[float, float], target: float, scale: Scale, lo: float, hi: float,
            fallback: float) -> float:
    """Where the line through the decoded points ``a`` and ``b`` meets ``target`` in ``scale``, if that is inside
    ``(lo, hi)`` by :data:`_SAFEGUARD`; else ``fallback``."""
    (x0, u0), (x1, u1) = a, b
    g0, g1 = scale.usage(u0), scale.usage(u1)
    if x0 == x1 or g0 == g1:
        return fallback
    h0, h1 = scale.knob(x0), scale.knob(x1)
    x = scale.inverse(h1 + (scale.usage(target) - g1) * (h1 - h0) / (g1 - g0))
    margin = _SAFEGUARD * (hi - lo)
    return x if lo + margin <= x <= hi - margin else fallback


def secant_search(usage_at: Callable[[float], float], target: float, tol: float = 0.01, max_iter: int = 20,
                  first: float | None = None, prior: Sequence[tuple[float, float]] = (), scale: Scale = LINEAR
                  ) -> Calibration:
    """The knob ``x ∈ [0, 1]`` whose usage is ``target ± tol``, by the Illinois variant of regula falsi.

    The bracket starts at ``x = 0`` with usage 0 (never calls) and ``x = 1`` with usage 1 (calls at every step),
    neither decoded: the ends are a prior, replaced by decoded points as they land. Each step decodes where the
    line through the bracket's ends (in ``scale``) meets ``target``, at least :data:`_SAFEGUARD` of the bracket's
    width inside it; when one end survives two steps in a row, its distance to ``target`` is halved (Illinois), so
    the bracket closes from both sides. ``first`` is decoded first (a budget's ``κ = 0``); then, if ``prior`` holds
    ``(x, usage)`` points decoded for a similar function (the previous budget level's), the line through the two
    prior points nearest ``target`` on either side proposes the next ``x`` — a guess only: the bracket holds
    decoded points alone. As :func:`calibrate_threshold`, a method that saturates below ``target`` is found out by
    decoding ``x = 1`` once the proposal passes 0.9 with every decode short; the closest usage seen is returned."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"secant_search: target usage {target} must lie in [0, 1]")
    if target == 0.0:
        return Calibration(0.0, 0.0, [])
    lo, hi = (0.0, 0.0), (1.0, 1.0)  # (x, usage used for the line): decoded points once they land
    hi_decoded, kept, trace = False, 0, []  # kept: −1 / +1 when the last step moved the upper / lower end
    below = [(x, u) for x, u in prior if u < target]
    above = [(x, u) for x, u in prior if u > target]
    guess = None
    if below or above:
        nearest = (max(below, key=lambda p: p[1], default=lo), min(above, key=lambda p: p[1], default=hi))
        guess = _interpolate(*sorted(nearest), target, scale)
    while len(trace) < max_iter:
        if first is not None and not trace:
            x = first
        elif guess is not None and lo[0] < guess < hi[0]:
            x, guess = guess, None
        else:
            guess = None
            x = _interpolate(lo, hi, target, scale)
            if len(trace) >= 2:  # the line through the last two decodes, when it stays inside the bracket (Dekker)
                x = _secant(trace[-2], trace[-1], target, scale, lo[0], hi[0], x)
            if not hi_decoded and x >= _SATURATION_CHECK and all(u < target for _, u in trace):
                x = 1.0
        u = float(usage_at(x))
        trace.append((x, u))
        if abs(u - target) <= tol + 1e-12:
            break
        if x == 1.0 and u < target:  # x = 1 falls short: nothing reaches the target
            break
        if u < target:
            lo = (x, u)
            if kept == +1:  # the upper end survived twice: pull its usage halfway to the target
                hi = (hi[0], target + (hi[1] - target) / 2)
            kept = +1
        else:
            hi, hi_decoded = (x, u), hi_decoded or x == 1.0
            if kept == -1:
                lo = (lo[0], target - (target - lo[1]) / 2)
            kept = -1
    best = min(trace, key=lambda tu: abs(tu[1] - target))
    return Calibration(best[0], best[1], trace)


def calibrate_threshold(usage_at: Callable[[float], float], target: float, tol: float = 0.01,
                        max_iter: int = 20, search: str = "bisect", first: float | None = None,
                        prior: Sequence[tuple[float, float]] = (), scale: Scale = LINEAR) -> Calibration:
    """The knob whose usage is ``target ± tol``: bisection (below), or with ``search="secant"``
    :func:`secant_search` (``first``, ``prior`` and ``scale`` are its; bisection ignores them)."""
    if search == "secant":
        return secant_search(usage_at, target, tol, max_iter, first, prior, scale)
    if search != "bisect":
        raise ValueError(f"calibrate_threshold: search={search!r} is not one of {SEARCHES}")
    return _bisect(usage_at, target, tol, max_iter)


def _bisect(usage_at: Callable[[float], float], target: float, tol: float = 0.01, max_iter: int = 20
            ) -> Calibration:
    """Bisection on ``[0, 1]`` for the confidence threshold (or random-call rate) whose usage is ``target ± tol``.

    ``usage_at(x)`` decodes the validation data with :func:`tw_rl.evaluation.fallback.confidence_fallback` at
    threshold ``x`` (or :func:`tw_rl.evaluation.fallback.random_calls` at rate ``x``, same seed every time) and
    returns the mean usage (calls / output length per sequence, averaged). Usage is non-decreasing in ``x`` up to
    the feedback of calls on later steps, so bisection converges in practice; if ``tol`` is not reached in
    ``max_iter`` evaluations the closest value seen is returned (check :attr:`Calibration.usage`). ``target = 0``
    gives 0 (never call) without decoding.

    A method that cannot reach the target (the oracle caller calls only where the student is wrong) is found
    out early: once every step so far fell short and bisection nears ``x = 1``, ``x = 1`` itself is decoded, and
    if even it falls short the search stops there (the closest reachable usage) instead of halving toward it.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"calibrate_threshold: target usage {target} must lie in [0, 1]")
    if target == 0.0:
        return Calibration(0.0, 0.0, [])
    lo, hi, trace, top_checked = 0.0, 1.0, [], False
    while len(trace) < max_iter:
        mid = (lo + hi) / 2
        u = float(usage_at(mid))
        trace.append((mid, u))
        if abs(u - target) <= tol + 1e-12:  # rounding of u must not cost the answer
            break
        lo, hi = (mid, hi) if u < target else (lo, mid)
        if hi == 1.0 and lo >= _SATURATION_CHECK and not top_checked and len(trace) < max_iter:
            top_checked = True
            top = float(usage_at(1.0))
            trace.append((1.0, top))
            if top <= target + tol + 1e-12:  # x = 1 reaches the target, or nothing does: stop at x = 1
                break
    best = min(trace, key=lambda tu: abs(tu[1] - target))
    return Calibration(best[0], best[1], trace)


# ------------------------------------------------------------------------------------------------------------------
# the baselines' knobs
# ------------------------------------------------------------------------------------------------------------------
_NO_VALIDATION = ("calibrating a baseline to the Training Wheels usage needs validation examples "
                  "(data.validation_split); or set eval.baselines=false")
# the fields a row calibrated at a budget has (report schema): its budget and calibrated_fields()
CALIBRATED = ("budget", "validation_usage", "usage_target", "usage_target_split", "calibration_steps")


def usage_targets(model: "TrainedModel", validation: Sequence[Example], budgets: Sequence[float]
                  ) -> dict[float, float]:
    """Training Wheels' mean usage on ``validation`` at each budget (greedy, the ``tw`` row's settings: the
    calibrated ``<τ>`` offset, no hard cap): the usage every baseline is calibrated to, so that the test split
    chooses no baseline's knob."""
    if not validation and any(b != 0 for b in budgets):  # at b = 0 the student never calls (TrainedModel.decode)
        raise ValueError(_NO_VALIDATION)
    return {b: round(mean_usage(model, validation, b, None, model.cfg.eval.batch_size), 4) for b in budgets}


def calibrate(make: Callable[[float], Method], validation: Sequence[Example], target: float, batch_size: int,
              tol: float = 0.01, max_iter: int = 20, search: str = "bisect",
              prior: Sequence[tuple[float, float]] = ()) -> Calibration:
    """The knob ``x ∈ [0, 1]`` (a random-call rate, a confidence threshold) at which the method ``make(x)`` has
    mean usage ``target ± tol`` on ``validation`` (:func:`calibrate_threshold`'s ``search``, at most ``max_iter``
    decodes; the secant search's first guess from ``prior``, ``(x, usage)`` decoded at another budget)."""
    if target > 0 and not validation:
        raise ValueError(_NO_VALIDATION)

    def usage_at(x: float) -> float:
        return float(np.mean(usages(run(make(x), validation, batch_size))))

    return calibrate_threshold(usage_at, target, tol, max_iter, search, prior=prior)


def calibrated_fields(target: float, cal: Calibration) -> dict:
    """The fields every calibrated row carries (:data:`CALIBRATED`, the budget aside)."""
    return {"validation_usage": round(cal.usage, 4), "calibration_steps": cal.evaluations, "usage_target": target,
            "usage_target_split": "validation"}


# ------------------------------------------------------------------------------------------------------------------
# budget calibration: the <τ> offsets
# ------------------------------------------------------------------------------------------------------------------
_X_MIN = 1e-6  # |κ| ≤ logit(1 − 1e-6) ≈ 13.8: beyond that the offset has switched <τ> fully on or off


def bias_of(x: float) -> float:
    """``κ = logit(x)``, the ``<τ>`` logit offset at search coordinate ``x ∈ (0, 1)``."""
    x = min(max(x, _X_MIN), 1.0 - _X_MIN)
    return math.log(x / (1.0 - x))


@dataclass
class BudgetCalibration:
    """The fitted offset of one budget level and how it was found."""

    budget: float
    bias: float  # κ_b, added to the <τ> logit
    usage_before: float  # validation usage with κ = 0 (the raw student)
    usage: float  # validation usage with κ_b
    trace: list[tuple[float, float]]  # (κ, usage) per evaluation, in order

    def as_dict(self) -> dict:
        return {"budget": self.budget, "bias": round(self.bias, 6), "usage_before": round(self.usage_before, 4),
                "usage": round(self.usage, 4), "evaluations": len(self.trace),
                "trace": [[round(k, 4), round(u, 4)] for k, u in self.trace]}


def calibrate_budget(usage_at: Callable[[float], float], budget: float, tol: float, max_iter: int,
                     search: str = "bisect", prior: Sequence[tuple[float, float]] = ()) -> BudgetCalibration:
    """The offset ``κ`` at which ``usage_at(κ)`` (mean greedy usage on validation data) is ``budget ± tol``; the
    closest value seen when ``max_iter`` evaluations do not reach it. ``budget = 0`` needs no offset: the student
    never calls at b = 0 (``<τ>`` is masked there). Both searches decode ``κ = 0`` first (``usage_before``);
    ``search="secant"`` then draws its lines in logits (:data:`LOGIT`) and takes its first guess from ``prior``,
    ``(κ, usage)`` points decoded at another budget level (the previous one's :attr:`BudgetCalibration.trace`)."""
    if budget == 0.0:
        return BudgetCalibration(0.0, 0.0, 0.0, 0.0, [])
    trace: list[tuple[float, float]] = []

    def at(x: float) -> float:
        k = bias_of(x)
        u = float(usage_at(k))
        trace.append((k, u))
        return u

    cal = calibrate_threshold(at, budget, tol, max_iter, search, first=0.5,
                              prior=[(_sigmoid(k), u) for k, u in prior], scale=LOGIT)
    return BudgetCalibration(budget, bias_of(cal.threshold), trace[0][1], cal.usage, trace)


def calibrate_student(model: "TrainedModel", validation: Sequence[Example], budgets: Sequence[float] | None = None,
                      tol: float = 0.005, max_iter: int = 16, desc: str = "calibration",
                      progress: bool = True, search: str | None = None) -> list[BudgetCalibration]:
    """Fit ``κ_b`` for every budget level (default: the grid) on ``validation`` and store the offsets in
    ``model.student.tau_bias`` (save the student afterwards to keep them). Shows a progress bar (one step per
    budget, the budget and its decodes so far beside it) unless ``progress`` is false. Raises ValueError without
    validation inputs. ``search``: :func:`calibrate_budget`'s (default ``calibration.search``); the secant search
    starts each level from the previous level's decodes."""
    budgets = list(model.budgets if budgets is None else budgets)
    search = model.cfg.calibration.search if search is None else search
    if any(b > 0 for b in budgets) and not validation:
        raise ValueError("budget calibration needs validation inputs (data.validation_split); "
                         "or set calibration.enabled=false")
    bs = model.cfg.eval.batch_size
    results = []
    with tqdm(total=len(budgets), desc=desc, unit="budget", disable=not progress) as bar:
        for b in budgets:
            decodes = 0

            def usage_at(k: float, b: float = b) -> float:
                nonlocal decodes
                decodes += 1
                bar.set_postfix_str(f"b={b:g} decode {decodes}")
                return mean_usage(model, validation, b, k, bs)

            prior = results[-1].trace if results else ()
            results.append(calibrate_budget(usage_at, b, tol, max_iter, search, prior))
            bar.update(1)
    model.student.tau_bias = {r.budget: r.bias for r in results if r.budget > 0}
    return results


def calibrate_run(model: "TrainedModel", students: dict[str, tuple["Student", Path]], run_dir: Path | None = None
                  ) -> dict:
    """Calibrate each student of a run (``{"final": (student, models/final), "phase1": (student, models/phase1)}``)
    with ``model``'s teacher on the run's validation split, in place, and store its offsets in the directory's
    ``tw_student.json``. Returns ``{"split", "examples", name: [BudgetCalibration.as_dict(), ...]}``, also written to
    ``run_dir/calibration.json`` when given."""
    ccfg = model.cfg.calibration
    validation = model.load_examples(model.cfg.data.validation_split, ccfg.max_examples)
    out: dict[str, list[dict]] = {}
    fitted = {name: [r.as_dict() for r in calibrate_student(model.with_student(student), validation,
                                                              tol=ccfg.tolerance, max_iter=ccfg.max_iter,
                                                              desc=f"calibration ({name})")]
              for name, (student, _) in students.items()}
    for name, (student, directory) in students.items():  # written only once every student is calibrated
        student.save_meta(directory)
        out[name] = fitted[name]
    result = {"split": model.cfg.data.validation_split, "examples": len(validation), **out}
    if run_dir is not None:
        from tw_rl.manifest import Manifest

        manifest = Manifest(run_dir)
        for _, directory in students.values():  # the offsets are part of the students' files now
            manifest.refresh_path(directory)
        path = atomic_write(RunDir(run_dir).calibration, json.dumps(result, indent=1))
        manifest.record("calibration", path, {"calibration": ccfg, "data.validation_split": result["split"]},
                        {name: manifest.id(f"{name}_student") for name in students})
    return result
