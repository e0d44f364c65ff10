"""The teacher served to many clients: :class:`TeacherServer` batches concurrent requests dynamically. No Ray.

:class:`TeacherServer` is a plain class with async methods that wraps a :class:`~tw_rl.teacher.Teacher`; each
request kind is queued by a :class:`DynamicBatcher`, which serves the queued requests together, one model call per
batch. It runs as is under an asyncio event loop (the tests) and is wrapped in a one-line Ray actor by
:mod:`tw_rl.distributed.teacher` (``TeacherActor = ray.remote(TeacherServer)``: an async actor, whose event loop
keeps queueing while the model serves a batch).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tw_rl.teacher import Teacher


@dataclass
class BatcherStats:
    """Served batches of one request kind (metric namespace ``teacher/*``)."""

    batches: int = 0  # model calls
    requests: int = 0  # client requests served
    rows: int = 0  # rows served
    max_batch_rows: int = 0
    seconds: float = 0.0  # model time
    queue_seconds: float = 0.0  # summed over requests: arrival → its batch starts
    failed_batches: int = 0  # batches whose model call raised: their requests were served again one by one
    failed_requests: int = 0  # requests that raised alone too (the caller gets the error)

    @property
    def mean_batch_rows(self) -> float:
        return self.rows / max(1, self.batches)

    @property
    def mean_batch_requests(self) -> float:
        return self.requests / max(1, self.batches)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "mean_batch_rows": self.mean_batch_rows,
                "mean_batch_requests": self.mean_batch_requests}


@dataclass
class _Request:
    src: list
    rows: list
    arrival: float
    future: asyncio.Future


class DynamicBatcher:
    """Serves queued requests together: one model call per batch, results split back per request.

    A batch is served when the queued rows reach ``max_batch_size`` or ``max_wait_ms`` have passed since the
    oldest queued request arrived. Requests are never split: a batch takes whole requests in arrival order up to
    ``max_batch_size`` rows (a larger single request is served alone). ``fn(src, rows) -> list`` returns one
    result per row and runs on ``executor`` (one thread shared by all batchers of a server, so the model serves
    one batch at a time while the event loop keeps queueing).

    A failing row fails only its own request: when a batch of several requests raises, each request is served
    again alone, and only those that raise alone get the error (``failed_batches`` / ``failed_requests``).
    """

    def __init__(self, fn: Callable[[list, list], list], executor: ThreadPoolExecutor, max_batch_size: int,
                 max_wait_ms: float):
        self.fn, self.executor = fn, executor
        self.max_batch_size, self.max_wait_s = int(max_batch_size), float(max_wait_ms) / 1000.0
        self.queue: deque[_Request] = deque()
        self.queued_rows = 0
        self.stats = BatcherStats()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, src: Sequence, rows: Sequence) -> list:
        if len(rows) != len(src):
            raise ValueError(f"{len(src)} sources but {len(rows)} rows")
        if not rows:
            return []
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve())
        req = _Request(list(src), list(rows), time.perf_counter(), loop.create_future())
        self.queue.append(req)
        self.queued_rows += len(req.rows)
        self._wakeup.set()
        return await req.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self.queue[0].arrival + self.max_wait_s
            while self.queued_rows < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch, n = [], 0
            while self.queue and (not batch or n + len(self.queue[0].rows) <= self.max_batch_size):
                req = self.queue.popleft()
                batch.append(req)
                n += len(req.rows)
            self.queued_rows -= n
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [s for r in batch for s in r.src],
                                                     [x for r in batch for x in r.rows])
            except Exception as e:
                self.stats.failed_batches += 1
                await self._serve_alone(batch, e)
                continue
            self._account(batch, n, t0)
            i = 0
            for r in batch:
                if not r.future.done():
                    r.future.set_result(results[i:i + len(r.rows)])
                i += len(r.rows)

    async def _serve_alone(self, batch: list[_Request], error: Exception) -> None:
        """A batch's model call raised: serve each of its requests alone, so that the error reaches only the
        requests that cause it (the server keeps serving)."""
        loop = asyncio.get_running_loop()
        if len(batch) == 1:
            self.stats.failed_requests += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        for r in batch:
            t0 = time.perf_counter()
            try:
                result = await loop.run_in_executor(self.executor, self.fn, r.src, r.rows)
            except Exception as e:
                self.stats.failed_requests += 1
                if not r.future.done():
                    r.future.set_exception(e)
                continue
            self._account([r], len(r.rows), t0)
            if not r.future.done():
                r.future.set_result(result)

    def _account(self, batch: list[_Request], n: int, t0: float) -> None:
        st = self.stats
        st.batches += 1
        st.requests += len(batch)
        st.rows += n
        st.max_batch_rows = max(st.max_batch_rows, n)
        st.seconds += time.perf_counter() - t0
        st.queue_seconds += sum(t0 - r.arrival for r in batch)


@dataclass
class TeacherServerStats:
    next_tokens: BatcherStats
    score: BatcherStats
    encoder_hits: int
    encoder_misses: int
    instance: str = ""  # id of the server object: changes when Ray restarts a dead replica

    def as_metrics(self, prefix: str = "teacher/") -> dict[str, float]:
        out = {f"{prefix}encoder_hits": self.encoder_hits, f"{prefix}encoder_misses": self.encoder_misses}
        for kind in ("next_tokens", "score"):
            out.update({f"{prefix}{kind}_{k}": v for k, v in getattr(self, kind).as_dict().items()})
        return out


class TeacherServer:
    """Answers ``<τ>`` calls and scores outputs for many rollout workers, batching their requests dynamically.

    Builds its :class:`Teacher` from ``model_dir`` — a seq2seq model or a causal LM by the directory's own config,
    or a GGUF file (a ``.gguf`` path, or ``model_dir`` with ``gguf_file``), through
    :func:`tw_rl.models.factory.load_weights`, so big models are loaded where they run, not pickled — or takes
    ``teacher``.
    ``vocab_size`` is ``|V|`` (required with ``model_dir``). ``next_tokens`` and ``score`` requests are queued
    separately (:class:`DynamicBatcher`); the model serves one batch at a time on a single thread.
    """

    def __init__(self, model_dir: str | Path | None = None, vocab_size: int | None = None, *,
                 teacher: Teacher | None = None, pad_id: int = 0, start_id: int = 0, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, num_threads: int | None = None, device: str = "cpu",
                 trust_remote_code: bool = False, gguf_file: str | None = None, stack_caches: bool = False,
                 reuse_prefixes: bool = False):
        if num_threads is not None:  # Ray sets OMP_NUM_THREADS; be deliberate about the intra-op threads
            torch.set_num_threads(max(1, int(num_threads)))
        if teacher is None:
            if model_dir is None or vocab_size is None:
                raise ValueError("TeacherServer needs a Teacher, or a model_dir and vocab_size")
            from tw_rl.models.factory import load_weights, quiet_weight_loading

            quiet_weight_loading()  # in the actor's process (a worker_process_setup_hook is unpickled before the
            # job's code is importable)
            model = load_weights(str(model_dir), trust_remote_code=trust_remote_code, gguf_file=gguf_file)
            teacher = Teacher(model, vocab_size=vocab_size, pad_id=pad_id, start_id=start_id, device=device,
                              stack_caches=stack_caches, reuse_prefixes=reuse_prefixes)
        self.teacher = teacher
        self.instance = uuid.uuid4().hex[:12]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self._next = DynamicBatcher(lambda s, p: list(zip(*self.teacher.next_tokens(s, p))), self._executor,
                                    max_batch_size, max_wait_ms)
        self._score = DynamicBatcher(self.teacher.score, self._executor, max_batch_size, max_wait_ms)

    async def next_tokens(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                          ) -> tuple[list[int], list[float]]:
        pairs = await self._next.submit(src, prefixes)
        return [int(w) for w, _ in pairs], [float(lp) for _, lp in pairs]

    async def score(self, src: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return await self._score.submit(src, outputs)

    async def distributions(self, src: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
                            ) -> list[torch.Tensor]:
        """Unbatched (Phase-1 oracle traffic is bulk already)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.teacher.distributions, src,
                                                                outputs)

    async def generate(self, src: Sequence[Sequence[int]], max_len: int, eos_id: int) -> list[list[int]]:
        """Teacher-alone greedy decoding (teacher demonstrations, evaluation), unbatched."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.teacher.generate, src,
                                                                max_len, eos_id)

    async def stats(self) -> TeacherServerStats:
        return TeacherServerStats(self._next.stats, self._score.stats, self.teacher.stats["encoder_hits"],
                                  self.teacher.stats["encoder_misses"], self.instance)
