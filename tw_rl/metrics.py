"""Metrics of a run: one JSON line per call in ``run_dir/metrics.jsonl``, mirrored to TensorBoard in ``run_dir/tb/``.

Names use namespaces (``loss/pcl``, ``rollout/usage``, ``teacher/calls``, ``lambda/0.2``, ``timing/update_s``).
A record is ``{"step": int, "phase": str | null, "time": unix seconds, **metrics}``; non-finite values are written
as ``null`` (and not sent to TensorBoard) so that a diverging run still leaves a readable log. The file is opened in
append mode, so a resumed run continues the same file (steps after the last checkpoint may then appear twice).

In TensorBoard a metric's tag is ``{phase}/{name}`` when a phase is given, because each phase counts its own steps
and the same name (``timing/update_s``) would otherwise mix curves from different phases.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import numpy as np
import torch

from tw_rl.rundir import RunDir

_RESERVED = ("step", "phase", "time")


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl`` and, if ``tensorboard``, to a SummaryWriter in ``run_dir/tb``."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = RunDir(run_dir).metrics
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when asked for

            self._writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))

    def log(self, step: int, metrics: Mapping[str, Any], phase: str | None = None) -> dict[str, Any]:
        """Write one record and return it. Values: Python/numpy numbers or one-element tensors."""
        record: dict[str, Any] = {"step": int(step), "phase": phase, "time": time.time()}
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved for the record itself")
            record[name] = _scalar(name, value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name in metrics:
                value = record[name]
                if value is not None:
                    tag = f"{phase}/{name}" if phase else name
                    self._writer.add_scalar(tag, value, global_step=record["step"], walltime=record["time"])
            self._writer.flush()
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_metrics(run_dir: str | Path, phase: str | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in order (only ``phase``'s if given); ``[]`` if there is none.

    A torn last line (the process died mid-write) is skipped; a bad line elsewhere is an error.
    """
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
        if phase is None or rec.get("phase") == phase:
            records.append(rec)
    return records


class Timer:
    """``with Timer(metrics, "update"): ...`` adds the elapsed seconds to ``metrics["timing/update_s"]``.

    Adding (rather than overwriting) lets a phase that runs several times per iteration report its total.
    The time is recorded even if the block raises; ``.elapsed`` holds this block's seconds.
    """

    def __init__(self, into: dict[str, Any], name: str) -> None:
        self.key = f"timing/{name}_s"
        self.into = into
        self.elapsed = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.elapsed = time.perf_counter() - self._start
        self.into[self.key] = self.into.get(self.key, 0.0) + self.elapsed


def _scalar(name: str, value: Any) -> int | float | None:
    """A JSON number for a metric value: ints stay ints, non-finite floats become None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.detach().cpu().item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"metric {name!r} is an array of shape {value.shape}, not a scalar")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None:
        return None
    raise TypeError(f"metric {name!r} has a value of type {type(value).__name__}; expected a number")
