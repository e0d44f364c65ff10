"""The evaluation of a trained run (SPEC §7): every row kind of the registry decoded on the test split, pass by
pass; then every compared row tested against Training Wheels; then every row timed together; then the report."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation import registry
from tw_rl.evaluation.alone import ends
from tw_rl.evaluation.calibration import usage_targets
from tw_rl.evaluation.outputs import Method, detok, records, run, score
from tw_rl.evaluation.quality import MATCH_METRIC, gap_closed, main_metric, matches, paired_bootstrap, \
    paired_bootstrap_matches, signatures
from tw_rl.evaluation.rows import OMITTED, Context, Point, RowKind
from tw_rl.evaluation.task import resolve_task
from tw_rl.evaluation.timing import timings
from tw_rl.models.student import Student

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


def evaluate(model: "TrainedModel", test: Sequence[Example], validation: Sequence[Example] = (), *,
             budgets: Sequence[float] | None = None, phase1_student: Student | None = None, split: str = "test",
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Every enabled row kind of the registry on ``test`` at ``budgets`` (default: the trained grid), the
    baselines' knobs calibrated on ``validation`` to Training Wheels' usage there. Returns the report
    (``report.json``) and the ``outputs.jsonl`` records."""
    cfg = model.cfg
    ctx = Context(model, list(test), validation,
                  [model.check_budget(b) for b in (cfg.budgets if budgets is None else budgets)], resolve_task(cfg),
                  phase1=model.with_student(phase1_student) if phase1_student is not None else None)
    passes = [kinds for kinds in ([k for k in p if k.enabled(ctx)] for p in registry.PASSES) if kinds]
    n_rows = sum(len(kind.points(ctx)) for kinds in passes for kind in kinds)
    with tqdm(total=n_rows + 1, desc="eval", unit="step", disable=not progress) as bar:
        decoding = _Decoding(ctx, bar)
        for kinds in passes:
            if ctx.targets is None and any(kind.needs_target for kind in kinds):
                bar.set_postfix_str("Training Wheels on validation")
                ctx.targets = usage_targets(model, validation, ctx.budgets)
            for i, value in enumerate(kinds[0].points(ctx)):
                for kind in kinds:
                    decoding.row(kind, Point(i, value))
        if cfg.eval.bootstrap_samples > 0:
            compare_to_tw(ctx, cfg.eval.bootstrap_samples)
        decoding.time()
    report = assemble(ctx, decoding.by_kind, split)
    main = main_metric(ctx.task)
    report["gap_closed"] = gap_closed(decoding.by_kind.get(registry.TRAINING_WHEELS, []), *ends(ctx), main)
    report["signatures"] = signatures(ctx.task)
    report["models"] = describe_models(model)
    report["latency"] = {"batch_size": 1, "examples": min(len(ctx.test), cfg.eval.latency_examples),
                         "repeats": cfg.eval.latency_repeats, "throughput_batch_size": cfg.eval.throughput_batch_size,
                         "device": str(model.device), "torch_threads": torch.get_num_threads()}
    return report, decoding.records


def describe_models(model: "TrainedModel") -> dict[str, Any]:
    """The report's ``models``: where the teacher and the student came from (a given model's source, or how phase 0
    built it), their classes, and their parameter counts (distinct tensors, tied embeddings once; the student's with
    its ``<τ>`` head)."""
    from tw_rl.models.factory import count_parameters, source_name

    def source(role: str) -> str:
        m = getattr(model.cfg, role)
        if m.name_or_path:
            return source_name(m.name_or_path, m.gguf_file)
        if role == "student" and m.init_layers:
            return f"phase 0: the teacher's layers {list(m.init_layers)}, then trained"
        a = m.arch
        return f"phase 0: {a.model_type} d_model={a.d_model} d_ff={a.d_ff} heads={a.num_heads}, trained from scratch"

    teacher, student = model.teacher.model, model.student
    return {"teacher": f"{type(teacher).__name__} ({source('teacher')})",
            "student": f"{type(student.model).__name__} ({source('student')})",
            "teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student)}


class _Decoding:
    """Decodes the test split with one row kind at one point and scores it (:meth:`row`); then measures latency
    and throughput of every timed row together (:meth:`time`, :func:`tw_rl.evaluation.timing.timings`)."""

    def __init__(self, ctx: Context, bar: tqdm):
        self.ctx, self.bar = ctx, bar
        self.by_kind: dict[RowKind, list[dict]] = {}  # every kind's rows, in the order decoded
        self.records: list[dict] = []  # outputs.jsonl
        self.jobs: list[tuple[dict, Callable[[], Method], bool]] = []  # (row, make, sequential) of the timed rows

    def row(self, kind: RowKind, at: Point) -> None:
        ctx, tokenizer = self.ctx, self.ctx.model.tokenizer
        budget = at.value if kind.per_budget else None
        self.bar.set_postfix_str(kind.method + (f" b={budget:g}" if budget is not None else ""))
        setting = kind.calibrate(ctx, at)

        def make() -> Method:  # a fresh method per call: the quality pass and the timing start alike
            return kind.decoder(ctx, at, setting.knob)

        outs = run(make(), ctx.test, ctx.cfg.eval.batch_size)
        hyps = detok(tokenizer, outs.tokens)
        row = {"method": kind.method, **({"budget": budget} if budget is not None else {}),
               **score(outs, ctx.test, tokenizer, ctx.task, hyps), **setting.fields, "loop": kind.loop,
               "latency_ms": None, "throughput_seq_s": None}
        kind.finish(ctx, row, outs)
        key = (kind.method, budget)
        ctx.rows[key], ctx.outputs[key], ctx.hyps[key] = row, outs, hyps
        self.by_kind.setdefault(kind, []).append(row)
        if kind.timed:
            self.jobs.append((row, make, kind.sequential))
        if kind.keep_outputs:
            self.records += records(kind.method, budget, ctx.test, outs, tokenizer, hyps)
        self.bar.update()

    def time(self) -> None:
        """Fill in ``latency_ms`` and ``throughput_seq_s`` of every timed row."""
        ecfg = self.ctx.cfg.eval
        self.bar.set_postfix_str("latency and throughput")
        measured = timings([make for _, make, _ in self.jobs], self.ctx.model, self.ctx.test[:ecfg.latency_examples],
                           ecfg.latency_repeats, ecfg.throughput_batch_size, [seq for _, _, seq in self.jobs])
        for (row, _, _), (lat, thr) in zip(self.jobs, measured):
            row["latency_ms"], row["throughput_seq_s"] = lat, thr
        self.bar.update()


def compare_to_tw(ctx: Context, n_samples: int) -> None:
    """At every budget, each ``compared`` row against the Training Wheels row: ``vs_tw`` (BLEU difference and
    paired-bootstrap p-value; for math and qa also the per-output metric's) on the row, ``bleu_ci95`` (and
    ``exact_match_ci95`` or ``answer_accuracy_ci95``) on
    the Training Wheels row."""
    references = [e.reference for e in ctx.test]
    compared = [kind.method for kind in registry.kinds() if kind.compared]
    for b in ctx.budgets:
        tw = (registry.TRAINING_WHEELS.method, b)
        others = {m: ctx.hyps[(m, b)] for m in compared if (m, b) in ctx.hyps}
        if tw not in ctx.hyps or not others:
            continue
        ci, vs = paired_bootstrap(ctx.hyps[tw], others, references, n_samples)
        ctx.rows[tw]["bleu_ci95"] = round(ci, 2)
        if ctx.task in MATCH_METRIC:
            ok = {m: matches(ctx.task, h, references) for m, h in others.items()}
            em_ci, em = paired_bootstrap_matches(matches(ctx.task, ctx.hyps[tw], references), ok, n_samples,
                                                 key=MATCH_METRIC[ctx.task])
            ctx.rows[tw][f"{MATCH_METRIC[ctx.task]}_ci95"] = round(em_ci, 2)
            for m in vs:
                vs[m].update(em[m])
        for m, result in vs.items():
            ctx.rows[(m, b)]["vs_tw"] = result


def assemble(ctx: Context, by_kind: dict[RowKind, list[dict]], split: str) -> dict[str, Any]:
    """The report's head and every kind's rows at its key, in registry order; a kind not enabled leaves its ``off``
    value there (unless another kind of the key put rows there), or no key."""
    report: dict[str, Any] = {"n_examples": len(ctx.test), "split": split, "task": ctx.task}
    for kind in registry.kinds():
        rows = by_kind.get(kind, []) if kind.enabled(ctx) else None
        if rows is None and kind.off is OMITTED:
            continue
        *parents, last = kind.key
        where = report
        for k in parents:
            where = where.setdefault(k, {})
        if rows is None:
            where.setdefault(last, copy.copy(kind.off))
        elif kind.single:
            where[last] = rows[0]
        else:
            where[last] = (where.get(last) or []) + rows
    return report
