"""Does the raw student obey the budget in its prompt? Greedy usage on the *validation* split, per budget.

The student of a run decodes the validation inputs greedily at each budget with its calibrated ``<τ>`` offset
switched off and without the b = 0 mask (``tw_uncalibrated`` in the report, but on validation, so that a choice
made from it leaves the test split alone). Budgets need not be grid levels (0.15, 0.25, 0.35: budgets the
student's prompt states but the multipliers were never fitted at). Prints the usage, its deviation from the
budget and, as a summary, the largest deviation; the last line is JSON.

    .venv/bin/python bench/obedience.py RUN_DIR [--budgets 0 0.1 0.15 ...] [--examples 500]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tw_rl  # noqa: E402
from tw_rl.api import TrainedModel  # noqa: E402
from tw_rl.evaluation.outputs import run, usages  # noqa: E402
from tw_rl.evaluation.tw import training_wheels  # noqa: E402


def raw_usage(model: TrainedModel, examples, budget: float) -> float:
    """Mean greedy usage of ``model``'s student at ``budget``: offset 0, no b = 0 mask."""
    outs = run(partial(training_wheels, model, budget=budget, tau_bias=0.0, zero_guard=False), examples,
               model.cfg.eval.batch_size)
    return float(np.mean(usages(outs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5])
    p.add_argument("--examples", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = tw_rl.load(args.run)
    validation = model.load_examples(model.cfg.data.validation_split, args.examples)
    rows = []
    for b in args.budgets:
        u = raw_usage(model, validation, model.check_budget(b))
        rows.append({"budget": b, "usage": round(u, 4), "deviation": round(u - b, 4)})
        print(f"b = {b:<5g} raw validation usage {u:.3f} ({u - b:+.3f})")
    worst = max(abs(r["deviation"]) for r in rows)
    print(f"largest deviation {worst:.3f}")
    print(json.dumps({"run": str(args.run), "split": "validation", "examples": len(validation), "rows": rows,
                      "max_abs_deviation": round(worst, 4)}))


if __name__ == "__main__":
    main()
