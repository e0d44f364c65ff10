"""Parallel data: the embedded task, local files and Hugging Face datasets, behind one function.

``load_split(cfg.data, split)`` returns a list of :class:`Pair`. Every pair remembers where it came from
(``origin``, e.g. ``train.de.gz:17``) so later checks (token lengths) can name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad data: the message names the file (or dataset) and the line (or row)."""


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    origin: str = ""  # "file:line" or "dataset[split]#row" or "embedded[split]#i"


@dataclass
class LoadReport:
    """What loading kept and skipped (with ``on_error=skip``), and why."""

    kept: int = 0
    skipped: int = 0
    reasons: dict[str, int] | None = None


def load_split(data_cfg, split: str) -> list[Pair]:
    """Load one split (``data_cfg.train_split`` etc.) of the configured source."""
    if data_cfg.kind == "embedded":
        from tw_rl.data.embedded import EmbeddedTask

        return EmbeddedTask(data_cfg.embedded).split(split)
    if data_cfg.kind == "files":
        from tw_rl.data.files import read_split

        return read_split(data_cfg, split)
    if data_cfg.kind == "hf":
        from tw_rl.data.hf import load_hf_split

        return load_hf_split(data_cfg, split)
    raise DataError(f"data.kind={data_cfg.kind!r} is unknown; allowed: embedded, files, hf")
