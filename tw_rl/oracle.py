"""Phase 1: behaviour cloning on KL-oracle traces (SPEC §6).

The reference path of an input is the teacher's greedy output ``y*`` **[choice]**: then the teacher's token at a
marked position is exactly ``y*_t``, so an oracle trace is a valid trajectory of the MDP (and a valid
off-policy path for PCL). Each position is scored by ``KL(π_T ‖ π_S)`` teacher-forced along ``y*`` (``π_S`` is
the phase-0 student over ``V``); for a budget ``b`` the top ``round(b·T)`` positions become ``<τ>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tw_rl.envs.token_mdp import Example
from tw_rl.batch import Episode, Source
from tw_rl.examples import pad_batch
from tw_rl.models.family import forced


@dataclass
class Reference:
    """The teacher's greedy path for one input and what the oracle needs from it."""

    tokens: np.ndarray  # [T] int64: y*
    teacher_logprobs: np.ndarray  # [T] float32: log π_T(y*_t | x, y*_<t)
    kl: np.ndarray  # [T] float32: KL(π_T ‖ π_S) at each position
    terminated: bool
    student_wrong: np.ndarray | None = None  # [T] bool: π_S's teacher-forced greedy token differs from y*_t


RANKINGS = ("kl", "wrong_first")


def kl_teacher_student(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(π_T ‖ π_S)`` per position. ``teacher_logp [..., V]`` (log-probs), ``student_logits [..., ≥V]``:
    the student's distribution is taken over ``V`` only (its ``<τ>`` logit, if any, is dropped)."""
    V = teacher_logp.shape[-1]
    s_logp = torch.log_softmax(student_logits[..., :V].float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s_logp)).sum(-1)


def mark_positions(kl: np.ndarray, budget: float, first: np.ndarray | None = None) -> np.ndarray:
    """The top ``round(b·T)`` positions by KL (ties: the earlier position) → bool ``[T]``. With ``first`` (bool
    ``[T]``), the positions it flags rank above all others, and KL orders within each group."""
    T = len(kl)
    k = int(round(budget * T))
    marks = np.zeros(T, dtype=bool)
    if k > 0:
        group = np.zeros(T) if first is None else -np.asarray(first, dtype=float)
        order = np.lexsort((np.arange(T), -kl, group))  # flagged first, then KL descending, then position
        marks[order[:k]] = True
    return marks


@torch.no_grad()
def build_references(examples: Sequence[Example], teacher, base_student, max_len: int, eos_id: int,
                     batch_size: int = 128, pad_id: int = 0, start_id: int = 0) -> list[Reference]:
    """Teacher greedy paths, their rewards, and per-position KL against ``base_student`` (the phase-0 model over
    ``V``, either family, fed the teacher's input: the source without a budget prompt)."""
    refs: list[Reference] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        src = [e.teacher_src for e in chunk]
        outs = teacher.generate(src, max_len=max_len, eos_id=eos_id)
        t_logp = teacher.distributions(src, outs)  # [B, T, V]
        ids, mask = pad_batch(src, pad_id)
        dec, _ = pad_batch([[start_id] + o[:-1] for o in outs], pad_id)
        s_logits = forced(base_student, ids, mask, dec_ids=dec).logits
        for j, o in enumerate(outs):
            T = len(o)
            y = torch.as_tensor(o)
            refs.append(Reference(
                tokens=np.asarray(o, dtype=np.int64),
                teacher_logprobs=t_logp[j, torch.arange(T), y].numpy().astype(np.float32),
                kl=kl_teacher_student(t_logp[j, :T], s_logits[j, :T]).numpy().astype(np.float32),
                terminated=bool(o and o[-1] == eos_id),
                student_wrong=(s_logits[j, :T, :t_logp.shape[-1]].argmax(-1) != y).numpy()))
    return refs


def corpus_thresholds(refs: Sequence[Reference], budgets: Sequence[float]) -> dict[float, float]:
    """Per budget ``b > 0``, the KL above which a fraction ``b`` of all reference positions lie (pooled over the
    corpus): the oracle of ``phase1.quota=corpus`` marks every position above it, so a sequence gets as many
    marks as it has hard positions instead of ``round(b·T)`` each (the constraint of SPEC §5 is on mean usage)."""
    kl = np.concatenate([r.kl for r in refs]) if refs else np.zeros(1, dtype=np.float32)
    return {float(b): float(np.quantile(kl, 1.0 - b)) for b in budgets if b > 0}


def oracle_episode(example: Example, ref: Reference, budget: float, tau_id: int, rank: str = "kl",
                   threshold: float | None = None) -> Episode:
    """An oracle trace as an Episode: ``<τ>`` at the marked positions, the teacher's tokens everywhere.

    ``rank="kl"``: the top ``round(b·T)`` positions by ``KL(π_T ‖ π_S)`` (SPEC §6); ``"wrong_first"``: positions
    where the phase-0 student's greedy token is wrong come first, KL orders within each group. ``threshold``
    (``phase1.quota=corpus``, :func:`corpus_thresholds`): instead, every position whose KL exceeds it (none at b = 0).
    """
    if rank not in RANKINGS:
        raise ValueError(f"unknown oracle ranking {rank!r}; known: {RANKINGS}")
    if rank == "wrong_first" and ref.student_wrong is None:
        raise ValueError("oracle ranking 'wrong_first' needs references with student_wrong (rebuild them)")
    if threshold is not None:
        marks = (ref.kl > threshold) if budget > 0 else np.zeros(len(ref.kl), dtype=bool)
    else:
        marks = mark_positions(ref.kl, budget, ref.student_wrong if rank == "wrong_first" else None)
    return Episode(src_ids=np.asarray(example.student_src[budget], dtype=np.int64),
                   actions=np.where(marks, tau_id, ref.tokens), tokens=ref.tokens.copy(),
                   teacher_logprobs=ref.teacher_logprobs.copy(),
                   behavior_logprobs=np.zeros(len(ref.tokens), dtype=np.float32), budget=budget,
                   terminated=ref.terminated, policy_version=-1, source=Source.ORACLE,
                   teacher_src=np.asarray(example.teacher_src, dtype=np.int64))


def demo_episode(example: Example, ref: Reference, budget: float) -> Episode:
    """The teacher's output as a demonstration with no calls (the student emitting the teacher's tokens)."""
    return Episode(src_ids=np.asarray(example.student_src[budget], dtype=np.int64), actions=ref.tokens.copy(),
                   tokens=ref.tokens.copy(), teacher_logprobs=ref.teacher_logprobs.copy(),
                   behavior_logprobs=np.zeros(len(ref.tokens), dtype=np.float32), budget=budget,
                   terminated=ref.terminated, policy_version=-1, source=Source.TEACHER_DEMO,
                   teacher_src=np.asarray(example.teacher_src, dtype=np.int64))


def bc_loss(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, teacher_mask: torch.Tensor,
            teacher_logp: torch.Tensor | None, distill_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """SPEC §6 loss on oracle traces.

    ``logits [B, T, A]`` over ``V ∪ {<τ>}`` at the states of the trace; ``actions [B, T]``; ``mask``/
    ``teacher_mask [B, T]`` bool; ``teacher_logp [B, T, V]``: the teacher's log-probs (None: no distillation).
    Cross-entropy of the oracle action everywhere, plus ``distill_weight`` × the cross-entropy from the
    teacher's distribution to the student's on the unmarked positions.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    n = mask.sum().clamp(min=1)
    ce = -(logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask).sum() / n
    loss, stats = ce, {"loss/bc_ce": float(ce.detach())}
    if teacher_logp is not None and distill_weight > 0:
        V = teacher_logp.shape[-1]
        unmarked = mask & ~teacher_mask
        kd = -(teacher_logp.exp() * logp[..., :V]).sum(-1)
        kd = (kd * unmarked).sum() / unmarked.sum().clamp(min=1)
        loss = loss + distill_weight * kd
        stats["loss/bc_distill"] = float(kd.detach())
    with torch.no_grad():
        pred_tau = logits.argmax(-1) == logits.shape[-1] - 1
        stats["phase1/tau_precision"] = float((pred_tau & teacher_mask & mask).sum() / (pred_tau & mask).sum().clamp(min=1))
        stats["phase1/tau_recall"] = float((pred_tau & teacher_mask & mask).sum() / (teacher_mask & mask).sum().clamp(min=1))
    stats["loss/bc"] = float(loss.detach())
    return loss, stats
