"""Ray at the edge: with tw_rl/parallel.py (the data-parallel learner), the only module that imports ray.

- :class:`TeacherServer` — a plain class with async methods that wraps :class:`~tw_rl.teacher.Teacher` and batches
  concurrent requests dynamically (:class:`DynamicBatcher`). ``TeacherActor = ray.remote(TeacherServer)``.
- :class:`RemoteTeacher` — a picklable :class:`~tw_rl.envs.token_mdp.TeacherClient` that calls a teacher replica.
- ``RolloutWorkerActor = ray.remote(RolloutWorker)`` and :class:`RolloutGroup`, which samples from all workers in
  parallel, restarts dead ones and counts stale episodes; with ``local=True`` (or no workers) it runs the same
  :class:`~tw_rl.rollout.RolloutWorker` in-process and never touches Ray.
- :func:`init_ray` — a local Ray bound to this machine, or the cluster named by ``RAY_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from tw_rl.envs.token_mdp import Example, TeacherClient
from tw_rl.batch import Episode
from tw_rl.config import Config, RolloutConfig, TeacherConfig, training_budgets
from tw_rl.models.student import Student
from tw_rl.refit import GateStates
from tw_rl.rollout import RolloutResult, RolloutStats, RolloutWorker, StudentSource
from tw_rl.teacher import Teacher


# --------------------------------------------------------------------------------------------------------------
# ray itself
# --------------------------------------------------------------------------------------------------------------
LOOPBACK = "127.0.0.1"
# Ray resolves a node address of 127.0.0.1 to the machine's external address (ray._private.services.
# resolve_ip_for_localhost) unless multi-node clusters are off; with the external address its gRPC servers (GCS,
# raylet, core workers, agents) listen on every interface. Off, every server binds 127.0.0.1 (measured with Ray
# 2.60: tests/test_distributed.py lists the listeners). Read by ray_constants at import time and by every process
# Ray starts, hence both the environment variable and the attribute below.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_restore: dict[str, Any] = {}


def local_auth_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The authentication settings of a local (private) Ray, set in ``env`` (default ``os.environ``) and returned.

    Token authentication is set explicitly (``RAY_AUTH_MODE=token``) rather than relied on as Ray's default (Ray
    2.52–2.59 default to no authentication). Unless a token is given (``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH``), the token is a random one held in this process's environment only — inherited by
    the processes Ray starts, written to no file (a ``ray.init()`` without one writes ``~/.ray/auth_token``, mode
    0644). One token per process: Ray's token loader caches it, so a second local Ray in this process reuses it.
    An explicit ``RAY_AUTH_MODE=disabled`` is the user's choice: respected, with a warning.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        warnings.warn("RAY_AUTH_MODE=disabled: the local Ray accepts any client on this machine", stacklevel=2)
        return dict(env)
    changed = env.get("RAY_AUTH_MODE") != "token"
    env["RAY_AUTH_MODE"] = "token"
    if not env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH"):
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        changed = True
    if changed and env is os.environ:  # this process's Ray may have read the old settings already: re-read them
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig  # noqa: PLC0415 (private)

        RayConfig.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return dict(env)


def init_ray(num_cpus: float | None = None, *, object_store_memory: int | None = None, **kwargs: Any) -> None:
    """Start a local Ray on this machine only (or connect to ``RAY_ADDRESS`` when set). Idempotent.

    ``address="local"`` starts a new instance even if another Ray runs on the machine (never joins it by
    accident). The local Ray listens on 127.0.0.1 only (GCS, raylet, workers, agents; the dashboard is off) and
    requires a token (:func:`local_auth_env`). Usage statistics are off.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster started with `ray start` (and its auth token in the environment)
        ray.init(address=address, **kwargs)
        return
    from ray._private import ray_constants  # noqa: PLC0415 (private: see _SINGLE_MACHINE_ENV)

    local_auth_env()
    _restore.update(env=os.environ.get(_SINGLE_MACHINE_ENV), cluster=ray_constants.ENABLE_RAY_CLUSTER)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_memory, _node_ip_address=LOOPBACK, **kwargs)
    except BaseException:
        _undo_single_machine()
        raise


def _undo_single_machine() -> None:
    """After a local Ray: connecting to a cluster later must find this machine's real address again."""
    if not _restore:
        return
    from ray._private import ray_constants  # noqa: PLC0415

    ray_constants.ENABLE_RAY_CLUSTER = _restore["cluster"]
    if _restore["env"] is None:
        os.environ.pop(_SINGLE_MACHINE_ENV, None)
    else:
        os.environ[_SINGLE_MACHINE_ENV] = _restore["env"]
    _restore.clear()


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
    _undo_single_machine()


def check_resources(cfg: Config) -> None:
    """Raise (instead of waiting forever) when the teacher replicas and rollout workers of ``cfg`` need more CPUs
    or GPUs than the local Ray has. Skipped on a ``RAY_ADDRESS`` cluster, which may scale up."""
    if os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    for kind, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        per_learner = cfg.learner.worker_num_cpus if kind == "CPU" else float(cfg.learner.use_gpu)
        learners = cfg.learner.num_workers * per_learner  # the data-parallel learner's actors (tw_rl/parallel.py)
        need = (cfg.teacher.num_replicas * getattr(cfg.teacher, key)
                + cfg.rollout.num_workers * getattr(cfg.rollout, key) + learners)
        have = total.get(kind, 0.0)
        if need > have + 1e-9:
            raise ValueError(
                f"the teacher ({cfg.teacher.num_replicas} × teacher.{key}={getattr(cfg.teacher, key)}), rollout "
                f"workers ({cfg.rollout.num_workers} × rollout.{key}={getattr(cfg.rollout, key)}) and learner "
                f"workers ({cfg.learner.num_workers} × {per_learner:g}) need {need:g} "
                f"{kind}s but Ray has {have:g}; lower rollout.num_workers, rollout.{key}, teacher.{key} or "
                f"learner.num_workers (fractions are allowed), or use rollout.num_workers=0 for local mode")


# --------------------------------------------------------------------------------------------------------------
# the teacher server: dynamic batching
# --------------------------------------------------------------------------------------------------------------
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

    Builds its :class:`Teacher` from ``model_dir`` (``AutoModelForSeq2SeqLM.from_pretrained(model_dir,
    use_safetensors=True)``, so big models are loaded where they run, not pickled) or takes ``teacher``.
    ``vocab_size`` is ``|V|`` (required with ``model_dir``). ``next_tokens`` and ``score`` requests are queued
    separately (:class:`DynamicBatcher`); the model serves one batch at a time on a single thread.
    """

    def __init__(self, model_dir: str | Path | None = None, vocab_size: int | None = None, *,
                 teacher: Teacher | None = None, pad_id: int = 0, start_id: int = 0, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, num_threads: int | None = None, device: str = "cpu",
                 trust_remote_code: bool = False):
        if num_threads is not None:  # Ray sets OMP_NUM_THREADS; be deliberate about the intra-op threads
            torch.set_num_threads(max(1, int(num_threads)))
        if teacher is None:
            if model_dir is None or vocab_size is None:
                raise ValueError("TeacherServer needs a Teacher, or a model_dir and vocab_size")
            from transformers import AutoModelForSeq2SeqLM

            from tw_rl.models.factory import quiet_weight_loading

            quiet_weight_loading()  # in the actor's process (a worker_process_setup_hook is unpickled before the
            # job's code is importable)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), use_safetensors=True,
                                                          trust_remote_code=trust_remote_code)
            teacher = Teacher(model, vocab_size=vocab_size, pad_id=pad_id, start_id=start_id, device=device)
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


def _int_rows(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[int(x) for x in s] for s in seqs]


class RemoteTeacher:
    """A :class:`~tw_rl.envs.token_mdp.TeacherClient` backed by teacher replicas (Ray actors); picklable.

    Calls block (``ray.get``) — a rollout worker's decoding waits for its ``<τ>`` answers anyway. Each client talks
    to one replica; :meth:`for_worker` gives rollout worker ``i`` the replica ``i % num_replicas``.
    """

    def __init__(self, handles: Sequence[Any], replica: int = 0):
        if not handles:
            raise ValueError("RemoteTeacher needs at least one teacher actor")
        self.handles, self.replica = list(handles), replica % len(handles)
        self._instances: list[str | None] = [None] * len(self.handles)  # the driver's view (check_restarts)

    @property
    def _actor(self):
        return self.handles[self.replica]

    def for_worker(self, worker_index: int) -> "RemoteTeacher":
        return RemoteTeacher(self.handles, worker_index % len(self.handles))

    def next_tokens(self, src, prefixes) -> tuple[list[int], list[float]]:
        return ray.get(self._actor.next_tokens.remote(_int_rows(src), _int_rows(prefixes)))

    def score(self, src, outputs) -> list[np.ndarray]:
        return ray.get(self._actor.score.remote(_int_rows(src), _int_rows(outputs)))

    def distributions(self, src, outputs) -> list[torch.Tensor]:
        return ray.get(self._actor.distributions.remote(_int_rows(src), _int_rows(outputs)))

    def generate(self, src, max_len: int, eos_id: int) -> list[list[int]]:
        return ray.get(self._actor.generate.remote(_int_rows(src), max_len, eos_id))

    def stats(self) -> list[TeacherServerStats]:
        """One entry per replica."""
        return ray.get([h.stats.remote() for h in self.handles])

    def check_restarts(self) -> tuple[int, list[TeacherServerStats]]:
        """Replicas restarted since the previous check (a new ``instance``: Ray restarted a dead actor and re-sent
        the calls it had in flight, ``max_task_retries=-1``), and every replica's stats. The first check records
        the instances."""
        stats = self.stats()
        restarts = sum(old is not None and old != st.instance for old, st in zip(self._instances, stats))
        self._instances = [st.instance for st in stats]
        return restarts, stats


TeacherActor = ray.remote(TeacherServer)


def start_teacher(cfg: TeacherConfig, model_dir: str | Path | None = None, vocab_size: int | None = None, *,
                  teacher: Teacher | None = None, pad_id: int = 0, start_id: int = 0) -> RemoteTeacher:
    """Start ``cfg.num_replicas`` teacher actors (``cfg.num_cpus`` / ``cfg.num_gpus`` each) and return a client.

    Give ``model_dir`` + ``vocab_size`` (loaded inside each actor) or a ``teacher`` (pickled; fine for small
    models). Teacher calls are pure functions of their arguments, so a dead replica is restarted and the calls in
    flight are retried.
    """
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    handles = [TeacherActor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=-1,
                                    max_task_retries=-1).remote(
        None if model_dir is None else str(model_dir), vocab_size, teacher=teacher, pad_id=pad_id,
        start_id=start_id, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
        num_threads=max(1, int(cfg.num_cpus)), device=device, trust_remote_code=cfg.trust_remote_code)
        for _ in range(cfg.num_replicas)]
    client = RemoteTeacher(handles)
    client.check_restarts()  # waits until every replica has loaded its model; records their instances
    return client


# --------------------------------------------------------------------------------------------------------------
# rollout workers
# --------------------------------------------------------------------------------------------------------------
RolloutWorkerActor = ray.remote(RolloutWorker)


@dataclass
class GroupStats:
    """One :meth:`RolloutGroup.sample` call (metric namespace ``rollout/*``)."""

    policy_version: int
    episodes: int
    tokens: int
    teacher_calls: int  # rows answered by the teacher
    seconds: float  # wall time of the whole call (weights sync included)
    tokens_per_s: float  # tokens / seconds, all workers together
    restarts: int  # workers found restarted during this call
    restarts_total: int  # since the group started
    reissued: int  # sample calls sent again because their worker died
    stale_episodes: int  # episodes with policy_version < the current version
    workers: list[RolloutStats] = field(default_factory=list)
    teacher_restarts: int = 0  # teacher replicas found restarted during this call (Ray re-sent their calls)
    teacher_restarts_total: int = 0  # since the group started
    teacher_failed_requests: int = 0  # teacher requests that raised (summed over replicas, since they started)

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        keys = ["episodes", "tokens", "teacher_calls", "seconds", "tokens_per_s", "restarts", "restarts_total",
                "reissued", "stale_episodes"]
        out = {f"{prefix}{k}": getattr(self, k) for k in keys}
        out[f"{prefix}usage"] = self.teacher_calls / max(1, self.tokens)
        out.update({"teacher/restarts": self.teacher_restarts, "teacher/restarts_total": self.teacher_restarts_total,
                    "teacher/failed_requests": self.teacher_failed_requests})
        return out


class RolloutGroup:
    """``cfg.num_workers`` rollout workers sampling in parallel; or, in local mode, the same class in-process.

    Ray mode: every worker is a :data:`RolloutWorkerActor` with ``cfg.num_cpus`` / ``cfg.num_gpus`` and
    ``max_restarts=-1``; ``teacher`` should be a :class:`RemoteTeacher` (worker ``i`` gets replica
    ``i % replicas``). ``student``: a :class:`Student`, a picklable factory, or a saved student directory (loaded by
    each worker). ``examples`` are put in the object store once.

    Local mode (``local=True`` or ``cfg.num_workers == 0``): ``max(1, num_workers)`` :class:`RolloutWorker` objects
    in this process, called one after the other, with ``teacher`` used directly (a plain :class:`Teacher`).
    """

    def __init__(self, student: StudentSource | str | Path, teacher: TeacherClient, examples: Sequence[Example],
                 budgets: Sequence[float], cfg: RolloutConfig, *, max_len: int, eos_id: int, seed: int,
                 local: bool = False, pad_id: int = 0, start_id: int = 0, max_reissues: int = 3,
                 restart_timeout_s: float = 120.0, greedy_examples: Sequence[Example] | None = None,
                 greedy_budgets: Sequence[float] | None = None):
        if isinstance(student, (str, Path)):
            student = RolloutWorker.student_loader(student)
        self.local = local or cfg.num_workers == 0
        self.cfg, self.max_reissues, self.restart_timeout_s = cfg, max_reissues, restart_timeout_s
        self.version, self.restarts_total, self._calls = 0, 0, 0
        self.teacher_restarts_total = 0
        self._teacher = teacher if isinstance(teacher, RemoteTeacher) and not (local or cfg.num_workers == 0) else None
        self._weights: Any = None  # the latest weights (an ObjectRef in Ray mode)
        self._owned_teacher: RemoteTeacher | None = None
        n = max(1, cfg.num_workers)
        common = dict(max_len=max_len, eos_id=eos_id, temperature=cfg.temperature, batch_size=cfg.envs_per_worker,
                      greedy_fraction=cfg.greedy_fraction, greedy_budgets=list(greedy_budgets or budgets),
                      seed=seed, pad_id=pad_id, start_id=start_id)
        if self.local:  # each worker owns a replica, as under Ray (never the caller's module itself)
            self.workers = [RolloutWorker(copy.deepcopy(student) if isinstance(student, Student) else student,
                                          teacher, examples, budgets, worker_index=i,
                                          greedy_examples=greedy_examples, **common)
                            for i in range(n)]
            self._instances = [w.instance for w in self.workers]
            return
        # Constructor arguments are put in the object store once, and the group keeps the references: a restarted
        # actor re-reads them (ray-project/ray#53727: a restart fails once they go out of scope).
        self._init_refs = (ray.put(student), ray.put(list(examples)), ray.put(list(greedy_examples or [])))
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.workers = [
            RolloutWorkerActor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=-1,
                                       max_task_retries=0).remote(
                self._init_refs[0], teacher.for_worker(i) if hasattr(teacher, "for_worker") else teacher,
                self._init_refs[1],
                list(budgets), worker_index=i, num_threads=max(1, int(cfg.num_cpus)), device=device,
                greedy_examples=self._init_refs[2], **common)
            for i in range(n)]
        self._instances = [ident[1] for ident in ray.get([w.identity.remote() for w in self.workers])]

    @classmethod
    def from_config(cls, cfg: Config, student: StudentSource | str | Path, teacher_dir: str | Path | None,
                    examples: Sequence[Example], teacher: Teacher, *, eos_id: int | None = None,
                    local: bool | None = None,
                    greedy_examples: Sequence[Example] | None = None) -> "RolloutGroup":
        """The group a run configures: ``cfg.rollout`` workers, ``cfg.teacher`` replicas loaded from
        ``teacher_dir`` (Ray mode; ``teacher`` supplies ``|V|``, pad and start ids, and is used directly in local
        mode), episodes of at most ``cfg.data.max_tgt_tokens`` over the training budgets (``budget_sampling``; the
        greedy rows at the grid's levels), seeded by ``cfg.seed``.
        :meth:`close` also stops the teacher actors it started.
        """
        local = cfg.rollout.num_workers == 0 if local is None else local
        eos_id = teacher.model.config.eos_token_id if eos_id is None else eos_id
        client: TeacherClient = teacher
        owned = None
        if not local:
            check_resources(cfg)
            owned = client = start_teacher(cfg.teacher, teacher_dir, teacher.vocab_size,
                                           teacher=teacher if teacher_dir is None else None,
                                           pad_id=teacher.pad_id, start_id=teacher.start_id)
        group = cls(student, client, examples, training_budgets(cfg), cfg.rollout, max_len=cfg.data.max_tgt_tokens,
                    eos_id=eos_id, seed=cfg.seed, local=local, pad_id=teacher.pad_id, start_id=teacher.start_id,
                    greedy_examples=greedy_examples, greedy_budgets=cfg.budgets)
        group._owned_teacher = owned
        return group

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def sample(self, weights: dict[str, torch.Tensor] | Any | None, version: int,
               n_per_worker: int | None = None, seed: int | None = None) -> tuple[list[Episode], GroupStats]:
        """Sync ``weights`` (a state dict or an ObjectRef to one; ``None``: keep the current weights) as
        ``version``, then sample ``n_per_worker`` (default ``cfg.envs_per_worker``) episodes on every worker.

        A worker that dies is restarted by Ray; once it answers again (within ``restart_timeout_s``) its sample is
        sent again after the current weights, up to ``max_reissues`` times per call. A worker found restarted
        between calls (a new ``instance``) is counted too; if this call sent no weights, its episodes carry the old
        version (counted as stale) and the current weights follow for the next call. Returns the episodes in
        worker order and the call's stats.
        """
        t0 = time.perf_counter()
        self._calls += 1
        # per-call seeds: a re-issued sample draws what the lost one would have, and a resumed run (which passes
        # its iteration as ``seed``) draws what the uninterrupted run would have
        call_seed = self._calls if seed is None else int(seed)
        self._set_weights(weights, version)
        results, restarts, reissued = self._on_all_workers(
            "sample", [(n_per_worker, call_seed)] * self.num_workers, weights is not None)
        for i, res in enumerate(results):
            if res.stats.instance != self._instances[i]:  # restarted between calls (Ray): a new process
                restarts += 1
                self._instances[i] = res.stats.instance
                if res.stats.policy_version != self.version and self._weights is not None:
                    self.workers[i].set_weights.remote(self._weights, self.version)  # for the next call
        self.restarts_total += restarts
        t_restarts, t_failed = self._teacher_health()
        episodes = [e for r in results for e in r.episodes]
        tokens = sum(r.stats.tokens for r in results)
        seconds = time.perf_counter() - t0
        stats = GroupStats(
            policy_version=self.version, episodes=len(episodes), tokens=tokens,
            teacher_calls=sum(r.stats.teacher_calls for r in results), seconds=seconds,
            tokens_per_s=tokens / max(seconds, 1e-9), restarts=restarts, restarts_total=self.restarts_total,
            reissued=reissued, stale_episodes=sum(e.policy_version < self.version for e in episodes),
            workers=[r.stats for r in results], teacher_restarts=t_restarts,
            teacher_restarts_total=self.teacher_restarts_total, teacher_failed_requests=t_failed)
        return episodes, stats

    def _teacher_health(self) -> tuple[int, int]:
        """Teacher replicas restarted since the last call (counted in ``teacher_restarts_total``) and the failed
        requests of the replicas now running; (0, 0) without Ray teacher replicas."""
        if self._teacher is None:
            return 0, 0
        restarts, stats = self._teacher.check_restarts()
        self.teacher_restarts_total += restarts
        return restarts, sum(st.next_tokens.failed_requests + st.score.failed_requests for st in stats)

    def _set_weights(self, weights: dict[str, torch.Tensor] | Any | None, version: int) -> None:
        """Keep ``weights`` (``None``: the current ones) as ``version``: an ObjectRef in Ray mode, put once."""
        if weights is not None:
            if self.local:
                self._weights = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
            else:
                self._weights = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
            self.version = int(version)

    def _wait_until_alive(self, i: int) -> None:
        """Block until worker ``i`` answers again (Ray restarts it: a new process, its constructor re-run)."""
        deadline, pause = time.monotonic() + self.restart_timeout_s, 0.1
        while True:
            try:
                ray.get(self.workers[i].identity.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout worker {i} did not come back within {self.restart_timeout_s} s "
                                       f"after dying") from None
                time.sleep(pause)
                pause = min(2 * pause, 1.0)

    def _remote(self, i: int, method: str, with_weights: bool, args: tuple):
        w = self.workers[i]
        if with_weights and self._weights is not None:
            w.set_weights.remote(self._weights, self.version)  # calls from one caller run in order
        return getattr(w, method).remote(*args)

    def _on_all_workers(self, method: str, args: list[tuple], with_weights: bool) -> tuple[list, int, int]:
        """``worker_i.method(*args[i])`` on every worker (after the current weights when ``with_weights``): at once
        on Ray, where a worker that dies is restarted by Ray and, once it answers again (within
        ``restart_timeout_s``), its call is sent again after the current weights, up to ``max_reissues`` times; one
        after the other in local mode. Returns the results in worker order, the restarts seen and the calls sent
        again."""
        if self.local:
            results = []
            for w, a in zip(self.workers, args):
                if with_weights:
                    w.set_weights(self._weights, self.version)
                results.append(getattr(w, method)(*a))
            return results, 0, 0
        pending = {self._remote(i, method, with_weights, args[i]): i for i in range(self.num_workers)}
        results: list[Any] = [None] * self.num_workers
        attempts, restarts = [0] * self.num_workers, 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayActorError:
                attempts[i] += 1
                if attempts[i] > self.max_reissues:
                    raise
                self._wait_until_alive(i)  # calls sent while Ray restarts it would fail at once
                self._instances[i] = ray.get(self.workers[i].identity.remote())[1]
                restarts += 1
                pending[self._remote(i, method, True, args[i])] = i
        return results, restarts, sum(attempts)

    def call_states(self, weights: dict[str, torch.Tensor] | Any | None, version: int, indices: Sequence[int],
                    flip_batch: int = 1024) -> GateStates:
        """Sync ``weights`` as ``version``, then :meth:`RolloutWorker.call_states` on the training examples at
        ``indices``, split over the workers (worker ``i`` takes ``indices[i::num_workers]``); the states come
        back concatenated in worker order. A worker that dies is restarted by Ray and its share sent again (up to
        ``max_reissues`` times)."""
        self._set_weights(weights, version)
        shares = [list(indices[i::self.num_workers]) for i in range(self.num_workers)]
        results, restarts, _ = self._on_all_workers("call_states", [(share, flip_batch) for share in shares],
                                                     weights is not None)
        self.restarts_total += restarts
        return GateStates.concat(results)

    def close(self) -> None:
        """Kill the workers (Ray mode) and the teacher actors started by :meth:`from_config`; the group is
        unusable afterwards."""
        if not self.local:
            for w in self.workers:
                ray.kill(w, no_restart=True)
        if self._owned_teacher is not None:
            for h in self._owned_teacher.handles:
                ray.kill(h, no_restart=True)
            self._owned_teacher = None
        self.workers = []
