"""The ``tw-rl`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tw_rl.rundir import ArtefactError, RunDir

# No hub at run time unless the user says otherwise: fail fast and clearly instead of retrying for a minute.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def demo_config() -> Path:
    """``demo.yaml`` as shipped (launch/configs in a checkout, package data in a wheel: tw_rl/resources.py)."""
    from tw_rl.resources import config_file

    return config_file("demo")


def demo_help() -> str:
    """``tw-rl demo``'s description, phase 2 read from demo.yaml (what the demo runs, not a hard-coded string)."""
    from tw_rl.config import load_config
    from tw_rl.dryrun import phase2_summary

    path = demo_config()
    return (f"the whole method on the embedded task ({path}): phase 0 (pretrain teacher and student), phase 1 "
            f"(oracle behaviour cloning), phase 2 ({phase2_summary(load_config(path))}), then calibration and "
            f"evaluation; writes DIR/report.json and DIR/report.md")


_HELP = {
    "train": "run phases 0 → 1 → 2 and the evaluation for a config (each phase skippable in the config)",
    "pretrain": "phase 0 only: train the tokenizer, the teacher and the student from scratch, report their BLEU",
    "eval": "evaluate a trained run against the baselines (student alone, teacher alone, random calls, confidence "
            "fallback, speculative decoding) at every budget; writes report.json, report.md, quality_vs_cost.png "
            "and outputs.jsonl to RUN/eval (or --out DIR); never over an existing report unless --overwrite, so "
            "the training report RUN/report.json stays",
    "calibrate": "fit the trained student's <τ> offset per budget on the validation split so that its greedy usage "
                 "equals each budget (tw-rl train does this after phase 2); stores the offsets with the student "
                 "and writes calibration.json; run tw-rl eval afterwards",
    "generate": "generate with a trained run's student and teacher; prints one line per input with the tokens the "
                "teacher produced marked (underlined on a terminal, else in ⟦…⟧); reads lines from standard input "
                "when no text is given",
}


def _add_config_args(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument("--config", type=Path, default=default_config,
                   help="YAML config (launch/configs/*.yaml); defaults come from tw_rl/config.py")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config field, e.g. rl.iterations=10 budgets=[0,0.2]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tw-rl", description="Knowledge Distillation with Training Wheels: a "
                                     "student that learns to ask a teacher for tokens within a budget.")
    from tw_rl.version import version_line

    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="the whole method on the embedded task (demo.yaml), then calibration and "
                       "evaluation", description=demo_help())
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="the run directory (default runs/demo)")
    _add_config_args(p, demo_config())
    for name in ("train", "pretrain"):
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        _add_config_args(p)
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
            p.add_argument("--dry-run", action="store_true", help="check the config, resolve every component "
                           "(algorithm, data source, models) and list what would be downloaded and the resources "
                           "asked of Ray; downloads nothing and starts nothing")
    from tw_rl.distributed.launch import add_parsers as add_launch_parsers  # tw-rl head, tw-rl submit

    add_launch_parsers(sub)
    from tw_rl.sweep import add_parser as add_sweep_parser  # tw-rl sweep

    add_sweep_parser(sub)
    p = sub.add_parser("eval", help=_HELP["eval"], description=_HELP["eval"])
    p.add_argument("--run", type=Path, help="the run directory (written by tw-rl train or tw-rl demo)")
    p.add_argument("--budgets", type=float, nargs="+", help="evaluate these budgets, any in [0, the largest "
                   "trained level], e.g. 0.15 0.25 (default: the trained grid)")
    p.add_argument("--data", help="evaluate on other data: a directory of split files (data.kind=files), "
                   "hf:NAME[:CONFIG] (a Hugging Face dataset) or embedded (default: the run's data)")
    p.add_argument("--split", help="the split to evaluate (default: the run's data.test_split); the confidence "
                   "threshold is always calibrated on data.validation_split")
    p.add_argument("--out", type=Path, help="write the report here (default RUN/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the output directory "
                   "(e.g. --out RUN --overwrite replaces the training report)")
    p.add_argument("--device", default="cpu", help="torch device of both models (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override the run's config, e.g. eval.max_examples=200 eval.baselines=false")
    p = sub.add_parser("calibrate", help=_HELP["calibrate"], description=_HELP["calibrate"])
    p.add_argument("--run", type=Path, help="the run directory (written by tw-rl train or tw-rl demo)")
    p.add_argument("--device", default="cpu", help="torch device of both models (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override the run's config, e.g. calibration.tolerance=0.01 calibration.max_examples=200")
    p = sub.add_parser("generate", help=_HELP["generate"], description=_HELP["generate"])
    p.add_argument("--run", type=Path, help="the run directory (written by tw-rl train or tw-rl demo)")
    p.add_argument("--budget", type=float, default=0.2, help="teacher budget, any in [0, the largest trained "
                   "level] (default 0.2); the student reads it from its prompt")
    p.add_argument("--hard-cap", action="store_true", help="forbid <τ> once calls reach ceil(b·max_len)")
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than data.max_src_tokens to their "
                   "first tokens instead of refusing them")
    p.add_argument("--mark", choices=["auto", "brackets", "ansi", "none"], default="auto",
                   help="how teacher tokens are marked: ⟦…⟧, ANSI underline, or not at all (auto: underline on a "
                   "terminal, brackets otherwise)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input: text, marked text, "
                   "tokens and which of them the teacher produced")
    p.add_argument("--device", default="cpu", help="torch device of both models (default cpu)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="inputs; none: one input per line of standard input")
    return parser


def data_overrides(spec: str | None) -> list[str]:
    """``--data`` as config overrides: a directory, ``hf:NAME[:CONFIG]`` or ``embedded``."""
    if not spec:
        return []
    if spec == "embedded":
        return ["data.kind=embedded"]
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return ["data.kind=hf", f"data.hf_name={name}"] + ([f"data.hf_config={config}"] if config else [])
    return ["data.kind=files", f"data.path={spec}"]


def phase1_dir(run: Path, cfg) -> Path | None:
    """``models/phase1`` when the run also has a final (phase-2) student, so that the phase-1 one is separate
    (checked against the manifest like the final one)."""
    from tw_rl.manifest import Manifest

    if not cfg.rl.enabled:
        return None
    phase1 = RunDir(run).model("phase1")
    manifest = Manifest(run)
    if manifest.entry("phase1_student") is not None:
        manifest.verify("phase1_student")
    return phase1 if (phase1 / "tw_student.json").is_file() else None


def run_calibrate(args) -> int:
    from tw_rl.api import load, student_dir
    from tw_rl.evaluation.calibration import calibrate_run
    from tw_rl.models.student import Student

    model = load(args.run, device=args.device, overrides=list(args.overrides))
    import torch

    torch.set_num_threads(model.cfg.num_threads)
    students = {"final": (model.student, student_dir(Path(args.run), model.cfg))}
    if (phase1 := phase1_dir(args.run, model.cfg)) is not None:
        students["phase1"] = (Student.load(phase1)[0], phase1)
    out = calibrate_run(model, students, Path(args.run))
    for name in students:
        for r in out[name]:
            if r["budget"] > 0:
                print(f"{name} b={r['budget']:g}: <τ> offset {r['bias']:+.4f}, validation usage "
                      f"{r['usage_before']} → {r['usage']} ({r['evaluations']} decodes)")
    print(f"offsets stored in {', '.join(str(d / 'tw_student.json') for _, d in students.values())}; "
          f"{RunDir(args.run).calibration}")
    return 0


def eval_out(args) -> Path:
    """Where ``tw-rl eval`` writes: ``--out``, else ``RUN/eval``. Raises FileExistsError over an existing report
    unless ``--overwrite``."""
    out = RunDir(args.out) if args.out is not None else RunDir(RunDir(args.run).eval_dir)
    if out.report_json.exists() and not args.overwrite:
        what = "the training report" if out.root.resolve() == Path(args.run).resolve() else "a report"
        raise FileExistsError(f"{out.report_json} exists ({what}); give --out NEW_DIR, or --overwrite to "
                              f"replace it")
    return out.root


def run_eval(args) -> int:
    import json

    from tw_rl.api import load
    from tw_rl.evaluation.driver import evaluate
    from tw_rl.evaluation.report import write_outputs, write_report
    from tw_rl.models.student import Student

    out = eval_out(args)  # before anything loads
    model = load(args.run, device=args.device, overrides=data_overrides(args.data)
                 + ([f"data.test_split={args.split}"] if args.split else []) + list(args.overrides))
    cfg = model.cfg
    import torch

    torch.set_num_threads(cfg.num_threads)  # as in tw-rl train's evaluation: small models run many times slower
    # with an oversubscribed thread pool on a shared machine (docs/design.md, Threads)
    budgets = [model.check_budget(b) for b in args.budgets] if args.budgets else None
    test = model.load_examples(cfg.data.test_split, cfg.eval.max_examples)
    validation = (model.load_examples(cfg.data.validation_split, cfg.eval.max_examples) if cfg.eval.baselines
                  else [])
    phase1 = phase1_dir(args.run, cfg)  # the driver's report also has the student before RL
    phase1_student = Student.load(phase1)[0] if phase1 is not None else None
    report, outputs = evaluate(model, test, validation, budgets=budgets, phase1_student=phase1_student,
                               split=cfg.data.test_split)
    if (calibration := RunDir(args.run).calibration).is_file() and model.student.tau_bias:
        report["calibration"] = json.loads(calibration.read_text())
    from tw_rl.train import provenance

    report.update(provenance(cfg))
    json_path, md_path = write_report(out, report)
    write_outputs(out, outputs)
    print(f"report: {md_path} (and {json_path}, {Path(out) / 'quality_vs_cost.png'}, {Path(out) / 'outputs.jsonl'})")
    for r in report["tw"]:
        print(f"b={r['budget']:g}: BLEU {r['bleu']}, usage {r['usage_mean']}, {r['latency_ms']} ms/sequence")
    return 0


def run_generate(args) -> int:
    import json

    from tw_rl.api import ANSI_UNDERLINE, BRACKETS, load

    texts = list(args.texts) or [line.rstrip("\r\n") for line in sys.stdin]
    model = load(args.run, device=args.device)
    gens = model.generate(texts, budget=args.budget, hard_cap=args.hard_cap, truncate=args.truncate)
    mark = args.mark if args.mark != "auto" else ("ansi" if sys.stdout.isatty() else "brackets")
    marks = {"ansi": ANSI_UNDERLINE, "brackets": BRACKETS, "none": ("", "")}[mark]
    for g in gens:
        if args.json:
            print(json.dumps({"text": g.text, "marked": g.marked(), "tokens": g.pieces,
                              "from_teacher": g.from_teacher, "usage": round(g.usage, 4), "budget": g.budget,
                              "truncated": g.truncated}, ensure_ascii=False))
        else:
            print(g.marked(marks))
    return 0


_EVAL_VALUE_OPTIONS = {"--run", "--data", "--split", "--out", "--device"}


def overrides_last(argv: list[str]) -> list[str]:
    """``tw-rl eval ... --budgets 0.1 0.2 key=value``: ``--budgets`` takes any number of values, so argparse would
    read ``key=value`` as a budget. Every ``key=value`` word that is not an option's value moves behind ``--``,
    where argparse reads it as an override whatever came before it."""
    if not argv or argv[0] != "eval" or "--budgets" not in argv or "--" in argv:
        return argv
    keep, overrides = [], []
    for i, tok in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in _EVAL_VALUE_OPTIONS
        (overrides if "=" in tok and not tok.startswith("-") and not is_value else keep).append(tok)
    return keep + (["--", *overrides] if overrides else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(overrides_last(list(sys.argv[1:] if argv is None else argv)))
    from tw_rl.models.factory import quiet_weight_loading

    quiet_weight_loading()
    try:
        return run_command(args)
    except user_errors(args.command) as e:  # the message names the problem (file, line, key, value): no traceback
        print(f"tw-rl {args.command}: {error_kind(e)}{e}", file=sys.stderr)
        return 2


def user_errors(command: str) -> tuple[type[BaseException], ...]:
    """The errors a user can mend from the message alone (a config key, a data file and line, a missing or corrupt
    artefact, an input, a model that is not available offline, a path that exists or does not): ``tw-rl`` prints
    them in one line and exits 2. ``head`` and ``submit`` also report what Ray and the launcher refuse."""
    from tw_rl.api import InputError
    from tw_rl.config import ConfigError
    from tw_rl.data import DataError
    from tw_rl.models.factory import ModelNotAvailableError

    errors = (ConfigError, DataError, ArtefactError, InputError, ModelNotAvailableError, FileNotFoundError,
              FileExistsError)
    return errors + ((ValueError, RuntimeError) if command in ("head", "submit") else ())


def error_kind(e: BaseException) -> str:
    from tw_rl.config import ConfigError
    from tw_rl.data import DataError

    return "config error: " if isinstance(e, ConfigError) else "data error: " if isinstance(e, DataError) else ""


def run_command(args) -> int:
    """Run one ``tw-rl`` command; user errors propagate to :func:`main`'s one handler."""
    from tw_rl.config import ConfigError, load_config

    if args.command in ("head", "submit"):
        from tw_rl.distributed.launch import run_head, run_submit

        return run_head(args) if args.command == "head" else run_submit(args)
    if args.command == "sweep":
        from tw_rl.sweep import run_cli

        return run_cli(args)
    if args.command in ("eval", "generate", "calibrate"):
        if args.run is None:
            raise ConfigError("--run DIR is required (a run directory written by tw-rl train or tw-rl demo)")
        return {"eval": run_eval, "generate": run_generate, "calibrate": run_calibrate}[args.command](args)
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides.append(f"out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if getattr(args, "dry_run", False):
        from tw_rl.dryrun import plan, print_plan

        print_plan(plan(cfg))
        return 0
    if args.command == "pretrain":
        return run_pretrain(cfg)
    from tw_rl.train import train

    report = train(cfg, resume=getattr(args, "resume", False))
    out = RunDir(cfg.out_dir)
    print(f"report: {out.report_md} (and {out.report_json})")
    print(f"gap closed at b=0.2: {report['gap_closed'].get('0.2')}; usage: "
          + ", ".join(f"b={r['budget']:g}→{r['usage_mean']}" for r in report["tw"]))
    return 0


def run_pretrain(cfg) -> int:
    from tw_rl.config import save_config
    from tw_rl.data import load_split
    from tw_rl.pretrain import pretrain

    for split in (cfg.data.train_split, cfg.data.test_split):  # opened before config.yaml is written
        load_split(cfg.data, split)
    out = RunDir(cfg.out_dir)
    save_config(cfg, out.config)
    summary = pretrain(cfg, out.root)
    print(f"phase 0 done: teacher BLEU {summary['teacher']['eval']['bleu']}, student BLEU "
          f"{summary['student']['eval']['bleu']} — {out.pretrain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
