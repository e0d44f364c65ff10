"""The replay buffer of phase 2 (SPEC.md §4): demonstrations plus a ring of recent on-policy episodes.

It knows nothing about algorithms. It stores and returns whole :class:`~tw_rl.batch.Episode` objects — never
transitions or sub-paths — because a transformer decoder needs the whole prefix ``X_in[<t]`` to compute the state
of step ``t``: a sub-path cut out of an episode has no state without its prefix. The learner therefore runs one
forward pass over each sampled episode and forms every sub-path of it inside the loss, vectorised
(:func:`tw_rl.algos.pcl.pcl_consistency`).

Demonstrations (teacher outputs, phase-1 oracle traces) are seeded once and never evicted; on-policy episodes live
in a ring of ``capacity`` slots, the oldest overwritten first. A sample mixes the two by ``on_policy_fraction``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from tw_rl.batch import Episode
from tw_rl.budget import grid_level

_ARRAY_FIELDS = ("actions", "tokens", "teacher_logprobs", "behavior_logprobs")


class ReplayBuffer:
    """Demonstrations (never evicted) + a ring buffer of on-policy episodes (SPEC §4)."""

    def __init__(self, capacity: int, on_policy_fraction: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction={on_policy_fraction} must be in [0, 1]")
        self.capacity = capacity
        self.on_policy_fraction = on_policy_fraction
        self._demos: list[Episode] = []
        self._slots: list[Episode] = []  # grows to `capacity`, then is overwritten at `_next`
        self._next = 0  # the slot the next on-policy episode is written to (the oldest one once full)

    # ---- filling --------------------------------------------------------------------------------------------
    def add_demos(self, episodes: Iterable[Episode]) -> None:
        """Add demonstrations; they are kept for the whole run."""
        self._demos.extend(episodes)

    def add(self, episodes: Iterable[Episode]) -> None:
        """Add on-policy episodes, evicting the oldest once ``capacity`` is reached."""
        for e in episodes:
            if len(self._slots) < self.capacity:
                self._slots.append(e)
            else:
                self._slots[self._next] = e
            self._next = (self._next + 1) % self.capacity

    # ---- reading --------------------------------------------------------------------------------------------
    @property
    def num_demos(self) -> int:
        return len(self._demos)

    @property
    def num_onpolicy(self) -> int:
        return len(self._slots)

    def __len__(self) -> int:
        return self.num_demos + self.num_onpolicy

    def onpolicy_episodes(self) -> list[Episode]:
        """The on-policy episodes, oldest first."""
        if len(self._slots) < self.capacity:
            return list(self._slots)
        return self._slots[self._next:] + self._slots[:self._next]

    def demos(self) -> list[Episode]:
        return list(self._demos)

    def sample(self, n: int, rng: np.random.Generator) -> list[Episode]:
        """``round(on_policy_fraction · n)`` on-policy episodes and the rest demonstrations, uniformly with
        replacement; all from one pool when the other is empty. On-policy episodes come first in the list."""
        if not self._slots and not self._demos:
            raise ValueError("cannot sample from an empty replay buffer")
        if not self._slots:
            n_on = 0
        elif not self._demos:
            n_on = n
        else:
            n_on = int(round(self.on_policy_fraction * n))
        on = rng.integers(0, len(self._slots), size=n_on) if n_on else np.empty(0, dtype=np.int64)
        off = rng.integers(0, len(self._demos), size=n - n_on) if n - n_on else np.empty(0, dtype=np.int64)
        return [self._slots[i] for i in on] + [self._demos[i] for i in off]

    def recent_usage(self, budget_levels: Iterable[float], last_n: int) -> dict[float, float]:
        """Mean usage (SPEC §5) of the ``last_n`` most recent on-policy episodes of each budget level.

        Levels with no on-policy episode yet are left out, so a dual update does not move their multiplier.
        """
        recent = self.onpolicy_episodes()[::-1]  # newest first
        out: dict[float, float] = {}
        for level in budget_levels:
            usages = [e.usage() for e in recent if grid_level(e.budget, [level]) is not None][:last_n]
            if usages:
                out[float(level)] = float(np.mean(usages))
        return out

    # ---- state: flat arrays (safetensors-ready) + a JSON-able dict --------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: per pool, every variable-length field concatenated with ``offsets``, plus the
        scalars per episode; ``meta`` holds capacity, fraction, the ring's write pointer and the source names.
        No pickle. On-policy episodes are stored in slot order so that a restored buffer samples identically."""
        arrays: dict[str, np.ndarray] = {}
        sources: list[str] = sorted({e.source for e in self._demos + self._slots})
        for pool, eps in (("demos", self._demos), ("onpolicy", self._slots)):
            arrays.update(_pack(pool, eps, sources))
        meta = {
            "capacity": self.capacity,
            "on_policy_fraction": self.on_policy_fraction,
            "next": self._next,
            "sources": sources,
        }
        return arrays, meta

    @classmethod
    def from_state_dict(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "ReplayBuffer":
        """Inverse of :meth:`state_dict`."""
        buf = cls(int(meta["capacity"]), float(meta["on_policy_fraction"]))
        buf._demos = _unpack("demos", arrays, meta["sources"])
        buf._slots = _unpack("onpolicy", arrays, meta["sources"])
        buf._next = int(meta["next"])
        return buf


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)


def _pack(pool: str, eps: list[Episode], sources: list[str]) -> dict[str, np.ndarray]:
    p = f"{pool}."
    return {
        p + "src_ids": _cat([e.src_ids for e in eps], np.int64),
        p + "src_offsets": _offsets([len(e.src_ids) for e in eps]),
        p + "actions": _cat([e.actions for e in eps], np.int64),
        p + "tokens": _cat([e.tokens for e in eps], np.int64),
        p + "teacher_logprobs": _cat([e.teacher_logprobs for e in eps], np.float32),
        p + "behavior_logprobs": _cat([e.behavior_logprobs for e in eps], np.float32),
        p + "offsets": _offsets([len(e) for e in eps]),
        p + "budget": np.array([e.budget for e in eps], dtype=np.float64),
        p + "terminated": np.array([e.terminated for e in eps], dtype=bool),
        p + "policy_version": np.array([e.policy_version for e in eps], dtype=np.int64),
        p + "source": np.array([sources.index(e.source) for e in eps], dtype=np.int64),
        # the teacher's ids of x; an episode without them has offsets of an empty span and known=False
        p + "teacher_src": _cat([e.teacher_src for e in eps if e.teacher_src is not None], np.int64),
        p + "teacher_src_offsets": _offsets([0 if e.teacher_src is None else len(e.teacher_src) for e in eps]),
        p + "teacher_src_known": np.array([e.teacher_src is not None for e in eps], dtype=bool),
    }


def _unpack(pool: str, arrays: dict[str, np.ndarray], sources: list[str]) -> list[Episode]:
    p = f"{pool}."
    src, so, off = arrays[p + "src_ids"], arrays[p + "src_offsets"], arrays[p + "offsets"]
    tsrc, tso, known = arrays[p + "teacher_src"], arrays[p + "teacher_src_offsets"], arrays[p + "teacher_src_known"]
    out: list[Episode] = []
    for i in range(len(off) - 1):
        a, b = int(off[i]), int(off[i + 1])
        out.append(Episode(
            src_ids=src[so[i]:so[i + 1]].copy(),
            **{f: arrays[p + f][a:b].copy() for f in _ARRAY_FIELDS},
            budget=float(arrays[p + "budget"][i]),
            terminated=bool(arrays[p + "terminated"][i]),
            policy_version=int(arrays[p + "policy_version"][i]),
            source=sources[int(arrays[p + "source"][i])],
            teacher_src=tsrc[tso[i]:tso[i + 1]].copy() if known[i] else None,
        ))
    return out

