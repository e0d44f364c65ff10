"""Rows that spend teacher tokens without a learned call policy, each at the usage Training Wheels has on the
validation split at that budget (SPEC §7; the knob calibrated by :func:`tw_rl.evaluation.calibration.calibrate`).

- ``baselines.random`` (:func:`random_calls`): the trained student at the same budget prompt, its own ``<τ>``
  masked, ``<τ>`` forced at random steps. **[choice]** Each live row calls at each step with probability ``rate``,
  independently (Bernoulli per step, from a seeded ``torch.Generator``): a fixed number of positions per row would
  need the length before it is decoded. Calls change where outputs end, so the rate that matches a usage is
  calibrated like the threshold.
- ``baselines.confidence`` (:func:`confidence_fallback`, as in Big Little Decoder): the same student calling when its
  top probability over ``V`` (``<τ>`` excluded, renormalised) is below a threshold. ``baselines.confidence_base``:
  the same rule on the phase-0 student (bare source, no Training Wheels training at all): Big Little Decoder's
  fallback on the plain small model — the simplest way to spend the same teacher tokens.
- ``oracle`` (top level; ``deployable: false``; :class:`OracleCalls`): the ``confidence`` row's student and setting,
  calling where its greedy token differs from the teacher's greedy token ``w*`` for the same prefix and the
  teacher's log-prob gain ``log π_T(w*) − log π_T(student's token)`` exceeds a threshold. It reads the teacher's
  distribution at every step (:class:`tw_rl.decoding.TeacherSteps`); those look-ups are not counted (usage and
  calls/token count its ``<τ>`` only), and the row is not timed (not an operating point anyone can deploy).
  ``gap_closed`` on the row.

Every row here has ``vs_tw``: its BLEU minus the Training Wheels row's at the same budget and the p-value of a
paired bootstrap test of that difference. Rules are :data:`tw_rl.decoding.TauRule` callables (the oracle: a
:class:`tw_rl.decoding.PrefixRule`) for ``decode(..., tau_rule=...)``, decoded with ``allow_tau=False`` so that only
the rule decides when the teacher is called.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from tw_rl.decoding import TauRule, TeacherSteps
from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.alone import ends
from tw_rl.evaluation.calibration import CALIBRATED, Calibration, calibrate, calibrated_fields
from tw_rl.evaluation.outputs import Method, Outputs
from tw_rl.evaluation.quality import gap_of, main_metric
from tw_rl.evaluation.rows import Context, Plot, Point, RowKind, Setting
from tw_rl.examples import pad_batch

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


# ------------------------------------------------------------------------------------------------------------------
# the rules
# ------------------------------------------------------------------------------------------------------------------
def random_calls(rate: float, generator: torch.Generator) -> TauRule:
    """Force ``<τ>`` on each row at each step with probability ``rate`` (drawn from ``generator``, on the CPU)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"random_calls: rate={rate} must lie in [0, 1]")

    def rule(t: int, logits: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
        return (torch.rand(logits.shape[0], generator=generator) < rate).to(logits.device)

    return rule


def confidence_fallback(threshold: float, tau_id: int) -> TauRule:
    """Force ``<τ>`` where ``max_{v ∈ V} softmax(logits[:, :tau_id])_v < threshold`` (``<τ>`` excluded)."""

    def rule(t: int, logits: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[:, :tau_id].float(), dim=-1).amax(dim=-1) < threshold

    return rule


class OracleCalls:
    """Not deployable: force ``<τ>`` where the student's greedy token ``v = argmax_{V} logits`` differs from the
    teacher's greedy token ``w* = argmax π_T(· | x, X_out)`` and ``gain = log π_T(w*) − log π_T(v) > threshold``.

    A :class:`tw_rl.decoding.PrefixRule` for one batch: ``steps`` (a fresh :class:`tw_rl.decoding.TeacherSteps` on
    the batch's bare sources, rows in the batch's order) follows the decoded prefix one token per step, so every
    step costs one KV-cached teacher position per row on top of the student's; those look-ups count nothing. At
    ``threshold = −inf`` the rule calls at every disagreement, so the output is the teacher's greedy output; at
    ``+inf`` it never calls. Lowering the threshold calls where the teacher gains most first. ``gains`` keeps, per
    step, ``(student token [B], teacher token [B], gain [B])`` for inspection.
    """

    reads_prefix = True

    def __init__(self, threshold: float, tau_id: int, steps: TeacherSteps, keep_gains: bool = False):
        self.threshold, self.tau_id, self.steps = float(threshold), int(tau_id), steps
        self.gains: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if keep_gains else None

    def __call__(self, t: int, logits: torch.Tensor, calls: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if t != self.steps.steps:
            raise ValueError(f"OracleCalls: step {t}, but the teacher has been fed {self.steps.steps} positions: "
                             "use one rule per decode")
        logp = self.steps.step(None if t == 0 else prefix[:, -1])  # [B, |V|]
        own = logits[:, :self.tau_id].argmax(dim=-1).to(logp.device)
        best, w = logp.max(dim=-1)
        gain = best - logp.gather(1, own[:, None]).squeeze(1)
        if self.gains is not None:
            self.gains.append((own.cpu(), w.cpu(), gain.cpu()))
        return ((own != w) & (gain > self.threshold)).to(logits.device)


def oracle_threshold(x: float) -> float:
    """The gain threshold ``−log x`` for the calibration knob ``x ∈ [0, 1]``
    (:func:`tw_rl.evaluation.calibration.calibrate_threshold` searches ``[0, 1]`` with usage non-decreasing in
    ``x``): the oracle calls where ``π_T(v) / π_T(w*) < x``; 0: never (``+inf``); 1: at every disagreement with a
    positive gain."""
    return math.inf if x <= 0.0 else -math.log(x)


# ------------------------------------------------------------------------------------------------------------------
# the methods: each decodes one batch
# ------------------------------------------------------------------------------------------------------------------
def random_baseline(model: "TrainedModel", budget: float, rate: float, seed: int) -> Method:
    """A fresh seeded generator per method, so the quality pass is reproducible."""
    rule = random_calls(rate, torch.Generator().manual_seed(seed))
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget, rule=rule))


def confidence_baseline(model: "TrainedModel", budget: float, threshold: float) -> Method:
    rule = confidence_fallback(threshold, model.student.tau_id)
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget, rule=rule))


def base_confidence_baseline(model: "TrainedModel", threshold: float) -> Method:
    """The phase-0 student (no Training Wheels training, bare source) calling the teacher when its top-token
    probability is below ``threshold``: Big Little Decoder's fallback on the plain small model."""
    rule = confidence_fallback(threshold, model.base_as_student.tau_id)
    return lambda examples: Outputs.from_decoded(model.decode_base(examples, rule=rule))


def oracle_rule(model: "TrainedModel", examples: Sequence[Example], threshold: float) -> OracleCalls:
    """:class:`OracleCalls` for one batch: the teacher stepped along the batch's bare sources."""
    teacher = model.teacher
    ids, mask = pad_batch([e.teacher_src for e in examples], model.pad_id, teacher.device)
    steps = TeacherSteps(teacher.model, ids, mask, teacher.vocab_size, teacher.start_id)
    return OracleCalls(threshold, model.student.tau_id, steps)


def oracle_baseline(model: "TrainedModel", budget: float, threshold: float) -> Method:
    """The trained student at ``budget``'s prompt, its own ``<τ>`` masked (as :func:`confidence_baseline`), calling
    where the oracle's gain exceeds ``threshold`` (a fresh rule per batch: it follows that batch's prefixes)."""
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget,
                                                              rule=oracle_rule(model, examples, threshold)))


def calibrate_confidence(model: "TrainedModel", validation: Sequence[Example], budget: float, target: float,
                         tol: float = 0.01) -> Calibration:
    """The confidence threshold whose mean usage on ``validation`` is ``target ± tol``."""
    return calibrate(lambda th: confidence_baseline(model, budget, th), validation, target,
                     model.cfg.eval.batch_size, tol)


# ------------------------------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------------------------------
def _calibrated_setting(kind: RowKind, ctx: Context, at: Point, fields: Callable[[Calibration, float], dict]
                        ) -> Setting:
    """The knob ``x ∈ [0, 1]`` at which ``kind`` has Training Wheels' validation usage at ``at``'s budget, and the
    row's ``fields(calibration, target)``."""
    target = ctx.targets[at.value]
    ecfg = ctx.cfg.eval
    cal = calibrate(lambda x: kind.decoder(ctx, at, x), ctx.validation, target, ecfg.batch_size,
                    ecfg.baseline_tolerance, ecfg.baseline_max_iter, ctx.cfg.calibration.search,
                    prior=ctx.traces.get(kind.method, ()))
    ctx.traces[kind.method] = cal.trace  # the next budget's secant search starts from these decodes
    return Setting(cal.threshold, fields(cal, target))


def _knob(name: str) -> Callable[[Calibration, float], dict]:
    """The fields of a row whose knob is recorded as ``name`` (rounded; the decoder runs at the unrounded value)."""
    return lambda cal, target: {name: round(cal.threshold, 6), **calibrated_fields(target, cal)}


def _reached(row: dict) -> str:
    """What a calibrated row reached on validation, and its target (report.md)."""
    target = row.get("usage_target")
    split = row.get("usage_target_split", "test")
    return f"validation usage {row['validation_usage']:g}" + (
        f", target {target:g} = Training Wheels' {split} usage" if target is not None else "")


def _knob_note(row: dict, name: str) -> str:
    return f"{name} {row[name]:.4g} ({_reached(row)})"


class _CalibratedKnob(RowKind):
    """A deployable baseline with one knob (``knob``) bisected on validation to Training Wheels' usage there."""

    knob = ""
    baseline = needs_target = compared = True
    off = []

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        return _calibrated_setting(self, ctx, at, _knob(self.knob))

    def note(self, row: dict, report: dict) -> str:
        return _knob_note(row, self.knob)


class RandomCalls(_CalibratedKnob):
    method, key, title, knob = "random", ("baselines", "random"), "random calls", "rate"
    schema = {"required": ["rate", *CALIBRATED]}
    plot = Plot("random calls (same usage)", dict(color="C3", marker="x", ls=":"))

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return random_baseline(ctx.model, at.value, knob, ctx.cfg.seed + 7919 * (at.index + 1))


class ConfidenceFallback(_CalibratedKnob):
    method, key, title, knob = "confidence", ("baselines", "confidence"), "confidence fallback", "threshold"
    schema = {"required": ["threshold", *CALIBRATED]}
    plot = Plot("confidence fallback (same usage)", dict(color="C2", marker="^", ls="-."))

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return confidence_baseline(ctx.model, at.value, knob)


class BaseConfidenceFallback(RowKind):
    method, key, title = "confidence_base", ("baselines", "confidence_base"), "confidence fallback, phase-0 student"
    baseline = needs_target = compared = optional = True
    schema = {"required": ["threshold", *CALIBRATED]}
    plot = Plot("confidence fallback, phase-0 student", dict(color="C4", marker="v", ls="-."))

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        return _calibrated_setting(self, ctx, at, lambda cal, target: {**_knob("threshold")(cal, target),
                                                                        "student": "phase-0"})

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return base_confidence_baseline(ctx.model, knob)

    def note(self, row: dict, report: dict) -> str:
        return _knob_note(row, "threshold")


_ORACLE_NOTE = ("calls where the student's greedy token differs from the teacher's greedy token and "
                "log π_T(w*) − log π_T(student's token) > threshold; the teacher's distribution is read at every "
                "step and those look-ups are not counted as calls; not timed")


def _oracle_fields(cal: Calibration, target: float) -> dict:
    threshold = oracle_threshold(cal.threshold)
    return {"threshold": round(threshold, 6) if math.isfinite(threshold) else None,
            "threshold_ratio": round(cal.threshold, 8), **calibrated_fields(target, cal), "deployable": False,
            "note": _ORACLE_NOTE}


class OracleCaller(RowKind):
    method, key, title = "oracle", ("oracle",), "oracle caller (not deployable)"
    baseline = needs_target = compared = optional = True
    timed = False
    schema = {"required": ["threshold", "threshold_ratio", "deployable", "gap_closed", *CALIBRATED],
              "properties": {"deployable": {"const": False}, "threshold": {"type": ["number", "null"], "minimum": 0},
                             "gap_closed": {"type": ["number", "null"]}}}
    plot = Plot("oracle caller (not deployable)", dict(color="C5", marker="P", ls=":"))

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        # the knob x ∈ [0, 1] is exp(−threshold): usage rises with x, as calibrate_threshold expects
        return _calibrated_setting(self, ctx, at, _oracle_fields)

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return oracle_baseline(ctx.model, at.value, oracle_threshold(knob))

    def finish(self, ctx: Context, row: dict, outs: Outputs) -> None:
        row["gap_closed"] = gap_of(row[main_metric(ctx.task)], *ends(ctx))

    def note(self, row: dict, report: dict) -> str:
        gain = "never calls" if row["threshold"] is None else f"gain threshold {row['threshold']:.4g} nats"
        closed = f"; gap closed {row['gap_closed']:g}" if row.get("gap_closed") is not None else ""
        return (f"calls where its token ≠ the teacher's, {gain} ({_reached(row)}); reads the teacher at every "
                f"step (not counted), not timed{closed}")
