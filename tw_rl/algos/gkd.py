"""On-policy distillation with a generalized Jensen–Shannon divergence (GKD), plus the budget decision for ``<τ>``.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"; TRL's ``GKDTrainer``) trains the student on
its own generated sequences to match the teacher's token distribution at every state, with the generalized JSD

    JSD_β(T ‖ S) = β KL(T ‖ M) + (1 − β) KL(S ‖ M),   M = β T + (1 − β) S

and, as in TRL's ``generalized_jsd_loss``, the end points defined as the two KL directions: ``β = 0`` is the
forward ``KL(T ‖ S)`` (mode covering), ``β = 1`` the reverse ``KL(S ‖ T)`` (mode seeking). GKD's student-data
fraction ``λ`` is the replay mix ``rl.on_policy_fraction`` (the rest are the phase-1 demonstrations).

Training Wheels adds the ``<τ>`` action, so the student's policy over ``V ∪ {<τ>}`` factorises into a call
probability ``p_τ(s) = π(<τ>|s)`` and a token distribution ``S(·|s) = π(·|s, not <τ>)`` (the softmax over ``V``
only). The loss has two terms, both pure functions below:

- **distillation**: ``JSD_β(T(·|x, X_out[<t]) ‖ S(·|s_t))`` at every real step of every episode;
- **the call decision** (SPEC §3, §5, one step ahead): calling yields the teacher's greedy token, worth
  ``max_y log T(y)``; not calling yields a student token, worth ``Σ_y S(y) log T(y)`` in expectation, and calling
  costs ``λ_b``. So the advantage of calling is ``A_t = max_y log T(y) − Σ_y S(y) log T(y) − λ_b`` and the
  entropy-regularised (``α``) optimum of that binary choice is ``p_τ* = σ(A_t / α)``; the loss is the binary
  cross-entropy of ``p_τ`` towards ``p_τ*`` (with ``A_t`` held fixed). It is myopic — it ignores how a teacher
  token changes later states — like the phase-1 KL oracle it refines.

Where the teacher's distributions come from (**[choice]**): never from the replay buffer, which stores only token
ids and per-token log-probs (``tw_rl/batch.py``). The learner holds the driver's :class:`~tw_rl.teacher.Teacher`
and calls ``teacher.distributions(x, X_out)`` once per update on the sampled batch (one teacher-forced forward,
``[B, T, |V|]``, freed after the step). The student's input ids carry the budget prompt, the teacher's do not:
every episode carries the teacher's ids of ``x`` too (``Episode.teacher_src``), and the driver passes them with
the batch (``update(batch, lambdas, teacher_src=...)``: the learner declares the input, tw_rl/algos/learner.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tw_rl.algos.learner import TEACHER_SRC, Learner
from tw_rl.algos.common import (batch_logits, clip_gradients, learner_state, load_learner_state, masked_mean,
                               rollout_stats)
from tw_rl.batch import EpisodeBatch
from tw_rl.config import Config


# --------------------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------------------
def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ p (log p − log q)`` over the last axis, with ``0 · log 0 = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD between teacher ``T`` and student ``S`` per position (TRL's ``generalized_jsd_loss``).

    ``student_logp``, ``teacher_logp``: ``[..., V]`` normalised log-probabilities. Returns ``[...]``:
    ``KL(T ‖ S)`` at ``β = 0``, ``KL(S ‖ T)`` at ``β = 1``, else ``β KL(T ‖ M) + (1 − β) KL(S ‖ M)`` with
    ``M = β T + (1 − β) S`` (``β = 0.5``: the symmetric Jensen–Shannon divergence).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    log_m = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))  # log M
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def call_advantage(student_logp: torch.Tensor, teacher_logp: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """One-step advantage of ``<τ>`` (module docstring): ``max_y log T(y) − Σ_y S(y) log T(y) − λ_b``.

    ``student_logp``, ``teacher_logp``: ``[B, T, V]``; ``lambdas``: ``[B]``. Returns ``[B, T]``.
    """
    greedy = teacher_logp.max(-1).values
    expected_own = (student_logp.exp() * teacher_logp).sum(-1)
    return greedy - expected_own - lambdas[:, None]


def gkd_loss(logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, lambdas: torch.Tensor,
             beta: float, alpha: float, tau_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The GKD loss with the call decision (module docstring), mean over real steps.

    Args:
        logits: ``[B, T, |V|+1]`` student logits at the states ``s_0 … s_{T−1}``; the last action is ``<τ>``.
        teacher_logp: ``[B, T, |V|]`` teacher log-probs ``log T(·|x, X_out[<t])``.
        mask: ``[B, T]`` bool, a real step; lambdas: ``[B]`` the multiplier of each episode's budget.
        beta: the JSD interpolation; alpha: entropy temperature of the call decision; tau_weight: its weight.
    """
    logits = logits.float()
    student_logp = torch.log_softmax(logits[..., :-1], dim=-1)  # S(·|s): the token distribution given no call
    teacher_logp = teacher_logp.float()
    jsd = generalized_jsd(student_logp, teacher_logp, beta)
    call_logit = logits[..., -1] - torch.logsumexp(logits[..., :-1], dim=-1)  # logit of p_τ = σ(·)
    with torch.no_grad():
        advantage = call_advantage(student_logp, teacher_logp, lambdas.float())
        target = torch.sigmoid(advantage / alpha)
    bce = F.binary_cross_entropy_with_logits(call_logit, target, reduction="none")
    distill, decision = masked_mean(jsd, mask), masked_mean(bce, mask)
    loss = distill + tau_weight * decision
    with torch.no_grad():
        stats = {
            "loss/gkd": loss.item(), "loss/jsd": distill.item(), "loss/call_bce": decision.item(),
            "gkd/call_prob": float(masked_mean(torch.sigmoid(call_logit), mask)),
            "gkd/call_target": float(masked_mean(target, mask)),
            "gkd/advantage": float(masked_mean(advantage, mask)),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------------------------------------------
class GKDLearner(Learner):
    """The student, AdamW and the teacher it queries for distributions at update time."""

    inputs = frozenset({TEACHER_SRC})  # the teacher's ids of x for every episode of the batch

    def __init__(self, cfg: Config, student: nn.Module, start_id: int, pad_id: int, teacher) -> None:
        self.cfg, self.student, self.start_id, self.pad_id = cfg, student, start_id, pad_id
        self.teacher = teacher
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.rl.lr, weight_decay=0.0)
        self.step = 0

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def update(self, batch: EpisodeBatch, lambdas: torch.Tensor, *,
               teacher_src: Sequence[Sequence[int]]) -> dict[str, float]:
        """One step; ``teacher_src[i]`` is episode ``i``'s teacher input (``x`` without the budget prompt)."""
        if len(teacher_src) != len(batch):
            raise ValueError(f"gkd: {len(teacher_src)} teacher inputs for a batch of {len(batch)} episodes")
        cfg = self.cfg
        outputs = [r[:n].tolist() for r, n in zip(batch.tokens, batch.lengths.tolist())]
        teacher_logp = self.teacher.distributions([list(s) for s in teacher_src], outputs)  # [B, T, |V|]
        batch = batch.to(self.device)
        T = batch.tokens.shape[1]
        teacher_logp = teacher_logp[:, :T].to(self.device)
        self.student.train()
        logits = batch_logits(self.student, batch, self.start_id, self.pad_id)[:, :T]
        loss, stats = gkd_loss(logits, teacher_logp, batch.mask, lambdas.to(self.device), cfg.gkd.beta,
                               cfg.rl.alpha, cfg.gkd.tau_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.student, cfg.rl.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {**stats, **rollout_stats(batch), "loss/grad_norm": float(grad_norm), "learner/step": float(self.step)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return learner_state({"student": self.student}, self.optimizer, self.step)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = load_learner_state(state, {"student": self.student}, self.optimizer)


def make_learner(cfg: Config, student: nn.Module, start_id: int, pad_id: int, *, teacher=None,
                 **_) -> GKDLearner:
    """Registry entry point (``ALGORITHMS["gkd"]``): needs the driver's teacher (with ``.distributions``)."""
    if teacher is None:
        raise ValueError("gkd queries the teacher's distributions at update time: make_learner needs teacher= "
                         "(with .distributions)")
    return GKDLearner(cfg, student, start_id, pad_id, teacher)
