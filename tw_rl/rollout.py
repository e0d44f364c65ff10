"""On-policy data collection: a plain rollout worker (no Ray in here).

A :class:`RolloutWorker` holds one student replica and a teacher client. :meth:`RolloutWorker.sample` draws
examples and budgets, decodes them together with :func:`tw_rl.decoding.decode` (the student's sampled actions,
``<τ>`` answered by ``teacher.next_tokens``), scores every output with ONE batched ``teacher.score`` call (the
reward ``r_t = log π_T(y_t | x, X_out[<t])``, SPEC §3) and returns :class:`~tw_rl.batch.Episode` objects stamped
with the weights' ``policy_version``. :mod:`tw_rl.distributed.rollout` wraps this class in a thin Ray actor; local mode
uses it as is.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tw_rl.envs.token_mdp import Example, TeacherClient
from tw_rl.batch import Episode, Source
from tw_rl.decoding import decode
from tw_rl.examples import pad_batch
from tw_rl.models.student import Student
from tw_rl.refit import GateStates, collect_states

StudentSource = Student | Callable[[], Student]


@dataclass
class RolloutStats:
    """What one :meth:`RolloutWorker.sample` call did (metric namespace ``rollout/*``)."""

    worker_index: int
    instance: str  # id of the worker object: changes when a (Ray) worker is restarted
    policy_version: int  # weights version the episodes were generated with
    episodes: int
    tokens: int  # output tokens generated (student's and teacher's)
    teacher_calls: int  # rows answered by the teacher (<τ> actions)
    teacher_requests: int  # batched next_tokens requests sent (≤ decoding steps)
    decode_seconds: float  # student decoding, teacher <τ> answers included
    score_seconds: float  # the one batched teacher.score call (rewards)
    seconds: float  # the whole sample call
    tokens_per_s: float  # tokens / seconds

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutResult:
    """The episodes of one :meth:`RolloutWorker.sample` call and what it cost."""

    episodes: list[Episode]
    stats: RolloutStats


class _CountingTeacher:
    """Counts the ``<τ>`` requests and rows that pass through to the real teacher client."""

    def __init__(self, teacher: TeacherClient):
        self.teacher, self.requests, self.rows = teacher, 0, 0

    def next_tokens(self, src, prefixes):
        self.requests += 1
        self.rows += len(prefixes)
        return self.teacher.next_tokens(src, prefixes)

    def score(self, src, outputs):
        return self.teacher.score(src, outputs)


def _load_student(path: str) -> Student:
    from tw_rl.models.factory import quiet_weight_loading

    quiet_weight_loading()  # runs in the (Ray) worker that loads it: no weight-loading bar per worker
    return Student.load(path)[0]


class RolloutWorker:
    """Generates on-policy episodes of the token MDP with a student replica.

    ``student`` is a :class:`Student` or a picklable zero-argument factory returning one (e.g. the loader made by
    :meth:`from_student_dir`, so a Ray actor loads the weights from disk instead of receiving them pickled).
    ``teacher`` answers ``<τ>`` and scores outputs (a :class:`~tw_rl.teacher.Teacher` in local mode, a
    ``RemoteTeacher`` under Ray). ``budgets`` is the grid drawn from uniformly (``greedy_budgets``, if given, for
    the greedy rows); every example must have a ``student_src`` for each. Randomness: a numpy generator for examples and budgets and a torch generator for
    actions, both seeded from ``(seed, worker_index)``; :meth:`sample` with ``seed=`` uses a fresh pair seeded
    from ``(seed, worker_index, call seed)`` instead, which makes a call reproducible even on a restarted worker.
    """

    def __init__(self, student: StudentSource, teacher: TeacherClient, examples: Sequence[Example],
                 budgets: Sequence[float], max_len: int, eos_id: int, temperature: float, batch_size: int,
                 seed: int, worker_index: int = 0, num_threads: int | None = None, pad_id: int = 0,
                 start_id: int = 0, device: str = "cpu", greedy_fraction: float = 0.0,
                 greedy_examples: Sequence[Example] | None = None, greedy_budgets: Sequence[float] | None = None):
        if num_threads is not None:  # under Ray, OMP_NUM_THREADS may say 1 whatever the actor's CPUs
            torch.set_num_threads(max(1, int(num_threads)))
        if not examples:
            raise ValueError("RolloutWorker needs at least one example")
        if not budgets:
            raise ValueError("RolloutWorker needs at least one budget")
        self.budgets = [float(b) for b in budgets]
        # the greedy rows' budgets (the levels the constraint is enforced at); default: the same as sampled rows'
        self.greedy_budgets = [float(b) for b in (greedy_budgets or budgets)]
        for i, ex in enumerate(examples):
            missing = [b for b in self.budgets if b not in ex.student_src]
            if missing:
                raise ValueError(f"example {i} has no student input for budgets {missing}; "
                                 f"it has {sorted(ex.student_src)}")
        if temperature < 0 or batch_size < 1 or max_len < 1:
            raise ValueError(f"need temperature >= 0, batch_size >= 1, max_len >= 1; got {temperature}, "
                             f"{batch_size}, {max_len}")
        self.device = torch.device(device)
        self.student = (student if isinstance(student, Student) else student()).to(self.device).eval()
        self.teacher = teacher
        self.examples = list(examples)
        # held-out inputs for the greedy rows (their usage drives the multipliers; they are not trained on)
        self.greedy_examples = list(greedy_examples) if greedy_examples else None
        for i, ex in enumerate(self.greedy_examples or []):
            if any(b not in ex.student_src for b in self.greedy_budgets):
                raise ValueError(f"greedy example {i} lacks student inputs for some of the budgets "
                                 f"{self.greedy_budgets}")
        self.max_len, self.eos_id, self.temperature, self.batch_size = max_len, eos_id, temperature, batch_size
        self.greedy_fraction = float(greedy_fraction)
        self.seed, self.worker_index, self.pad_id, self.start_id = seed, worker_index, pad_id, start_id
        self.version = 0
        self.instance = uuid.uuid4().hex[:12]
        self._rng, self._gen = self._generators(seed, worker_index)

    @classmethod
    def from_student_dir(cls, path: str | Path, teacher: TeacherClient, examples: Sequence[Example],
                         budgets: Sequence[float], **kwargs) -> "RolloutWorker":
        """A worker whose student is ``Student.load(path)`` (``kwargs``: the other constructor arguments)."""
        return cls(cls.student_loader(path), teacher, examples, budgets, **kwargs)

    @staticmethod
    def student_loader(path: str | Path) -> Callable[[], Student]:
        """A picklable factory that loads a saved student directory (``Student.load``)."""
        return functools.partial(_load_student, str(path))

    def _generators(self, *seed: int) -> tuple[np.random.Generator, torch.Generator]:
        """numpy (examples, budgets) and torch (actions, on the student's device) generators from one seed."""
        ss = np.random.SeedSequence([int(s) for s in seed])
        torch_seed = int(ss.spawn(1)[0].generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        return np.random.default_rng(ss), torch.Generator(device=self.device).manual_seed(torch_seed)

    # ----------------------------------------------------------------------------------------------------------
    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load the learner's student weights (``Student.state_dict()``); later episodes carry ``version``."""
        self.student.load_state_dict(state_dict)
        self.version = int(version)

    def identity(self) -> tuple[int, str, int]:
        """``(worker_index, instance, policy_version)``: lets a driver notice a restarted worker."""
        return self.worker_index, self.instance, self.version

    @torch.no_grad()
    def sample(self, n: int | None = None, seed: int | None = None) -> RolloutResult:
        """Decode ``n`` (default ``batch_size``) episodes of uniformly drawn examples and budgets, together.

        Actions are sampled at ``temperature`` over ``V ∪ {<τ>}``, except for the first
        ``round(greedy_fraction · n)`` rows, which decode greedily (``source="greedy"``: the usage of the policy as
        it is deployed) — on inputs drawn from ``greedy_examples`` when the worker has them
        (``source="greedy_heldout"``); rewards come from one batched ``teacher.score`` over all outputs.
        """
        t0 = time.perf_counter()
        n = self.batch_size if n is None else int(n)
        rng, gen = (self._rng, self._gen) if seed is None else self._generators(self.seed, self.worker_index, seed)
        idx = rng.integers(len(self.examples), size=n)
        budgets = [self.budgets[j] for j in rng.integers(len(self.budgets), size=n)]
        examples = [self.examples[i] for i in idx]
        n_greedy = int(round(self.greedy_fraction * n))
        if n_greedy and self.greedy_budgets != self.budgets:
            budgets[:n_greedy] = [self.greedy_budgets[j] for j in rng.integers(len(self.greedy_budgets), size=n_greedy)]
        if self.greedy_examples and n_greedy:
            held = rng.integers(len(self.greedy_examples), size=n_greedy)
            examples[:n_greedy] = [self.greedy_examples[i] for i in held]
        greedy_source = Source.GREEDY_HELDOUT if self.greedy_examples else Source.GREEDY
        src = [ex.student_src[b] for ex, b in zip(examples, budgets)]
        teacher_src = [ex.teacher_src for ex in examples]
        src_ids, src_mask = pad_batch(src, self.pad_id, self.device)

        teacher = _CountingTeacher(self.teacher)
        temperature: float | torch.Tensor = self.temperature
        if n_greedy:  # the first rows act as the deployed (greedy) policy acts
            temperature = torch.full((n,), float(self.temperature), device=self.device)
            temperature[:n_greedy] = 0.0
        out = decode(self.student, src_ids, src_mask, max_len=self.max_len, eos_id=self.eos_id, teacher=teacher,
                     teacher_src=teacher_src, start_id=self.start_id, pad_id=self.pad_id,
                     temperature=temperature, generator=gen if self.temperature > 0 else None)
        t1 = time.perf_counter()
        outputs = [out.tokens[k, :out.lengths[k]].tolist() for k in range(n)]
        rewards = self.teacher.score(teacher_src, outputs)
        t2 = time.perf_counter()

        episodes = []
        for k in range(n):
            L = int(out.lengths[k])
            episodes.append(Episode(
                src_ids=np.asarray(src[k], dtype=np.int64), actions=out.actions[k, :L].copy(),
                tokens=out.tokens[k, :L].copy(), teacher_logprobs=np.asarray(rewards[k], dtype=np.float32),
                behavior_logprobs=out.behavior_logprobs[k, :L].copy(), budget=budgets[k],
                terminated=bool(out.terminated[k]), policy_version=self.version,
                source=greedy_source if k < n_greedy else Source.ONPOLICY,
                teacher_src=np.asarray(teacher_src[k], dtype=np.int64)))
        tokens = int(out.lengths.sum())
        seconds = time.perf_counter() - t0
        stats = RolloutStats(worker_index=self.worker_index, instance=self.instance, policy_version=self.version,
                             episodes=n, tokens=tokens, teacher_calls=teacher.rows,
                             teacher_requests=teacher.requests, decode_seconds=t1 - t0, score_seconds=t2 - t1,
                             seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9))
        return RolloutResult(episodes, stats)

    @torch.no_grad()
    def call_states(self, indices: Sequence[int], flip_batch: int = 1024) -> GateStates:
        """Phase 2's call learner (``rl.call_learner=rollout``): greedy episodes of the training examples at
        ``indices``, example ``k`` at the ``k % L``-th positive budget of the grid, with the Monte-Carlo advantage
        of a call at every visited state (:func:`tw_rl.refit.collect_states` with ``target="advantage"``)."""
        levels = [b for b in self.greedy_budgets if b > 0]
        if not levels:
            raise ValueError("the call learner needs a positive budget in the grid")
        return collect_states(self.student, self.teacher, [self.examples[int(i)] for i in indices], levels,
                              max_len=self.max_len, eos_id=self.eos_id, pad_id=self.pad_id, start_id=self.start_id,
                              batch_size=self.batch_size, target="advantage", flip_batch=flip_batch)
