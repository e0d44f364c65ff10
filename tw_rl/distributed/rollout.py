"""Rollout workers on Ray: ``RolloutWorkerActor = ray.remote(RolloutWorker)`` and :class:`RolloutGroup`, which
samples from all workers in parallel, restarts dead ones and counts stale episodes; with ``local=True`` (or no
workers) it runs the same :class:`~tw_rl.rollout.RolloutWorker` in-process and never touches Ray."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from tw_rl.envs.token_mdp import Example, TeacherClient
from tw_rl.batch import Episode
from tw_rl.config import Config, RolloutConfig, training_budgets
from tw_rl.distributed.cluster import check_resources
from tw_rl.distributed.teacher import RemoteTeacher, start_teacher
from tw_rl.models.student import Student
from tw_rl.refit import GateStates
from tw_rl.rollout import RolloutStats, RolloutWorker, StudentSource
from tw_rl.teacher import Teacher


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
