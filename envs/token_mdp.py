"""The token MDP of Training Wheels (SPEC §2, §3, §5) as a Gymnasium environment, single and batched.

No Ray and no model in here: the teacher is injected as a :class:`TeacherClient`, so the environment is tested
with any object that answers the two questions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TeacherClient(Protocol):
    """What the environment (and the rollout workers) ask the teacher. Token ids are plain ints.

    ``src`` is the teacher's input (the source *without* the budget prompt); a prefix is ``X_out[<t]`` without
    the decoder start token.
    """

    def next_tokens(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                    ) -> tuple[list[int], list[float]]:
        """Greedy next token ``w_t`` and ``log π_T(w_t | x, prefix)`` for each row."""
        ...

    def score(self, src: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """``log π_T(y_t | x, y_<t)`` for every token of every output (float32 array per row)."""
        ...


@dataclass
class Example:
    """One input of the MDP: the student's ids depend on the budget prompt, the teacher's do not."""

    teacher_src: list[int]  # tokenized x (with EOS), what the teacher conditions on
    student_src: dict[float, list[int]]  # budget → tokenized (prompt(b) + x)
    text: str = ""
    reference: str = ""


class TokenMDPBatch:
    """``N`` episodes of the token MDP stepped together (the batched form used by rollout workers).

    State of row ``i``: ``X_out`` (``tokens[i, :t]``) and the teacher-token mask (``teacher_mask[i, :t]``), the
    step ``t`` and whether the episode is over. Rows that are over ignore their actions and get reward 0.

    The decoding loop (``tw_rl.decoding.decode_with``) writes the same transition again in torch, on the student's
    device and without the rewards (which would cost a ``teacher.score`` per step); tests/test_env.py steps the
    two in lockstep and checks they agree at every step.
    """

    def __init__(self, teacher: TeacherClient, tau_id: int, eos_id: int, max_len: int, pad_id: int = 0):
        self.teacher, self.tau_id, self.eos_id, self.max_len, self.pad_id = teacher, tau_id, eos_id, max_len, pad_id
        self.lam = np.zeros(0, dtype=np.float64)

    def reset(self, examples: Sequence[Example], budgets: Sequence[float], lam: Sequence[float] | float = 0.0):
        n = len(examples)
        self.examples = list(examples)
        self.budgets = np.asarray(budgets, dtype=np.float64)
        self.lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (n,)).copy()
        self.tokens = np.full((n, self.max_len), self.pad_id, dtype=np.int64)
        self.teacher_mask = np.zeros((n, self.max_len), dtype=bool)
        self.t = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self.calls = np.zeros(n, dtype=np.int64)

    def step(self, actions: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply one action per row. Returns ``(reward, terminated, truncated, y)`` arrays of shape ``[N]``.

        ``reward_t = log π_T(y_t | x, X_out[<t]) − λ (c_t − b)`` with ``c_t = 1[a_t = <τ>]`` (SPEC §3, §5).
        """
        a = np.asarray(actions, dtype=np.int64)
        live = ~self.done
        is_tau = live & (a == self.tau_id)
        n = len(a)
        y = np.where(live, a, self.pad_id)
        logp = np.zeros(n, dtype=np.float64)
        rows = np.flatnonzero(is_tau)
        if len(rows):  # <τ>: the teacher's greedy token (one batched call)
            w, lp = self.teacher.next_tokens([self.examples[i].teacher_src for i in rows],
                                             [self.tokens[i, :self.t[i]].tolist() for i in rows])
            y[rows], logp[rows] = w, lp
        rows = np.flatnonzero(live & ~is_tau)
        if len(rows):  # a student token: its reward is the teacher's log-prob of it (one batched call)
            scores = self.teacher.score([self.examples[i].teacher_src for i in rows],
                                        [self.tokens[i, :self.t[i]].tolist() + [int(y[i])] for i in rows])
            logp[rows] = [s[-1] for s in scores]
        idx = np.flatnonzero(live)
        self.tokens[idx, self.t[idx]] = y[idx]
        self.teacher_mask[idx, self.t[idx]] = is_tau[idx]
        self.calls += is_tau
        self.t += live
        terminated = live & (y == self.eos_id)
        truncated = live & ~terminated & (self.t >= self.max_len)
        self.done |= terminated | truncated
        reward = np.where(live, logp - self.lam * (is_tau.astype(np.float64) - self.budgets), 0.0)
        return reward, terminated, truncated, y

    def usage(self) -> np.ndarray:
        return self.calls / np.maximum(1, self.t)


class TokenMDPEnv(gym.Env):
    """Generating one output with a student that may ask the teacher for single tokens.

    ## Description
    SPEC §2: the input is a source ``x`` and a teacher budget ``b`` (written into the student's input as a
    prompt). At each step the agent emits a token of the vocabulary ``V`` or ``<τ>``, which appends the teacher's
    greedy token instead and marks it as a teacher token in the student's internal prefix ``X_in``.

    ## Action Space
    ``Discrete(|V| + 1)``: token ids of ``V``, and ``<τ>`` as the last action ``|V|``.

    ## Observation Space
    ``Dict``: ``source`` (the student's input ids, prompt included, padded with 0, ``MultiDiscrete``),
    ``source_len``; ``prefix`` (``X_in`` token ids, padded) and ``teacher_mask`` (``MultiBinary``: which prefix
    tokens the teacher produced); ``budget`` (``Box [0, 1]``); ``step`` (``t``).

    ## Rewards
    ``r_t = log π_T(y_t | x, X_out[<t]) − λ (c_t − b)``, ``c_t = 1[a_t = <τ>]`` (SPEC §3, §5); ``λ`` is settable
    with :meth:`set_lambda` (the budget multiplier of the current budget).

    ## Episode End
    ``terminated`` when EOS enters ``X_out`` (from either model); ``truncated`` at ``max_len`` tokens.

    ``info`` holds ``teacher_calls``, ``usage`` (calls / length) and ``text`` (decoded ``X_out``).
    """

    metadata = {"render_modes": []}

    def __init__(self, examples: Sequence[Example], teacher: TeacherClient, n_actions: int, eos_id: int,
                 budgets: Sequence[float], max_len: int, max_src_len: int,
                 decode: Callable[[list[int]], str] | None = None, pad_id: int = 0):
        super().__init__()
        if not examples:
            raise ValueError("TokenMDPEnv needs at least one example")
        self.examples, self.budgets = list(examples), [float(b) for b in budgets]
        self.max_len, self.max_src_len, self.n_actions = max_len, max_src_len, n_actions
        self.decode = decode or (lambda ids: " ".join(map(str, ids)))
        self.core = TokenMDPBatch(teacher, tau_id=n_actions - 1, eos_id=eos_id, max_len=max_len, pad_id=pad_id)
        self.lam = 0.0
        self.action_space = spaces.Discrete(n_actions)
        self.observation_space = spaces.Dict({
            "source": spaces.MultiDiscrete(np.full(max_src_len, n_actions, dtype=np.int64)),
            "source_len": spaces.Discrete(max_src_len + 1),
            "prefix": spaces.MultiDiscrete(np.full(max_len, n_actions, dtype=np.int64)),
            "teacher_mask": spaces.MultiBinary(max_len),
            "budget": spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            "step": spaces.Discrete(max_len + 1),
        })

    def set_lambda(self, lam: float) -> None:
        self.lam = float(lam)
        if self.core.lam.size:
            self.core.lam[:] = self.lam

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """``options``: ``example`` (index into the examples) and ``budget`` (one of the grid); sampled if absent."""
        super().reset(seed=seed)
        options = options or {}
        i = options.get("example")
        i = int(self.np_random.integers(len(self.examples))) if i is None else int(i)
        b = options.get("budget")
        b = float(self.budgets[int(self.np_random.integers(len(self.budgets)))]) if b is None else float(b)
        ex = self.examples[i]
        if b not in ex.student_src:
            raise ValueError(f"budget {b} has no prompt for this example; budgets: {sorted(ex.student_src)}")
        src = ex.student_src[b]
        if len(src) > self.max_src_len:
            raise ValueError(f"example {i}: {len(src)} source tokens > max_src_len={self.max_src_len}")
        self._src = np.zeros(self.max_src_len, dtype=np.int64)
        self._src[:len(src)] = src
        self._src_len, self._budget = len(src), b
        self.core.reset([ex], [b], self.lam)
        return self._obs(), self._info()

    def step(self, action: int):
        reward, terminated, truncated, _ = self.core.step([int(action)])
        return self._obs(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._info()

    def _obs(self) -> dict[str, Any]:
        return {
            "source": self._src.copy(), "source_len": self._src_len,
            "prefix": self.core.tokens[0].copy(), "teacher_mask": self.core.teacher_mask[0].astype(np.int8),
            "budget": np.array([self._budget], dtype=np.float32), "step": int(self.core.t[0]),
        }

    def _info(self) -> dict[str, Any]:
        t = int(self.core.t[0])
        return {"teacher_calls": int(self.core.calls[0]), "usage": float(self.core.usage()[0]),
                "text": self.decode(self.core.tokens[0, :t].tolist()), "budget": self._budget}
