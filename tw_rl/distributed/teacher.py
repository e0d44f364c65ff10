"""The teacher on Ray: ``TeacherActor`` (the plain :class:`~tw_rl.teacher_server.TeacherServer` as an actor),
:func:`start_teacher` (the replicas a run configures) and :class:`RemoteTeacher`, the picklable client the rollout
workers call."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from tw_rl.config import TeacherConfig
from tw_rl.teacher import Teacher
from tw_rl.teacher_server import TeacherServer, TeacherServerStats


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
        num_threads=max(1, int(cfg.num_cpus)), device=device, trust_remote_code=cfg.trust_remote_code,
        gguf_file=cfg.gguf_file,  # a given GGUF teacher: its file in the directory (set only with name_or_path)
        stack_caches=cfg.stack_caches, reuse_prefixes=cfg.reuse_prefixes)
        for _ in range(cfg.num_replicas)]
    client = RemoteTeacher(handles)
    client.check_restarts()  # waits until every replica has loaded its model; records their instances
    return client
