"""Data-parallel PCL learning: ``learner.num_workers`` Ray actors, each a DDP replica of the student.

:class:`DataParallelLearner` has the interface of :class:`~tw_rl.algos.pcl.PCLLearner` (``update``, ``student``,
``state_dict``, ``load_state_dict``, ``step``) and is what ``train.phase2`` uses when ``learner.num_workers ≥ 1``
and ``algo=pcl``. Each worker (:class:`LearnerWorker`) holds a whole ``PCLLearner`` — student, Polyak target,
AdamW — and wraps its student in :class:`torch.nn.parallel.DistributedDataParallel`; the workers form one
``torch.distributed`` process group (gloo on CPU, NCCL with ``learner.use_gpu``). Every update the driver splits the
batch into contiguous shards, one per worker; DDP all-reduces (averages) the gradients during ``backward``, so the
gradient clipping, the AdamW step and the Polyak update that follow act on the same averaged gradient on every
worker and the replicas stay identical.

Exactness. PCL's loss is a mean over the batch's real steps, ``Σ_steps ℓ / N``. Worker ``k`` computes the mean over
its own ``N_k`` steps and scales it by ``W · N_k / N`` (``W`` workers) so that DDP's average is exactly the
full-batch gradient (tested against the single-process learner). A batch with fewer episodes than workers gives the
idle workers one episode at weight 0: every rank must join every all-reduce.

Why plain Ray actors rather than Ray Train's ``TorchTrainer``: the trainer runs a training function to completion,
while this learner is called once per update from the driver's sampling loop (rollouts, replay buffer, multipliers,
checkpoints stay in the driver). The actors do what Ray Train's ``TorchConfig`` backend does — rank 0 publishes an
address and a free port, every rank calls ``init_process_group`` — in a dozen lines (docs/design.md).
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import ray
import torch
from torch import nn

from tw_rl.algos.learner import Learner
from tw_rl.algos.pcl import PCLLearner
from tw_rl.batch import EpisodeBatch
from tw_rl.config import Config, RLConfig
from tw_rl.distributed.cluster import shortfall

# stats that are means over episodes (the others are means over real steps)
_EPISODE_MEANS = ("value/v_start", "rollout/length")
# stats equal on every worker (taken from rank 0)
_SHARED = ("loss/grad_norm", "learner/step")


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class LearnerWorker:
    """One rank: a :class:`PCLLearner` whose student is wrapped in DDP. ``ray.remote`` makes it an actor."""

    def __init__(self, cfg: RLConfig, student: nn.Module, start_id: int, pad_id: int, rank: int, world_size: int,
                 use_gpu: bool = False, num_threads: int = 1, seed: int = 0) -> None:
        torch.set_num_threads(num_threads)  # Ray sets OMP_NUM_THREADS per actor; be explicit (ENVIRONMENT.md)
        torch.manual_seed(seed + rank)
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.learner = PCLLearner(cfg, student.to(self.device), start_id, pad_id)
        self.ddp: nn.Module | None = None

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address: this node's IP and a free port."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_process_group(self, addr: str, port: int, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        dist.init_process_group("nccl" if self.use_gpu else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        student = self.learner.student
        self.ddp = nn.parallel.DistributedDataParallel(  # δ is an unused parameter when student.use_delta is false
            student, device_ids=[0] if self.use_gpu else None,
            find_unused_parameters=getattr(student, "use_delta", True) is False)

    def update(self, shard: EpisodeBatch, lambdas: torch.Tensor, weight: float) -> dict[str, float]:
        """One step on this rank's shard; ``weight = W · N_k / N`` makes DDP's average the full-batch gradient."""
        assert self.ddp is not None, "init_process_group first"
        learner = self.learner
        shard = shard.to(self.device)
        loss, stats = learner.compute_loss(shard, lambdas, net=self.ddp)
        grad_norm = learner.apply_gradients(loss * weight)
        stats.update(learner.batch_stats(shard, grad_norm))
        stats["_steps"] = float(shard.mask.sum()) if weight > 0 else 0.0
        stats["_episodes"] = float(len(shard)) if weight > 0 else 0.0
        return stats

    def student_state(self) -> dict[str, torch.Tensor]:
        return _cpu(self.learner.student.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _cpu(self.learner.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_dict(state)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def split_batch(batch: EpisodeBatch, lambdas: torch.Tensor, n: int
                ) -> list[tuple[EpisodeBatch, torch.Tensor, float]]:
    """``n`` contiguous shards ``(shard, λ shard, weight)`` with ``weight = n · N_k / N`` (``N_k`` real steps).
    Shards are slices of the padded batch (padding does not change the loss). With fewer episodes than shards, the
    extra shards hold episode 0 at weight 0."""
    B = len(batch)
    total = float(batch.mask.sum().clamp(min=1))
    bounds = [round(i * B / n) for i in range(n + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            a, b, idle = 0, 1, True
        else:
            idle = False
        shard = EpisodeBatch(**{k: v[a:b] for k, v in vars(batch).items()})
        weight = 0.0 if idle else n * float(shard.mask.sum()) / total
        out.append((shard, lambdas[a:b], weight))
    return out


def merge_stats(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """Full-batch stats from shard stats: step means weighted by real steps, episode means by episodes."""
    steps = sum(s["_steps"] for s in per_worker)
    episodes = sum(s["_episodes"] for s in per_worker)
    out: dict[str, float] = {}
    for k in per_worker[0]:
        if k.startswith("_"):
            continue
        if k in _SHARED:
            out[k] = per_worker[0][k]
        elif k in _EPISODE_MEANS:
            out[k] = sum(s[k] * s["_episodes"] for s in per_worker) / max(episodes, 1.0)
        else:
            out[k] = sum(s[k] * s["_steps"] for s in per_worker) / max(steps, 1.0)
    return out


def _check_resources(num_workers: int, num_cpus: float, use_gpu: bool) -> None:
    """Raise instead of waiting forever for actors a local Ray cannot place (a ``RAY_ADDRESS`` cluster may scale)."""
    short = shortfall({"CPU": num_workers * num_cpus, "GPU": num_workers * float(use_gpu)})
    if short is not None:
        kind, need, have = short
        raise ValueError(f"{num_workers} learner workers need {need:g} {kind}s but Ray has {have:g}; lower "
                         f"learner.num_workers or learner.worker_num_cpus (fractions are allowed), or "
                         f"learner.use_gpu=false")


class DataParallelLearner(Learner):
    """``num_workers`` :class:`LearnerWorker` actors behind the :class:`PCLLearner` interface.

    ``student`` is the driver's copy, refreshed from rank 0 when read after an update (the rollout broadcast and the
    final save read it); ``state_dict`` is rank 0's (all ranks are identical), ``load_state_dict`` goes to every rank.
    Needs Ray initialised.
    """

    def __init__(self, cfg: RLConfig, student: nn.Module, start_id: int, pad_id: int, num_workers: int,
                 use_gpu: bool = False, num_cpus: float = 0.5, seed: int = 0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: need at least one learner worker")
        self.cfg = cfg
        self._student = student
        self._stale = False
        self.step = 0
        _check_resources(num_workers, num_cpus, use_gpu)
        actor = ray.remote(LearnerWorker).options(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0)
        student_ref = ray.put(student)
        self.workers = [actor.remote(cfg, student_ref, start_id, pad_id, rank, num_workers, use_gpu,
                                     max(1, int(num_cpus)), seed) for rank in range(num_workers)]
        addr, port = ray.get(self.workers[0].address.remote())
        ray.get([w.init_process_group.remote(addr, port) for w in self.workers])

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, start_id: int, pad_id: int) -> "DataParallelLearner":
        lc = cfg.learner
        return cls(cfg.rl, student, start_id, pad_id, lc.num_workers, lc.use_gpu, lc.worker_num_cpus, cfg.seed)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def student(self) -> nn.Module:
        if self._stale:
            self._student.load_state_dict(ray.get(self.workers[0].student_state.remote()))
            self._stale = False
        return self._student

    def update(self, batch: EpisodeBatch, lambdas: torch.Tensor) -> dict[str, float]:
        shards = split_batch(batch, torch.as_tensor(lambdas), self.num_workers)
        stats = merge_stats(ray.get([w.update.remote(s, lam, wt) for w, (s, lam, wt) in zip(self.workers, shards)]))
        self._stale = True
        self.step += 1
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get(self.workers[0].state_dict.remote())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ref = ray.put(state)
        ray.get([w.load_state_dict.remote(ref) for w in self.workers])
        self.step = int(state["learner.step"])
        self._stale = True

    def close(self) -> None:
        """Tear down the process group and the actors (idempotent)."""
        if not self.workers:
            return
        try:  # the driver's student keeps the last weights (it is saved after phase 2)
            _ = self.student
        except Exception:
            pass
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=30)
        except Exception:  # a dead rank: killing is enough
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def make_learner(cfg: Config, student: nn.Module, start_id: int, pad_id: int, **_: Any) -> DataParallelLearner:
    """Like :func:`tw_rl.algos.pcl.make_learner`, data-parallel over ``cfg.learner.num_workers`` actors."""
    return DataParallelLearner.from_config(cfg, student, start_id, pad_id)

