"""Which task a run is evaluated as: the quality metrics follow it (ROUGE for summarization, exact match of the final
answer for math word problems). Torch-free: the dry run (tw_rl/dryrun.py) imports it."""

from __future__ import annotations

from tw_rl.config import Config

SUMMARIZATION_SETS = ("xsum", "cnn_dailymail", "cnn", "samsum", "gigaword", "multi_news", "billsum", "summ")
MATH_SETS = ("gsm8k", "svamp", "asdiv", "math_qa")


def resolve_task(cfg: Config) -> str:
    """``eval.task``, with ``auto`` read from the data source's name."""
    if cfg.eval.task != "auto":
        return cfg.eval.task
    name = (cfg.data.hf_name or "").lower() if cfg.data.kind == "hf" else ""
    if any(s in name for s in MATH_SETS):
        return "math"
    return "summarization" if any(s in name for s in SUMMARIZATION_SETS) else "translation"
