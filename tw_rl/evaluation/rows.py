"""A row kind: one family of rows of ``report.json`` (the registry, :data:`tw_rl.evaluation.registry.PASSES`,
lists them all).

A kind knows where its rows go in the report (``key``), at which points it is decoded (every budget, once, or a
list of its own such as speculative decoding's lenience values), how it finds its knob on the validation split
(:meth:`RowKind.calibrate`), how it decodes a batch at that knob (:meth:`RowKind.decoder`), and how it is described
in ``report.md`` and drawn in the plot. The driver (:func:`tw_rl.evaluation.driver.evaluate`) does the rest alike for
every kind: it decodes the test split, scores it (:func:`tw_rl.evaluation.outputs.score`), times it, and compares
it with Training Wheels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Sequence

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.outputs import Method, Outputs

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel
    from tw_rl.config import Config

# the ``loop`` of a row: the decoding loop that decoded and timed it
LOOP = "tw_rl.decoding.decode"  # the student's KV-cached loop
LOOP_TEACHER = "tw_rl.decoding.decode_teacher"
LOOP_HF_ASSISTED = "transformers.generate(assistant_model=...)"
LOOP_DRAFT_VERIFY = "tw_rl.baselines.speculative_greedy"  # the report's name of speculative.speculative_greedy

RowKey = tuple[str, "float | None"]  # (method, budget): one row of a report


class Point(NamedTuple):
    """Where a kind decodes one row: the ``index``-th of its :meth:`RowKind.points`, at ``value`` (a budget, or the
    kind's own knob, e.g. a lenience; None for a kind with a single row)."""

    index: int
    value: float | None


@dataclass(frozen=True)
class Setting:
    """A row's calibrated knob (what its decoder runs at, unrounded) and what the row records about it."""

    knob: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plot:
    """How a kind appears in ``quality_vs_cost.png``: a curve through its rows, or one marker per row."""

    label: str
    style: dict[str, Any]
    curve: bool = True
    annotate: str = ""  # the row field written beside each point, as f"{tag}={value:g}" ("b=0.2", "l=0.5")
    tag: str = ""
    stagger: bool = False  # labels alternately above and below (points that sit close together)


class _Omitted:
    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Any = _Omitted()  # RowKind.off: the report has no key for a kind that is not enabled


@dataclass
class Context:
    """What the row kinds read: the models, the splits, and what the evaluation has found so far."""

    model: "TrainedModel"
    test: list[Example]
    validation: Sequence[Example]
    budgets: list[float]
    task: str
    phase1: "TrainedModel | None" = None  # the run with the phase-1 student
    targets: dict[float, float] | None = None  # Training Wheels' validation usage per budget (needs_target kinds)
    rows: dict[RowKey, dict] = field(default_factory=dict)  # the rows decoded so far, their outputs and text
    outputs: dict[RowKey, Outputs] = field(default_factory=dict)
    hyps: dict[RowKey, list[str]] = field(default_factory=dict)
    traces: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # each method's last calibration

    @property
    def cfg(self) -> "Config":
        return self.model.cfg


class RowKind:
    """One family of rows. Subclasses set the class attributes and :meth:`decoder`; the rest has defaults."""

    method: ClassVar[str]  # the rows' ``method``
    key: ClassVar[tuple[str, ...]]  # where the rows go in report.json, e.g. ("baselines", "random")
    title: ClassVar[str]  # the rows' name in report.md
    single: ClassVar[bool] = False  # the key holds one row (not a list of rows)
    per_budget: ClassVar[bool] = True  # one row per budget (else: per point of :meth:`points`, no ``budget``)
    loop: ClassVar[str] = LOOP
    timed: ClassVar[bool] = True  # latency and throughput measured (else they stay None)
    sequential: ClassVar[bool] = False  # decodes a batch one input after another (tw_rl.evaluation.timing)
    keep_outputs: ClassVar[bool] = True  # its outputs go to outputs.jsonl
    compared: ClassVar[bool] = False  # ``vs_tw``: a paired bootstrap test against Training Wheels at its budget
    baseline: ClassVar[bool] = False  # decoded only with eval.baselines
    needs_target: ClassVar[bool] = False  # calibrated to Training Wheels' validation usage (Context.targets)
    listed_last: ClassVar[bool] = False  # report.md lists it after every other row of its budget
    optional: ClassVar[bool] = False  # a report may lack its key (not enabled, and no ``off`` value)
    off: ClassVar[Any] = OMITTED  # what report.json holds at ``key`` when the kind is not enabled
    schema: ClassVar[dict[str, Any]] = {}  # JSON schema of the row fields the kind adds (report.report_schema)
    plot: ClassVar[Plot | None] = None

    def enabled(self, ctx: Context) -> bool:
        return not self.baseline or ctx.cfg.eval.baselines

    def points(self, ctx: Context) -> Sequence[float | None]:
        return ctx.budgets if self.per_budget else [None]

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        """The knob on ``ctx.validation`` (default: none to find)."""
        return Setting()

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        """A fresh method decoding one batch at ``knob`` (fresh: its seeded generator starts anew)."""
        raise NotImplementedError

    def finish(self, ctx: Context, row: dict, outs: Outputs) -> None:
        """Fields the row gets from its outputs after scoring (default: none)."""

    def note(self, row: dict, report: dict) -> str:
        """The row's note in report.md (``vs_tw`` is added to every note)."""
        return ""
