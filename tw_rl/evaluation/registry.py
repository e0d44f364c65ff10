"""Every row kind of the evaluation (:data:`PASSES`), in the order they are decoded — and so the order of
``report.json`` (SPEC §7).

One line per pass: a pass decodes each of its points (budgets, or a kind's own list) in turn, its kinds side by
side at each point. A new baseline is a module with a :class:`~tw_rl.evaluation.rows.RowKind` and one line here;
``report.json``, ``report.md``, the plot and the report's schema follow from the registry.
"""

from __future__ import annotations

from tw_rl.evaluation.alone import StudentAlone, TeacherAlone
from tw_rl.evaluation.fallback import BaseConfidenceFallback, ConfidenceFallback, OracleCaller, RandomCalls
from tw_rl.evaluation.rows import RowKind
from tw_rl.evaluation.speculative import AssistedGeneration, DraftVerify
from tw_rl.evaluation.tw import HardCap, Phase1Only, TrainingWheels, Uncalibrated

TRAINING_WHEELS = TrainingWheels()  # the row every ``compared`` row is tested against, budget by budget

PASSES: tuple[tuple[RowKind, ...], ...] = (
    (StudentAlone(),),
    (TeacherAlone(),),
    (TRAINING_WHEELS,),
    (HardCap(),),
    (Uncalibrated(),),
    (Phase1Only(),),
    (RandomCalls(), ConfidenceFallback(), BaseConfidenceFallback()),  # at each budget, the three side by side
    (AssistedGeneration(),),
    (DraftVerify(),),
    (OracleCaller(),),
)


def kinds() -> tuple[RowKind, ...]:
    """Every kind of :data:`PASSES`, in order."""
    return tuple(kind for side_by_side in PASSES for kind in side_by_side)
