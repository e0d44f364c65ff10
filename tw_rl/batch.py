"""The one data contract between rollout workers, the replay buffer and the learners.

An :class:`Episode` is one generation (SPEC §2) stored compactly as numpy arrays: token ids, teacher log-probs,
behaviour log-probs and masks — never full logit tensors. :class:`EpisodeBatch` is a padded batch of episodes as
torch tensors, which is what learners consume. Shapes: ``B`` episodes, ``S`` source length, ``T`` output length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import torch


class Source:
    """Where an episode comes from: the values of ``Episode.source`` (plain strings, stored as they are)."""

    ONPOLICY: Final = "onpolicy"  # sampled by a rollout worker at temperature rollout.temperature: trained on
    GREEDY: Final = "greedy"  # decoded greedily on training inputs, as the student is deployed: trained on
    GREEDY_HELDOUT: Final = "greedy_heldout"  # greedily on held-out inputs: drives the multipliers, never trained on
    TEACHER_DEMO: Final = "teacher_demo"  # the teacher's output as a demonstration with no calls
    ORACLE: Final = "oracle"  # a phase-1 KL-oracle trace


# rl.dual_usage → the episodes whose usage the dual ascent follows (None: every episode)
DUAL_USAGE_SOURCES: dict[str, str | None] = {"heldout": Source.GREEDY_HELDOUT, "greedy": Source.GREEDY, "all": None}


@dataclass
class Episode:
    """One finished generation. Step ``t`` is the action ``a_t`` taken in state ``s_t = (x, b, X_in[<t])``."""

    src_ids: np.ndarray  # [S] int64: the student's input ids (budget prompt + source), no padding
    actions: np.ndarray  # [T] int64: a_t ∈ V ∪ {<τ>}
    tokens: np.ndarray  # [T] int64: y_t appended to X_out (= a_t, or the teacher's token when a_t = <τ>)
    teacher_logprobs: np.ndarray  # [T] float32: log π_T(y_t | x, X_out[<t]) — the reward r_t (SPEC §3)
    behavior_logprobs: np.ndarray  # [T] float32: log μ(a_t | s_t) of the policy that acted (0 for demos)
    budget: float  # b
    terminated: bool  # EOS entered X_out (terminal value 0); otherwise truncated at the length limit
    policy_version: int = -1  # learner version that produced it; -1: a demonstration
    source: str = Source.ONPOLICY  # one of Source
    teacher_src: np.ndarray | None = None  # [S'] int64: the teacher's ids of x (no budget prompt), where known

    @property
    def teacher_mask(self) -> np.ndarray:
        """[T] bool: the steps whose token came from the teacher (a_t = <τ>)."""
        return self.actions != self.tokens

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def usage(self) -> float:
        """Teacher calls / output length (SPEC §5)."""
        return float(self.teacher_mask.sum()) / max(1, len(self))


@dataclass
class EpisodeBatch:
    """A padded batch of episodes (padding positions have ``mask`` False)."""

    src_ids: torch.Tensor  # [B, S] int64, padded with pad_id
    src_mask: torch.Tensor  # [B, S] bool
    actions: torch.Tensor  # [B, T] int64
    tokens: torch.Tensor  # [B, T] int64
    teacher_mask: torch.Tensor  # [B, T] bool: a_t = <τ>
    mask: torch.Tensor  # [B, T] bool: a real step
    teacher_logprobs: torch.Tensor  # [B, T] float32
    behavior_logprobs: torch.Tensor  # [B, T] float32
    budgets: torch.Tensor  # [B] float32
    terminated: torch.Tensor  # [B] bool
    lengths: torch.Tensor  # [B] int64
    policy_version: torch.Tensor  # [B] int64

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def decoder_inputs(self, start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`decoder_inputs`."""
        return decoder_inputs(self, start_id, pad_id)

    def to(self, device: torch.device | str) -> "EpisodeBatch":
        return EpisodeBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def collate(episodes: list[Episode], pad_id: int = 0) -> "EpisodeBatch":
        B = len(episodes)
        S = max(len(e.src_ids) for e in episodes)
        T = max(1, max(len(e) for e in episodes))
        src = np.full((B, S), pad_id, dtype=np.int64)
        src_mask = np.zeros((B, S), dtype=bool)
        actions = np.full((B, T), pad_id, dtype=np.int64)
        tokens = np.full((B, T), pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=bool)
        tlp = np.zeros((B, T), dtype=np.float32)
        blp = np.zeros((B, T), dtype=np.float32)
        for i, e in enumerate(episodes):
            n, m = len(e.src_ids), len(e)
            src[i, :n], src_mask[i, :n] = e.src_ids, True
            actions[i, :m], tokens[i, :m], mask[i, :m] = e.actions, e.tokens, True
            tlp[i, :m], blp[i, :m] = e.teacher_logprobs, e.behavior_logprobs
        t = torch.from_numpy
        return EpisodeBatch(
            src_ids=t(src), src_mask=t(src_mask), actions=t(actions), tokens=t(tokens),
            teacher_mask=t((actions != tokens) & mask), mask=t(mask), teacher_logprobs=t(tlp),
            behavior_logprobs=t(blp), budgets=torch.tensor([e.budget for e in episodes], dtype=torch.float32),
            terminated=torch.tensor([e.terminated for e in episodes], dtype=torch.bool),
            lengths=torch.tensor([len(e) for e in episodes], dtype=torch.int64),
            policy_version=torch.tensor([e.policy_version for e in episodes], dtype=torch.int64),
        )


def decoder_inputs(batch: EpisodeBatch, start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's decoder input for every state ``s_0 … s_T`` of the batch (SPEC §2).

    Returns ``dec_tokens [B, T+1]`` = ``[start_id, y_1 … y_T]`` and ``dec_teacher_mask [B, T+1]`` =
    ``[False, m_1 … m_T]``, so that decoder position ``t`` is the state ``s_t`` and position ``T`` is the state
    after the last action (needed to bootstrap truncated episodes). Positions beyond an episode's length hold
    ``pad_id`` and False.
    """
    B = batch.tokens.shape[0]
    device = batch.tokens.device
    tokens = torch.where(batch.mask, batch.tokens, torch.full_like(batch.tokens, pad_id))
    start = torch.full((B, 1), start_id, dtype=tokens.dtype, device=device)
    dec_tokens = torch.cat([start, tokens], dim=1)
    no_teacher = torch.zeros((B, 1), dtype=torch.bool, device=device)
    dec_teacher_mask = torch.cat([no_teacher, batch.teacher_mask & batch.mask], dim=1)
    return dec_tokens, dec_teacher_mask
