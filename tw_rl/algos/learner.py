"""The ``Learner`` protocol: what the phase-2 driver (tw_rl/train.py ``rl_loop``) needs from a learner.

A learner is built by its module's ``make_learner(cfg, student, start_id, pad_id, **context)`` (the registry,
:mod:`tw_rl.algos`) and consumed in one of two ways, which the learner declares:

- ``owns_loop = False`` (every learner but RLlib's): the driver samples episodes, fills the replay buffer and
  calls :meth:`Learner.update` on each batch with the batch's multipliers, plus the extra inputs the learner names
  in ``inputs`` (:data:`COST_BATCH`: greedy on-policy episodes for the cost value; :data:`TEACHER_SRC`: the
  teacher's input ids of every episode, for learners that query the teacher at update time).
- ``owns_loop = True``: the algorithm samples and trains in its own loop (RLlib's PPO); the driver calls
  :meth:`Learner.run` once with the run, the logger and ``resume``, and takes the student it returns.

Learners subclass :class:`Learner` to inherit these defaults (a ``typing.Protocol`` may be subclassed
explicitly); ``tests/test_algos.py`` checks that every registered learner conforms.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from tw_rl.batch import EpisodeBatch

COST_BATCH = "cost_batch"  # EpisodeBatch | None: greedy on-policy episodes whose usage trains V_C
TEACHER_SRC = "teacher_src"  # list[list[int]]: per episode, the teacher's ids of x (no budget prompt)


@runtime_checkable
class Learner(Protocol):
    """A phase-2 learner: the student it trains, one update per batch, and its state for checkpoints."""

    owns_loop: ClassVar[bool] = False  # True: :meth:`run` samples and trains itself (the driver's loop is unused)
    inputs: ClassVar[frozenset[str]] = frozenset()  # extra keyword inputs of update(): COST_BATCH, TEACHER_SRC
    student: Any  # the tw_rl.models.student.Student (or any module) being trained
    value: Any = None  # the critic heads [V_φ, V_C] (tw_rl.models.value.ValueHead) where the learner has them

    def update(self, batch: EpisodeBatch, lambdas: torch.Tensor, **inputs: Any) -> dict[str, float]:
        """One learning step on ``batch`` with per-episode multipliers ``lambdas [B]``; returns metrics."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint needs to continue exactly (weights, optimiser moments, step)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        ...

    def run(self, run: Any, log: Any, resume: bool) -> Any:
        """``owns_loop`` learners only: phase 2 in the algorithm's own loop; returns the trained student."""
        raise NotImplementedError(f"{type(self).__name__} does not own its loop (owns_loop=False): the driver "
                                  "calls update()")

    def close(self) -> None:
        """Release what the learner holds outside this process (actors, process groups). Default: nothing."""
