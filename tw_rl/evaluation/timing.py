"""Latency and throughput of the rows (SPEC §7), measured together after every quality pass.

- ``latency_ms``: median wall time of decoding one pre-tokenized input at batch size 1 (``eval.latency_examples``
  inputs × ``eval.latency_repeats``), models already loaded and warmed up by one untimed call, the teacher's
  encoder cache emptied before each timed call, both models on the same device. Tokenization is not timed.
- ``throughput_seq_s``: sequences per second decoding a batch of ``eval.throughput_batch_size`` inputs (median of
  ``eval.latency_repeats``). A ``sequential`` method (speculative decoding, batch-size-1 only) decodes a batch one
  sequence after another, so its throughput is ``1000 / mean latency_ms``.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.outputs import Method

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


def timings(jobs: Sequence[Callable[[], Method]], model: "TrainedModel", examples: Sequence[Example],
            repeats: int, batch_size: int, sequential: Sequence[bool] | None = None
            ) -> list[tuple[float | None, float | None]]:
    """Latency (median ms per input at batch size 1) and throughput (sequences/s decoding ``batch_size`` inputs at
    once, the examples repeated to fill the batch; median of ``repeats``) of every job.

    Models are loaded before this is called and every method is warmed up by one untimed call. The measurement
    runs in rounds — each round times every job once on every input — so that a burst of load from elsewhere on
    the machine falls on all jobs alike instead of on one. A ``sequential`` job decodes a batch one input after
    another (speculative decoding): its throughput is ``1 / mean latency``, the same quantity without decoding the
    batch again.
    """
    if not examples:
        return [(None, None)] * len(jobs)
    sequential = list(sequential) if sequential is not None else [False] * len(jobs)
    methods = [make() for make in jobs]
    for method in methods:
        method(examples[:1])  # warm-up: lazy initialisation, allocator
    batch = [examples[i % len(examples)] for i in range(batch_size)]
    lat: list[list[float]] = [[] for _ in jobs]
    thr: list[list[float]] = [[] for _ in jobs]
    for _ in range(repeats):
        for k, method in enumerate(methods):
            for e in examples:
                lat[k].append(_timed(model, method, [e]))
            if not sequential[k]:
                thr[k].append(_timed(model, method, batch))
    return [(round(1000 * statistics.median(a), 3),
             round(1 / statistics.mean(a) if seq else batch_size / statistics.median(b), 2))
            for a, b, seq in zip(lat, thr, sequential)]


def latency_ms(make: Callable[[], Method], model: "TrainedModel", examples: Sequence[Example],
               repeats: int) -> float | None:
    """Median wall time (ms) of decoding one input at batch size 1 (see :func:`timings`)."""
    return timings([make], model, examples, repeats, 1)[0][0]


def _timed(model: "TrainedModel", method: Method, examples: Sequence[Example]) -> float:
    _cold(model)
    _sync(model)
    t0 = time.perf_counter()
    method(examples)
    _sync(model)
    return time.perf_counter() - t0


def _cold(model: "TrainedModel") -> None:
    """Forget the teacher's cached encoder and decoder states: a timed input must not profit from an earlier repeat."""
    clear = getattr(model.teacher, "clear_cache", None)
    if clear is not None:
        clear()


def _sync(model: "TrainedModel") -> None:
    """Wait for queued GPU work, so that a timing holds only its own (no-op on the CPU)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
