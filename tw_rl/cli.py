"""The ``tw-rl`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# No hub at run time unless the user says otherwise: fail fast and clearly instead of retrying for a minute.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "launch" / "configs" / "demo.yaml"

_HELP = {
    "demo": "the whole method on the embedded task: phase 0 (pretrain teacher and student), phase 1 (oracle "
            "behaviour cloning), phase 2 (PCL with budget multipliers on local Ray), then evaluation; "
            "writes DIR/report.json and DIR/report.md",
    "train": "run phases 0 → 1 → 2 and the evaluation for a config (each phase skippable in the config)",
    "pretrain": "phase 0 only: train the tokenizer, the teacher and the student from scratch, report their BLEU",
    "eval": "evaluate a trained run against baselines (not yet: the evaluation issue)",
    "generate": "generate with a trained student and teacher (not yet: the evaluation issue)",
}


def _add_config_args(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument("--config", type=Path, default=default_config,
                   help="YAML config (launch/configs/*.yaml); defaults come from tw_rl/config.py")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config field, e.g. rl.iterations=10 budgets=[0,0.2]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tw-rl", description="Knowledge Distillation with Training Wheels: a "
                                     "student that learns to ask a teacher for tokens within a budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help=_HELP["demo"], description=_HELP["demo"])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="the run directory (default runs/demo)")
    _add_config_args(p, DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    for name in ("train", "pretrain"):
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        _add_config_args(p)
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    for name in ("eval", "generate"):
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        p.add_argument("args", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tw_rl.config import ConfigError, load_config

    if args.command in ("eval", "generate"):
        print(f"tw-rl {args.command}: not yet implemented (it comes with the evaluation issue).", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides.append(f"out_dir={args.out}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"tw-rl: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "pretrain":
        from tw_rl.pretrain import pretrain
        from tw_rl.config import save_config

        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
        summary = pretrain(cfg, Path(cfg.out_dir))
        print(f"phase 0 done: teacher BLEU {summary['teacher']['eval']['bleu']}, student BLEU {summary['student']['eval']['bleu']}"
              f" — {Path(cfg.out_dir) / 'pretrain.json'}")
        return 0
    from tw_rl.train import train

    report = train(cfg, resume=getattr(args, "resume", False))
    out = Path(cfg.out_dir)
    print(f"report: {out / 'report.md'} (and {out / 'report.json'})")
    print(f"gap closed at b=0.2: {report['gap_closed'].get('0.2')}; usage: "
          + ", ".join(f"b={r['budget']:g}→{r['usage_mean']}" for r in report["tw"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
