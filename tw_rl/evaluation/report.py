"""The report's files, built from the registry (:data:`tw_rl.evaluation.registry.PASSES`): ``report.json`` (its
schema, :func:`report_schema`), ``report.md`` (one table) and ``quality_vs_cost.png``; and ``outputs.jsonl`` (per
method, budget and example: source, reference, output, tokens and which of them the teacher produced)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tw_rl.evaluation import registry
from tw_rl.evaluation.quality import MATCH_LABEL, MATCH_METRIC, main_metric
from tw_rl.evaluation.rows import RowKind
from tw_rl.rundir import RunDir, atomic_file, atomic_write

# the files in a run (or --out) directory


# ------------------------------------------------------------------------------------------------------------------
# report.json
# ------------------------------------------------------------------------------------------------------------------
def rows_of(report: dict, kind: RowKind) -> list[dict]:
    """The rows of ``kind`` in ``report`` (none when its key is absent or null)."""
    value: Any = report
    for k in kind.key:
        value = value.get(k) if isinstance(value, dict) else None
    rows = [value] if isinstance(value, dict) else value or []
    return [r for r in rows if r.get("method") == kind.method]


_METRICS = ("bleu", "chrf", "usage_mean", "usage_p95", "calls_per_token", "latency_ms", "throughput_seq_s")
_ROW = {"type": "object", "required": ["method", "loop", *_METRICS],
        "properties": {"method": {"type": "string"}, "loop": {"type": "string"},
                       "bleu": {"type": "number", "minimum": 0},
                       "chrf": {"type": "number", "minimum": 0},
                       **{k: {"type": "number", "minimum": 0, "maximum": 100}
                          for k in ("rouge1", "rouge2", "rougeL", "exact_match", "answer_accuracy")},
                       "usage_mean": {"type": "number", "minimum": 0, "maximum": 1},
                       "usage_p95": {"type": "number", "minimum": 0, "maximum": 1},
                       "calls_per_token": {"type": "number", "minimum": 0},
                       "latency_ms": {"type": ["number", "null"], "minimum": 0},
                       "throughput_seq_s": {"type": ["number", "null"], "minimum": 0},
                       "budget": {"type": "number", "minimum": 0, "maximum": 1},
                       "bleu_ci95": {"type": "number", "minimum": 0},
                       "vs_tw": {"type": "object", "required": ["bleu_delta", "p_value"],
                                 "properties": {"bleu_delta": {"type": "number"},
                                                "p_value": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}}}}


def _row_schema(kind: RowKind) -> dict:
    """:data:`_ROW` and the kind's own fields (``budget`` required on a per-budget row)."""
    required = list(kind.schema.get("required", []))
    if kind.per_budget and "budget" not in required:
        required.insert(0, "budget")
    own = {**kind.schema, **({"required": required} if required else {})}
    return {"allOf": [_ROW, own]} if own else _ROW


def _key_schema(kinds: Sequence[RowKind]) -> dict:
    """The schema of one key of the report: one row, a list of rows, or (``off = None``) also null."""
    items = []
    for kind in kinds:
        if _row_schema(kind) not in items:
            items.append(_row_schema(kind))
    item = items[0] if len(items) == 1 else {"anyOf": items}
    if kinds[0].single:
        return item
    rows = {"type": "array", "items": item}
    return {"anyOf": [{"type": "null"}, item, rows]} if any(k.off is None for k in kinds) else rows


def _schema(kinds: Iterable[RowKind], depth: int = 0) -> tuple[list[str], dict[str, dict]]:
    """``required`` and ``properties`` of the report's keys at ``depth`` of the kinds' keys."""
    groups: dict[str, list[RowKind]] = {}
    for kind in kinds:
        groups.setdefault(kind.key[depth], []).append(kind)
    required = [k for k, g in groups.items() if not all(kind.optional for kind in g)]
    properties = {}
    for k, g in groups.items():
        leaves = [kind for kind in g if len(kind.key) == depth + 1]
        if leaves:
            properties[k] = _key_schema(leaves)
        else:
            inner_required, inner = _schema(g, depth + 1)
            properties[k] = {"type": "object", "required": inner_required, "properties": inner}
    return required, properties


def report_schema() -> dict:
    """The JSON schema of ``report.json``: its head, every row kind's key, and the summaries."""
    required, row_keys = _schema(registry.kinds())
    return {
        "type": "object",
        "required": ["n_examples", "split", "task", *required, "gap_closed", "signatures", "latency"],
        "properties": {
            "n_examples": {"type": "integer", "minimum": 0}, "split": {"type": "string"},
            "task": {"enum": ["translation", "summarization", "math", "qa"]},
            **row_keys,
            "gap_closed": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
            "models": {"type": "object",
                       "required": ["teacher", "student", "teacher_parameters", "student_parameters"],
                       "properties": {"teacher": {"type": "string"}, "student": {"type": "string"},
                                      "teacher_parameters": {"type": "integer", "minimum": 1},
                                      "student_parameters": {"type": "integer", "minimum": 1}}},
            "signatures": {"type": "object", "required": ["bleu", "chrf"],
                           "additionalProperties": {"type": "string"}},
            "latency": {"type": "object", "required": ["batch_size", "examples", "repeats", "throughput_batch_size",
                                                       "device"]},
        },
    }


def validate_report(report: dict) -> None:
    """Raise ``ValueError`` naming the first place where ``report`` does not follow :func:`report_schema`."""
    import jsonschema

    try:
        jsonschema.validate(report, report_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"report.json does not follow the schema at {where}: {e.message}") from None


# ------------------------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    """One table: every row without a budget, then per budget Training Wheels and every row at that budget (in
    registry order, ``listed_last`` kinds last)."""
    rouge_cols = report.get("task") == "summarization"
    em = MATCH_METRIC.get(report.get("task", ""))
    em_col = em is not None
    cols = ["method", "budget", "BLEU", "chrF"] + (["R-1", "R-2", "R-L"] if rouge_cols else []) + (
        [f"{em.replace('_', ' ')} %"] if em_col else []) + [
        "usage mean", "usage p95", "calls/token", "latency ms (bs 1)", "seq/s (bs 32)", "notes"]
    keys = ["bleu", "chrf"] + (["rouge1", "rouge2", "rougeL"] if rouge_cols else []) + (
        [em] if em_col else []) + ["usage_mean", "usage_p95", "calls_per_token", "latency_ms",
                                              "throughput_seq_s"]
    lines = ["# tw-rl report", "",
             f"{report.get('n_examples')} examples of the `{report.get('split', 'test')}` split; greedy decoding. "
             f"Usage = teacher tokens / output tokens; calls/token = teacher forward passes / output tokens.", ""]
    if report.get("latency"):
        lat = report["latency"]
        cols[-2] = f"seq/s (bs {lat.get('throughput_batch_size', 32)})"
        lines += [f"Latency: median of {lat.get('examples')} inputs × {lat.get('repeats')} repeats at batch size 1 "
                  f"on {lat.get('device')}, models loaded beforehand.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 3) + "---|"]

    def line(kind: RowKind, r: dict) -> None:
        note = kind.note(r, report)
        if "vs_tw" in r:  # paired bootstrap against Training Wheels at this budget
            vs = f"BLEU {r['vs_tw']['bleu_delta']:+.2f} vs Training Wheels (p = {r['vs_tw']['p_value']:.3g})"
            if em_col and f"{em}_delta" in r["vs_tw"]:
                vs = (f"{em.replace('_', ' ')} {r['vs_tw'][f'{em}_delta']:+.2f} vs Training Wheels "
                      f"(p = {r['vs_tw'][f'{em}_p_value']:.3g}); {vs}")
            note = f"{note}; {vs}" if note else vs
        lines.append("| " + " | ".join([kind.title, _fmt(r.get("budget"))] + [_fmt(r.get(k)) for k in keys] + [note])
                     + " |")

    for kind in registry.kinds():
        if not kind.per_budget:
            for r in rows_of(report, kind):
                line(kind, r)
    tw = registry.TRAINING_WHEELS
    at_budget = sorted((k for k in registry.kinds() if k.per_budget and k is not tw), key=lambda k: k.listed_last)
    by_budget = {kind: {r["budget"]: r for r in rows_of(report, kind)} for kind in at_budget}
    for r in rows_of(report, tw):
        line(tw, r)
        for kind in at_budget:
            if r["budget"] in by_budget[kind]:
                line(kind, by_budget[kind][r["budget"]])
    lines.append("")
    sig = report.get("signatures", {})
    if sig:
        lines += ["Signatures: " + "; ".join(f"{k} `{v}`" for k, v in sig.items()), ""]
    if rouge_cols or em_col:
        lines += [f"Quality column of the plot: {main_metric(report['task'])}.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# quality_vs_cost.png
# ------------------------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> Path:
    """Quality against teacher calls per token (left) and against latency at batch size 1 (right): a curve per kind
    over budgets, then the other curves (speculative decoding's lenience), then one marker per single row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(report.get("task", "translation"))
    label = {"rougeL": "ROUGE-L", **MATCH_LABEL}.get(metric, "BLEU")
    drawn = [k for k in registry.kinds() if k.plot is not None]
    curves = sorted((k for k in drawn if k.plot.curve), key=lambda k: not k.per_budget)
    points = [k for k in drawn if not k.plot.curve]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x, xlabel in ((axes[0], "calls_per_token", "teacher calls (forward passes) per output token"),
                          (axes[1], "latency_ms", "latency per sequence, batch size 1 (ms)")):
        for kind in curves:
            rows = [r for r in rows_of(report, kind) if r.get(x) is not None]
            style = kind.plot.style
            if x == "latency_ms":  # latency need not be monotone in the budget: points (labelled) only
                style = dict(style, ls="none")
            if rows:
                ax.plot([r[x] for r in rows], [r[metric] for r in rows], label=kind.plot.label, **style)
        for kind in curves:
            if kind.plot.annotate:
                for i, r in enumerate(rows_of(report, kind)):
                    if r.get(x) is not None:
                        dy = (5, -12, 15, -22)[i % 4] if kind.plot.stagger else 5
                        ax.annotate(f"{kind.plot.tag}={r[kind.plot.annotate]:g}", (r[x], r[metric]),
                                    textcoords="offset points", xytext=(4, dy), fontsize=8,
                                    color=kind.plot.style["color"])
        for kind in points:
            for r in rows_of(report, kind):
                if r.get(x) is not None:
                    ax.plot([r[x]], [r[metric]], ls="none", label=kind.plot.label, **kind.plot.style)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{label} vs teacher cost")
    axes[1].set_title(f"{label} vs latency")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"quality vs cost — {report.get('n_examples')} examples of the {report.get('split', 'test')} split")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------------
# writing them
# ------------------------------------------------------------------------------------------------------------------
def write_outputs(out_dir: Path, rows: Sequence[dict]) -> Path:
    return atomic_write(RunDir(out_dir).outputs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    """``report.json``, ``report.md`` and (when the report has the baselines' schema) ``quality_vs_cost.png``."""
    out = RunDir(run_dir)
    md = markdown(report)  # everything rendered before the first file is replaced
    if "baselines" in report:
        with atomic_file(out.plot) as tmp:
            plot(report, tmp)
    atomic_write(out.report_md, md)
    atomic_write(out.report_json, json.dumps(report, indent=2))
    return out.report_json, out.report_md
