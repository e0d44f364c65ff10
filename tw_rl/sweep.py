"""``tw-rl sweep``: a grid of training runs with Ray Tune, and one table of the results.

``tw-rl sweep --config FILE algo=pcl,gkd,ppo rl.on_policy_fraction=0.5,1.0 rl.iterations=6`` runs every combination
of the comma-separated values (a value in brackets, ``budgets=[0,0.2]``, is one value) as one Tune trial; each trial
is the ordinary driver (:func:`tw_rl.train.train`) in its own run directory ``OUT/trials/<name>``. Then
``OUT/sweep.md`` and ``OUT/sweep.json`` hold one table: every combination × (BLEU, usage) per budget.

Phases 0 and 1 do not depend on the phase-2 settings, so by default they run once, in ``OUT/base`` (or come from
``--reuse RUN``, e.g. a finished demo), and every trial starts from a copy of them; the phase-1 cache redoes phase 1
where a trial switches ``phase1.enabled`` or ``student.use_delta``. A grid over a key that changes phase 0 (data,
tokenizer, model sizes, pretraining, seed) runs every phase in every trial; a grid over other ``phase1.*`` keys
copies phase 0 only.

Resources: a trial reserves ``--cpus-per-trial`` CPUs for its driver plus, when ``rollout.num_workers > 0``, one
bundle per teacher replica and rollout worker (a placement group: the driver's Ray actors are placed in it), so
Tune runs as many trials at once as the cluster holds. On a 2-core machine use ``rollout.num_workers=0`` (rollouts
in the driver) and trials run one or two at a time.

The Ray side (Tune, the placement groups) is :mod:`tw_rl.distributed.tune`; this module plans the grid, hands the
wing its trial function (so the wing never imports ``tw_rl.train``) and writes the table. It imports no Ray.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from tw_rl.config import Config, ConfigError, load_config
from tw_rl.rundir import RunDir

_PHASE0_KEYS = ("data.", "tokenizer.", "teacher.arch", "teacher.name_or_path", "teacher.gguf_file",
                "teacher.chat_template", "student.arch", "student.name_or_path", "student.gguf_file",
                "student.chat_template", "student.init_layers", "task_prompt", "pretrain.", "seed=")


def parse_grid(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``key=v1,v2`` → a grid axis; ``key=v`` or ``key=[a,b]`` (one list value) → a fixed override."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        if "," in value and not value.lstrip().startswith(("[", "{")):
            axes[key] = [v.strip() for v in value.split(",")]
        else:
            fixed.append(item)
    return fixed, axes


def combinations(axes: dict[str, list[str]]) -> list[list[str]]:
    """Every combination of the axes as override lists, in the order given (the first axis varies slowest)."""
    keys = list(axes)
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*axes.values())] or [[]]


def trial_name(combo: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(combo)) or "default"


def share_level(axes: dict[str, list[str]]) -> str:
    """What trials can copy from one base run: ``"phase1"`` (phases 0 and 1), ``"phase0"`` or ``"none"``."""
    keys = [f"{k}=" if "." not in k else k for k in axes]
    if any(k.startswith(_PHASE0_KEYS) for k in keys):
        return "none"
    if any(k.startswith("phase1.") and k != "phase1.enabled" for k in keys):
        return "phase0"
    return "phase1"


def copy_products(base: Path, dest: Path, level: str) -> None:
    """Copy a run's phase-0 (and phase-1) products into a new run directory (never its phase 2)."""
    if level == "none":
        return
    dest.mkdir(parents=True, exist_ok=True)
    src, to = RunDir(base), RunDir(dest)
    ignore = [to.model("final").name] + ([to.model("phase1").name, to.references.name] if level == "phase0" else [])
    shutil.copytree(src.models, to.models, ignore=shutil.ignore_patterns(*ignore), dirs_exist_ok=True)
    shutil.copytree(src.tokenizer, to.tokenizer, dirs_exist_ok=True)
    shutil.copy(src.pretrain, to.pretrain)
    from tw_rl.manifest import PHASE0_ARTEFACTS, PHASE1_ARTEFACTS, Manifest

    Manifest(base).copy_to(dest, PHASE0_ARTEFACTS + (PHASE1_ARTEFACTS if level == "phase1" else ()))


def prepare_base(cfg: Config, out: Path) -> Path:
    """Phases 0 and 1 once, in ``out`` (cached there like any run's)."""
    import torch

    from tw_rl.config import save_config
    from tw_rl.metrics import MetricsLogger
    from tw_rl.train import phase0, phase1

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunDir(out).config)
    torch.set_num_threads(cfg.num_threads)
    with MetricsLogger(out, tensorboard=False) as log:
        phase1(phase0(cfg, out), log)
    return out


def _trial(trial: dict[str, Any]) -> dict[str, float]:
    """One trial: the driver on ``overrides`` in ``out_dir`` (absolute paths: Tune runs a trial in its own working
    directory); returns the metrics Tune records (BLEU and usage per budget)."""
    from tw_rl.train import train

    out = Path(trial["out_dir"])
    if trial.get("base"):
        copy_products(Path(trial["base"]), out, trial["share"])
    cfg = load_config(trial["config"], list(trial["overrides"]) + [f"out_dir={out}"])
    report = train(cfg)
    return {"done": 1, **{f"bleu_{r['budget']:g}": r["bleu"] for r in report["tw"]},
            **{f"usage_{r['budget']:g}": r["usage_mean"] for r in report["tw"]}}


def sweep(config: str | Path | None, overrides: Sequence[str], out: str | Path, *, reuse: str | Path | None = None,
          cpus_per_trial: float = 1.0, max_concurrent: int | None = None) -> dict:
    """Run the grid with Ray Tune; write and return the table (``OUT/sweep.json``, ``OUT/sweep.md``)."""
    from tw_rl.distributed.tune import run_trials, trial_bundles

    out = Path(out).resolve()
    config = str(Path(config).resolve()) if config else None
    fixed, axes = parse_grid(overrides)
    combos = combinations(axes)
    cfgs = [load_config(config, fixed + c + [f"out_dir={out / 'trials' / trial_name(c)}"]) for c in combos]  # fail fast
    level = share_level(axes)
    base = None
    if level != "none":
        base = Path(reuse).resolve() if reuse else prepare_base(load_config(config, fixed + [f"out_dir={out / 'base'}"]),
                                                              out / "base")
    first = cfgs[0]
    trials = [{"name": trial_name(c), "config": config, "overrides": fixed + c,
               "out_dir": str(out / "trials" / trial_name(c)),
               "base": str(base) if base else None, "share": level} for c in combos]
    run_trials(_trial, trials, trial_bundles(first, cpus_per_trial), out / "tune", max_concurrent)
    table = build_table([c for c in combos], [Path(t["out_dir"]) for t in trials], first.budgets, axes, fixed)
    write_table(out, table)
    return table


def build_table(combos: list[list[str]], dirs: list[Path], budgets: list[float], axes: dict[str, list[str]],
                fixed: list[str]) -> dict:
    """Rows: one per combination (its report's Training Wheels rows), plus the references of the first report."""
    rows = []
    reference = None
    for combo, d in zip(combos, dirs):
        path = RunDir(d).report_json
        if not path.is_file():
            rows.append({"run": ", ".join(combo) or "default", "dir": str(d), "error": "no report.json (failed)"})
            continue
        rep = json.loads(path.read_text())
        reference = reference or rep
        rows.append({"run": ", ".join(combo) or "default", "dir": str(d),
                     "budgets": {f"{r['budget']:g}": {"bleu": r["bleu"], "usage": r["usage_mean"]} for r in rep["tw"]},
                     "phase1_only": {f"{r['budget']:g}": {"bleu": r["bleu"], "usage": r["usage_mean"]}
                                     for r in rep.get("phase1_only", [])}})
    refs = {}
    if reference:
        refs = {"student_only_bleu": reference["student_only"]["bleu"],
                "teacher_only_bleu": reference["teacher_only"]["bleu"],
                "phase1_only": {f"{r['budget']:g}": {"bleu": r["bleu"], "usage": r["usage_mean"]}
                                for r in reference.get("phase1_only", [])}}
    return {"axes": axes, "fixed": fixed, "budgets": [float(b) for b in budgets], "rows": rows, "reference": refs}


def table_markdown(table: dict) -> str:
    budgets = [f"{b:g}" for b in table["budgets"]]
    head = "| run | " + " | ".join(f"b={b} BLEU / usage" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 1)]

    def cells(by: dict) -> str:
        return " | ".join(f"{by[b]['bleu']:.1f} / {by[b]['usage']:.3f}" if b in by else "–" for b in budgets)

    ref = table.get("reference") or {}
    if ref.get("phase1_only"):
        lines.append(f"| phase 1 only (before phase 2) | {cells(ref['phase1_only'])} |")
    for r in table["rows"]:
        lines.append(f"| {r['run']} | " + (cells(r["budgets"]) if "budgets" in r else r["error"]) + " |")
        if r.get("phase1_only") and r["phase1_only"] != ref.get("phase1_only"):  # this trial redid phase 1
            lines.append(f"| ↳ its own phase 1 only | {cells(r['phase1_only'])} |")
    if ref:
        lines.append(f"\nStudent alone {ref['student_only_bleu']:.1f} BLEU, teacher alone {ref['teacher_only_bleu']:.1f} "
                     f"BLEU. Fixed overrides: `{' '.join(table['fixed']) or '(none)'}`.")
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(table, indent=1))
    (out / "sweep.md").write_text("# tw-rl sweep\n\n" + table_markdown(table))
    return out / "sweep.json", out / "sweep.md"


# --------------------------------------------------------------------------------------------------------------
# the command line (tw-rl sweep)
# --------------------------------------------------------------------------------------------------------------
HELP = ("run a grid of trainings with Ray Tune (key=v1,v2 makes an axis, e.g. algo=pcl,gkd,ppo) and write one "
        "table: every combination × (BLEU, usage) per budget, to OUT/sweep.md and OUT/sweep.json")


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help=HELP, description=HELP)
    p.add_argument("--config", type=Path, help="YAML config shared by every trial")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default runs/sweep)")
    p.add_argument("--reuse", type=Path, help="copy phases 0 and 1 from this finished run (e.g. runs/demo) "
                   "instead of running them once in OUT/base")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs a trial's driver reserves (default 1)")
    p.add_argument("--max-concurrent", type=int, help="most trials at once (default: as many as resources allow)")
    p.add_argument("overrides", nargs="*", metavar="key=v1,v2", help="grid axes (comma-separated values) and fixed "
                   "overrides (one value)")


def run_cli(args) -> int:
    table = sweep(args.config, args.overrides, args.out, reuse=args.reuse, cpus_per_trial=args.cpus_per_trial,
                  max_concurrent=args.max_concurrent)
    print(table_markdown(table))
    print(f"table: {Path(args.out) / 'sweep.md'} (and sweep.json)")
    return 0 if all("budgets" in r for r in table["rows"]) else 1
