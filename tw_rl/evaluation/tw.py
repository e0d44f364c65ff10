"""The Training Wheels rows: the trained student deciding its own ``<τ>`` calls at each budget.

- ``tw`` / ``tw_hard_cap``: without / with the inference-time hard cap (SPEC §5), with the student's calibrated
  ``<τ>`` offset of each budget (:mod:`tw_rl.evaluation.calibration`); ``bleu_ci95`` on every ``tw`` row: its
  95 % CI half-width (paired bootstrap, ``eval.bootstrap_samples`` resamples).
- ``tw_uncalibrated`` (when the student is calibrated): the same student with offset 0, ``<τ>`` not masked even at
  b = 0 — the raw student, as it reads its prompt.
- ``phase1_only``: the phase-1 student the same way (when the evaluation is given it).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.outputs import Method, Outputs, run, usages
from tw_rl.evaluation.rows import Context, Plot, Point, RowKind, Setting

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


def training_wheels(model: "TrainedModel", examples: Sequence[Example], budget: float,
                    hard_cap: bool = False, tau_bias: float | None = None, zero_guard: bool = True) -> Outputs:
    """``tau_bias=None``: the student's calibrated ``<τ>`` offset for ``budget``; 0.0 with ``zero_guard=False``:
    the raw student, ``<τ>`` not masked even at b = 0 (whether it obeys by itself)."""
    return Outputs.from_decoded(model.decode(examples, budget, hard_cap=hard_cap, tau_bias=tau_bias,
                                             zero_guard=zero_guard))


def mean_usage(model: "TrainedModel", examples: Sequence[Example], budget: float, bias: float | None,
               batch_size: int) -> float:
    """Mean over ``examples`` of calls ÷ output length, greedy, at ``budget`` with ``<τ>`` offset ``bias`` (None:
    the student's stored offset) — the Training Wheels row of the evaluation, on other inputs."""
    usage = usages(run(partial(training_wheels, model, budget=budget, tau_bias=bias), examples, batch_size))
    return float(np.mean(usage)) if usage else 0.0


class TrainingWheels(RowKind):
    method, key, title = "tw", ("tw",), "**Training Wheels**"
    plot = Plot("Training Wheels", dict(color="C0", marker="o", lw=2.2), annotate="budget", tag="b")

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(training_wheels, ctx.model, budget=at.value)

    def note(self, row: dict, report: dict) -> str:
        b = row["budget"]
        closed = report.get("gap_closed", {}).get(f"{b:g}")
        notes = [f"gap closed {closed:g}"] if closed is not None else []
        if "bleu_ci95" in row:
            notes.append(f"BLEU 95 % CI ±{row['bleu_ci95']:g}")
        offsets = {c["budget"]: c for c in (report.get("calibration") or {}).get("final", [])}
        if b in offsets and b > 0:
            notes.append(f"<τ> offset {offsets[b]['bias']:+.3g} (validation usage {offsets[b]['usage']:g})")
        return "; ".join(notes)


class HardCap(RowKind):
    method, key, title = "tw_hard_cap", ("tw_hard_cap",), "Training Wheels + hard cap"
    plot = Plot("Training Wheels + hard cap", dict(color="C0", marker="o", ls="--", mfc="white", alpha=0.7))

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(training_wheels, ctx.model, budget=at.value, hard_cap=True)


class Uncalibrated(RowKind):
    method, key, title = "tw_uncalibrated", ("tw_uncalibrated",), "Training Wheels, <τ> offset 0"
    keep_outputs, optional = False, True

    def enabled(self, ctx: Context) -> bool:
        return bool(ctx.model.student.tau_bias)

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        return Setting(fields={"zero_guard": False})

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(training_wheels, ctx.model, budget=at.value, tau_bias=0.0, zero_guard=False)


class Phase1Only(RowKind):
    method, key, title = "phase1", ("phase1_only",), "phase 1 only (no RL)"
    keep_outputs, optional, compared, listed_last = False, True, True, True

    def enabled(self, ctx: Context) -> bool:
        return ctx.phase1 is not None

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(training_wheels, ctx.phase1, budget=at.value)
