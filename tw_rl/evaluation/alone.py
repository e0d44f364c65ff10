"""The two ends of the scale, each greedy on the bare source in tw-rl's own decoding loop — the loop that decodes
and times Training Wheels:

- ``student_only``: the phase-0 student alone (:meth:`TrainedModel.decode_base` without a rule, ``<τ>`` never
  allowed);
- ``teacher_only``: the teacher alone (:func:`tw_rl.decoding.decode_teacher`, one teacher position per step; usage
  and calls per token 1).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Sequence

from tw_rl.decoding import decode_teacher
from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.outputs import Method, Outputs
from tw_rl.evaluation.quality import main_metric
from tw_rl.evaluation.rows import LOOP_TEACHER, Context, Plot, Point, RowKind
from tw_rl.examples import pad_batch

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


def student_alone(model: "TrainedModel", examples: Sequence[Example]) -> Outputs:
    """The phase-0 student, greedy on the bare source, in :func:`tw_rl.decoding.decode` (``<τ>`` masked, no rule:
    :meth:`TrainedModel.decode_base`) — the loop Training Wheels is decoded and timed with."""
    return Outputs.from_decoded(model.decode_base(examples))


def teacher_alone(model: "TrainedModel", examples: Sequence[Example]) -> Outputs:
    """The teacher, greedy on the bare source, in :func:`tw_rl.decoding.decode_teacher` (the same KV-cached loop,
    one teacher position per step; :meth:`Teacher.generate` goes through Hugging Face ``generate``)."""
    teacher = model.teacher
    ids, mask = pad_batch([e.teacher_src for e in examples], model.pad_id, teacher.device)
    return Outputs.from_decoded(decode_teacher(teacher.model, ids, mask, max_len=model.max_len, eos_id=model.eos_id,
                                               vocab_size=teacher.vocab_size, start_id=teacher.start_id,
                                               pad_id=model.pad_id))


class StudentAlone(RowKind):
    method, key, title = "student", ("student_only",), "student alone"
    single, per_budget = True, False
    plot = Plot("student alone", dict(color="k", marker="s"), curve=False)

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(student_alone, ctx.model)


class TeacherAlone(RowKind):
    method, key, title = "teacher", ("teacher_only",), "teacher alone"
    single, per_budget, loop = True, False, LOOP_TEACHER
    plot = Plot("teacher alone", dict(color="k", marker="*", ms=14), curve=False)

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(teacher_alone, ctx.model)


def ends(ctx: Context) -> tuple[float, float]:
    """``(Q_student, Q_teacher)`` of the student-alone and teacher-alone rows, Q = the task's main metric: the
    ends of the gap Training Wheels closes (:func:`tw_rl.evaluation.quality.gap_of`)."""
    metric = main_metric(ctx.task)
    return ctx.rows[(StudentAlone.method, None)][metric], ctx.rows[(TeacherAlone.method, None)][metric]
