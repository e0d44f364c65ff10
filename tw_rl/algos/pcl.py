"""Path Consistency Learning with the budget Lagrangian (SPEC.md §3, §4, §5).

The student's logits over ``V ∪ {<τ>}`` are soft Q-values (the unified parameterisation of SPEC §4)::

    V(s)        = α · logsumexp_a Q(s, a) / α
    log π(a|s)  = (Q(s, a) − V(s)) / α

and the loss asks every sub-path ``s_t … s_{t+d}`` of every episode in the batch — on-policy rollout or
demonstration alike — to satisfy the soft path consistency::

    C_t = −V(s_t) + γ^d V_target(s_{t+d}) + Σ_{i<d} γ^i (r_{t+i} − α log π(a_{t+i}|s_{t+i})),   loss ½ C_t²

The single-step form (``d = 1``) reduces to soft Q-learning, ``C_t = r_t + γ V_target(s_{t+1}) − Q(s_t, a_t)``;
the multi-step form uses a window ``d`` (or runs to the end of the episode).

``value="zero"`` (the default, ``rl.value``) keeps the policy ``π = softmax(Q/α)`` but pins ``V ≡ 0``, the exact
optimal soft value of SPEC §3 at ``α = 1`` when no calls are made. Then ``C_t = Σ_{i<d} γ^i (r_{t+i} − α log π)``
and the free per-state level of the logits (their logsumexp, left arbitrary by cross-entropy training in phases 0
and 1) no longer enters the loss; on-policy, the single-step gradient is exactly ``∇ KL(π ‖ π_T)`` (tested). Once
calls are priced by the Lagrangian the true ``V*`` is no longer 0, and ``V ≡ 0`` acts as a fixed baseline; the
choice is measured in docs/design.md. Everything here is a pure function
over tensors, vectorised over time; :class:`PCLLearner` adds the network, the Polyak target copy and the optimiser.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from tw_rl.algos.learner import COST_BATCH, Learner
from tw_rl.algos.common import (batch_logits, clip_gradients, learner_state, load_learner_state, masked_mean,
                               rollout_stats)
from tw_rl.batch import EpisodeBatch
from tw_rl.config import Config, RLConfig
from tw_rl.models.value import V, V_COST, ValueHead


VALUES = ("learned", "soft", "zero")


# --------------------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------------------
def soft_values(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``V(s) = α logsumexp(Q(s,·)/α)`` (SPEC §4). ``q [..., A]`` → ``[...]``."""
    if alpha == 1.0:  # the common case: no pass over the vocabulary for the temperature, forward or backward
        return torch.logsumexp(q, dim=-1)
    return alpha * torch.logsumexp(q / alpha, dim=-1)


def lagrangian_rewards(batch: EpisodeBatch, lambdas: torch.Tensor) -> torch.Tensor:
    """Per-step reward with the budget Lagrangian, ``r_t = log π_T(y_t|·) − λ_b (c_t − b)`` (SPEC §3, §5).

    ``c_t = 1[a_t = <τ>]`` is ``batch.teacher_mask``; ``lambdas [B]`` is the multiplier of each episode's budget
    level (see :meth:`tw_rl.budget.BudgetMultipliers.for_episodes`). Returns ``[B, T]`` float32, 0 on padding.
    """
    lam = lambdas.to(device=batch.teacher_logprobs.device, dtype=torch.float32)[:, None]
    cost = batch.teacher_mask.to(torch.float32) - batch.budgets.to(torch.float32)[:, None]
    rewards = batch.teacher_logprobs.to(torch.float32) - lam * cost
    return torch.where(batch.mask, rewards, torch.zeros_like(rewards))


def _window_matrix(T: int, window: int, gamma: float, device: torch.device) -> torch.Tensor:
    """``W [T, T]`` with ``W[t, k] = γ^(k−t)`` for ``t ≤ k < t + d`` (``d = T`` when window is 0), else 0.

    A banded matrix product instead of a discounted cumulative sum: ``γ^(−t)`` rescaling would overflow for long
    sequences and small γ, and ``T`` (the output length) is small enough for ``O(B·T²)``.
    """
    d = T if window == 0 else window
    idx = torch.arange(T, device=device)
    offset = idx[None, :] - idx[:, None]  # k − t
    band = (offset >= 0) & (offset < d)
    return torch.where(band, gamma ** offset.clamp(min=0).to(torch.float32), torch.zeros((), device=device))


def pcl_consistency(q: torch.Tensor, q_target: Optional[torch.Tensor], actions: torch.Tensor,
                    rewards: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, terminated: torch.Tensor,
                    alpha: float, gamma: float, window: int, value: str = "soft",
                    v: Optional[torch.Tensor] = None, v_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Window-``d`` path-consistency residuals of every step of every episode (SPEC §4).

    ``C_t = −V(s_t) + γ^d' V_target(s_{t+d'}) + Σ_{i<d'} γ^i (r_{t+i} − α log π(a_{t+i}|s_{t+i}))`` with
    ``d' = min(d, len − t)`` (``window = 0``: ``d' = len − t``, to the end of the episode) and
    ``V_target(s_len) = 0`` when the episode terminated (a truncated one bootstraps).

    Args:
        q: ``[B, T+1, A]`` online soft Q-values; position ``t`` is the state ``s_t``.
        q_target: ``[B, T+1, A]`` target-network soft Q-values for the bootstrapped ``V``; None: use ``q``
            itself (the original PCL, gradient through both ends).
        actions: ``[B, T]`` int64 ``a_t``; rewards: ``[B, T]`` ``r_t``; mask: ``[B, T]`` bool, a real step.
        lengths: ``[B]`` int64 episode lengths; terminated: ``[B]`` bool.
        window: ``d ≥ 1``, or 0 for to the end. ``window = 1`` is the single-step (soft Q-learning) form.
        value: ``learned`` (``v``/``v_target [B, T+1]`` from a value head, SPEC §4's standard form), ``soft``
            (``V = α logsumexp(Q/α)``, the unified form) or ``zero`` (``V ≡ 0``).

    Returns:
        ``[B, T]`` residuals, 0 on padding. Values at padding positions never depend on padded inputs.
    """
    v, v_target, alpha_log_pi, _ = _values(q, q_target, actions, mask, alpha, value, v, v_target)
    return _residuals(v, v_target, alpha_log_pi, rewards, mask, lengths, terminated, gamma, window)


class _SoftQ(torch.autograd.Function):
    """``V = α logsumexp(Q/α)``, ``Q(s, a)`` and the entropy of ``softmax(Q/α)`` in one pass over the vocabulary.

    Autograd's log-sum-exp, gather and slice each write a gradient the size of ``Q`` and the entropy reads it
    again; here the forward keeps ``π = softmax(Q/α)`` and the backward is ``π · ∂V + scatter(∂Q(s, a))``
    (``∂V/∂Q = π``), the only vocabulary-sized write. The entropy ``H = V/α − Σ π Q/α`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, actions: torch.Tensor, alpha: float):  # type: ignore[override]
        z = q if alpha == 1.0 else q / alpha
        pi = torch.softmax(z, dim=-1)
        z_max, arg = z.max(dim=-1)
        lse = z_max - torch.log(pi.gather(-1, arg.unsqueeze(-1)).squeeze(-1))  # π_max = exp(z_max − lse) ≥ 1/A
        entropy = lse - torch.einsum("...a,...a->...", pi, z)
        if torch.isnan(entropy).any():  # a masked action (Q = −inf) has π = 0 and adds 0·Q = 0
            entropy = lse - torch.einsum("...a,...a->...", pi, torch.nan_to_num(z, neginf=0.0))
        q_a = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(pi, actions)
        ctx.mark_non_differentiable(entropy)
        return alpha * lse, q_a, entropy

    @staticmethod
    def backward(ctx, g_soft, g_qa, _):  # type: ignore[override]
        pi, actions = ctx.saved_tensors
        grad = pi * g_soft.unsqueeze(-1) if g_soft is not None else torch.zeros_like(pi)
        if g_qa is not None:
            grad.scatter_add_(-1, actions.unsqueeze(-1), g_qa.unsqueeze(-1))
        return grad, None, None


def soft_q(q: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, alpha: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V(s_t) [B, T+1]``, ``α log π(a_t|s_t) = Q(s_t, a_t) − V(s_t) [B, T]`` and the policy entropy
    ``H(π(·|s_t)) [B, T+1]`` (no grad) of online Q-values ``q [B, T+1, A]``; padded actions read index 0."""
    T = actions.shape[1]
    safe = torch.where(mask, actions, torch.zeros_like(actions))  # pad ids may be out of range
    safe = torch.cat([safe, torch.zeros_like(safe[:, :1])], dim=1)  # s_T has no action
    soft, q_a, entropy = _SoftQ.apply(q.float(), safe, float(alpha))
    return soft, q_a[:, :T] - soft[:, :T], entropy


def _values(q: torch.Tensor, q_target: Optional[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor,
            alpha: float, value: str = "soft", v: Optional[torch.Tensor] = None,
            v_target: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V [B, T+1]`` (online), ``V_target [B, T+1]``, ``α log π(a_t|s_t) [B, T]`` and the entropy ``[B, T+1]`` —
    computed once and shared by the single- and multi-step residuals (the vocabulary is the costly part).

    ``value="learned"``: ``V`` and ``V_target`` are given (a value head and its Polyak copy) and
    ``α log π = Q(s, a) − α logsumexp(Q/α)``; ``value="soft"``: ``V = α logsumexp(Q/α)`` (SPEC §4's unified
    parameterisation); ``value="zero"``: the policy is still ``softmax(Q/α)`` but ``V ≡ 0``."""
    if value not in VALUES:
        raise ValueError(f"unknown value parameterisation {value!r}; known: {VALUES}")
    soft, alpha_log_pi, entropy = soft_q(q, actions, mask, alpha)
    if value == "learned":
        if v is None or v_target is None:
            raise ValueError("value='learned' needs the value head's v and v_target [B, T+1]")
        return v.float(), v_target.float(), alpha_log_pi, entropy
    if value == "zero":  # V ≡ 0: the exact optimal soft value of SPEC §3 without calls (α = 1)
        return torch.zeros_like(soft), torch.zeros_like(soft), alpha_log_pi, entropy
    v_target = soft if q_target is None else soft_values(q_target.float(), alpha)
    return soft, v_target, alpha_log_pi, entropy


def _residuals(v: torch.Tensor, v_target: torch.Tensor, alpha_log_pi: torch.Tensor, rewards: torch.Tensor,
               mask: torch.Tensor, lengths: torch.Tensor, terminated: torch.Tensor, gamma: float,
               window: int) -> torch.Tensor:
    """The residuals of :func:`pcl_consistency` from precomputed values."""
    B, T = alpha_log_pi.shape
    device = v.device
    # `where`, not multiplication, so that junk (even inf) beyond an episode's end cannot leak into the sums.
    g = torch.where(mask, rewards.float() - alpha_log_pi, torch.zeros_like(alpha_log_pi))
    path_sum = g @ _window_matrix(T, window, gamma, device).T  # [B, T]: Σ_{i<d'} γ^i g_{t+i}

    steps = torch.arange(T, device=device)[None, :]
    d = T if window == 0 else window
    end = torch.minimum(steps + d, lengths[:, None])  # t + d'
    at_end = torch.arange(T + 1, device=device)[None, :] == lengths[:, None]
    v_target = torch.where(at_end & terminated[:, None], torch.zeros_like(v_target), v_target)
    # clamp: on padding (t ≥ len) end − t < 0, and γ^(−t) could overflow into a NaN gradient through `where`.
    discount = gamma ** (end - steps).clamp(min=0).to(torch.float32)
    bootstrap = discount * v_target.gather(1, end.clamp(max=T))

    residuals = -v[:, :T] + bootstrap + path_sum
    return torch.where(mask, residuals, torch.zeros_like(residuals))


def pcl_loss(q: torch.Tensor, q_target: Optional[torch.Tensor], actions: torch.Tensor, rewards: torch.Tensor,
             mask: torch.Tensor, lengths: torch.Tensor, terminated: torch.Tensor, alpha: float, gamma: float,
             window: int, multi_step_weight: float, value: str = "soft", v: Optional[torch.Tensor] = None,
             v_target: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 − w)·single + w·multi``, each the mean over real steps of ``½ C_t²`` (SPEC §4).

    Arguments as in :func:`pcl_consistency`; ``w = multi_step_weight``. Returns the scalar loss and float stats
    (``loss/*``, ``rollout/entropy`` — the mean policy entropy over the batch's states — and ``value/*``).
    """
    v, v_target, alpha_log_pi, entropy = _values(q, q_target, actions, mask, alpha, value, v, v_target)
    args = (v, v_target, alpha_log_pi, rewards, mask, lengths, terminated, gamma)
    c_single = _residuals(*args, window=1)
    single = masked_mean(0.5 * c_single.pow(2), mask)
    if multi_step_weight > 0.0 and window != 1:
        c_multi = _residuals(*args, window=window)
        multi = masked_mean(0.5 * c_multi.pow(2), mask)
    else:  # window 1 is the single-step form: don't pay for it twice
        c_multi, multi = c_single, single
    loss = (1.0 - multi_step_weight) * single + multi_step_weight * multi

    with torch.no_grad():
        T = actions.shape[1]
        entropy = entropy[:, :T]
        stats = {
            "loss/pcl": float(loss),
            "loss/single_step": float(single),
            "loss/multi_step": float(multi),
            "loss/abs_residual_multi": float(masked_mean(c_multi.abs(), mask)),
            "rollout/entropy": float(masked_mean(entropy, mask)),
            "value/v_start": float(v[:, 0].mean()),
            "value/reward": float(masked_mean(rewards.float(), mask)),
        }
    return loss, stats


def usage_costs(batch: EpisodeBatch) -> torch.Tensor:
    """Per-step cost of the usage constraint, ``c_t / len`` with ``c_t = 1[a_t = <τ>]`` (SPEC §5): its sum over an
    episode is the episode's usage, so ``V_C(s_0)`` estimates the expected usage of a prompt. ``[B, T]``."""
    c = (batch.teacher_mask & batch.mask).to(torch.float32)
    return c / batch.lengths.clamp(min=1).to(torch.float32)[:, None]


def cost_value_loss(vc: torch.Tensor, vc_target: torch.Tensor, batch: EpisodeBatch, window: int,
                    multi_step_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The consistency of the cost value ``V_C`` (SPEC §5), as :func:`pcl_loss` with the cost in place of the
    reward and no entropy term (γ = 1): ``C_t = −V_C(s_t) + V_C,target(s_{t+d'}) + Σ_{i<d'} c_{t+i}/len``.
    ``vc``/``vc_target``: ``[B, T+1]``. Returns the loss and ``loss/cost_value``."""
    zeros = torch.zeros_like(batch.teacher_logprobs, dtype=torch.float32)
    args = (vc.float(), vc_target.float(), zeros, usage_costs(batch), batch.mask, batch.lengths, batch.terminated,
            1.0)
    single = masked_mean(0.5 * _residuals(*args, window=1).pow(2), batch.mask)
    multi = (masked_mean(0.5 * _residuals(*args, window=window).pow(2), batch.mask)
             if multi_step_weight > 0.0 and window != 1 else single)
    loss = (1.0 - multi_step_weight) * single + multi_step_weight * multi
    return loss, {"loss/cost_value": float(loss.detach())}


def soft_returns(v_target: torch.Tensor, alpha_log_pi: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                 lengths: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo soft returns ``G_t = Σ_{k ≥ t} γ^(k−t) (r_k − α log π(a_k|s_k)) + γ^(len−t) V_target(s_len)``
    (the last term only for truncated episodes): the regression target of the value head's warm start. ``[B, T]``."""
    return _residuals(torch.zeros_like(v_target), v_target, alpha_log_pi, rewards, mask, lengths, terminated,
                      gamma, window=0)


# --------------------------------------------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------------------------------------------
class PCLLearner(Learner):
    """One PCL learner: the student, its Polyak target copy, AdamW, gradient clipping (SPEC §4).

    ``student`` is any module with ``forward(src_ids [B,S], src_mask [B,S], dec_tokens [B,L],
    dec_teacher_mask [B,L]) -> logits [B,L,A]`` whose last action index ``A−1`` is ``<τ>``. The learner runs
    on the device of the student's parameters. With ``rl.value=learned`` it also owns the critic heads
    ``[V_φ, V_C]`` (:class:`tw_rl.models.value.ValueHead`, over the student's decoder state, which needs
    ``forward(..., return_hidden=True)``) and their Polyak copy; ``value`` passes a head to continue from.
    """

    def __init__(self, cfg: RLConfig, student: nn.Module, start_id: int, pad_id: int,
                 value: Optional[ValueHead] = None, max_len: int = 32) -> None:
        self.cfg = cfg
        self.student = student
        self.start_id, self.pad_id = start_id, pad_id
        # The student's Polyak copy exists only where it is read: value="soft" bootstraps from its log-sum-exp.
        # With a value head the bootstrap is the head's Polyak copy over the online student's decoder state (the
        # head reads that state detached, as an observation encoding; under rl.trainable=tau it is exactly the
        # copy's), so no second pass of the student is needed; value="zero" bootstraps 0.
        self.target: Optional[nn.Module] = None
        if cfg.value == "soft":
            self.target = copy.deepcopy(student).requires_grad_(False).eval()
        groups = [{"params": list(student.parameters()), "lr": cfg.lr}]
        self.value: Optional[ValueHead] = None
        self.value_target: Optional[ValueHead] = None
        if cfg.value == "learned":
            d_model = (student.hidden_size if hasattr(student, "hidden_size")
                       else student.model.get_input_embeddings().weight.shape[1])
            self.value = (value if value is not None
                          else ValueHead(d_model, cfg.value_hidden, max_len)).to(self.device)
            self.value_target = copy.deepcopy(self.value).requires_grad_(False)
            groups.append({"params": list(self.value.parameters()), "lr": cfg.value_lr})
            self.inputs = frozenset({COST_BATCH})  # V_C trains on greedy on-policy episodes in the same step
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)  # logits are Q-values: no decay
        self.step = 0

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def q_values(self, net: nn.Module, batch: EpisodeBatch) -> torch.Tensor:
        """Soft Q-values ``[B, T+1, A]`` of every state of the batch under ``net``."""
        return batch_logits(net, batch, self.start_id, self.pad_id)

    def _forward(self, net: nn.Module, batch: EpisodeBatch
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``Q [B, T+1, A]`` of ``net`` and, with a value head, ``[V_φ, V_C] [B, T+1, 2]`` of the head and (without
        grad) of its Polyak copy, both over ``net``'s decoder state."""
        if self.value is None:
            return self.q_values(net, batch), None, None
        q, h = batch_logits(net, batch, self.start_id, self.pad_id, return_hidden=True)
        with torch.no_grad():
            target_values = self.value_target(h, batch.budgets)
        return q, self.value(h, batch.budgets), target_values

    def update(self, batch: EpisodeBatch, lambdas: torch.Tensor, cost_batch: Optional[EpisodeBatch] = None
               ) -> dict[str, float]:
        """One gradient step on ``batch`` with per-episode multipliers ``lambdas [B]``; then the Polyak update.
        ``cost_batch`` (with a value head): greedy on-policy episodes whose usage trains ``V_C`` in the same step."""
        batch = batch.to(self.device)
        loss, stats = self.compute_loss(batch, lambdas)
        if cost_batch is not None and self.value is not None:
            cost, cost_stats = self.cost_loss(cost_batch.to(self.device))
            loss = loss + cost
            stats.update(cost_stats)
        grad_norm = self.apply_gradients(loss)
        stats.update(self.batch_stats(batch, grad_norm))
        return stats

    def compute_loss(self, batch: EpisodeBatch, lambdas: torch.Tensor, net: Optional[nn.Module] = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """The PCL loss of ``batch`` (on the learner's device) and its stats. ``net`` computes the online
        Q-values (default: the student; :class:`tw_rl.distributed.data_parallel.DataParallelLearner` passes its
        DDP wrapper)."""
        cfg = self.cfg
        self.student.train()
        q, values, target_values = self._forward(self.student if net is None else net, batch)
        q_target = None
        if self.target is not None:
            with torch.no_grad():
                q_target = self.q_values(self.target, batch)
        rewards = lagrangian_rewards(batch, lambdas)
        v = v_target = None
        if values is not None:
            v, v_target = values[..., V], target_values[..., V]
        loss, stats = pcl_loss(q, q_target, batch.actions, rewards, batch.mask, batch.lengths, batch.terminated,
                               cfg.alpha, cfg.gamma, cfg.window, cfg.multi_step_weight, cfg.value, v, v_target)
        return loss, stats

    def cost_loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The consistency loss of ``V_C`` on ``batch`` (:func:`cost_value_loss`); the student gets no gradient."""
        with torch.no_grad():
            _, h = batch_logits(self.student, batch, self.start_id, self.pad_id, return_hidden=True)
            vc_target = self.value_target(h, batch.budgets)[..., V_COST]
        vc = self.value(h, batch.budgets)[..., V_COST]
        return cost_value_loss(vc, vc_target, batch, self.cfg.window, self.cfg.multi_step_weight)

    @torch.no_grad()
    def start_cost_values(self, src_ids: torch.Tensor, src_mask: torch.Tensor, budgets: torch.Tensor
                          ) -> torch.Tensor:
        """``V_C(s_0)`` of prompts ``src_ids [N, S]`` at ``budgets [N]``: their estimated usage. ``[N]``."""
        dev = self.device
        dec = torch.full((src_ids.shape[0], 1), self.start_id, dtype=torch.long, device=dev)
        self.student.eval()
        _, h = self.student(src_ids.to(dev), src_mask.to(dev), dec, torch.zeros_like(dec, dtype=torch.bool),
                            return_hidden=True)
        return self.value(h, budgets.to(dev))[:, 0, V_COST]

    def warm_start(self, batch: EpisodeBatch, lambdas: torch.Tensor, cost_batch: Optional[EpisodeBatch],
                   steps: int) -> dict[str, float]:
        """Regress ``V_φ`` on the Monte-Carlo soft returns of on-policy ``batch`` (and ``V_C`` on the remaining
        usage of ``cost_batch``) for ``steps`` steps, the student fixed: the first PCL residuals are then about the
        policy, not about an untrained value. Features are computed once. Returns the fit's first and last loss."""
        if self.value is None or steps < 1:
            return {}
        cfg = self.cfg
        with torch.no_grad():
            batch = batch.to(self.device)
            q, h = batch_logits(self.student, batch, self.start_id, self.pad_id, return_hidden=True)
            _, alpha_log_pi, _ = soft_q(q, batch.actions, batch.mask, cfg.alpha)
            rewards = lagrangian_rewards(batch, lambdas)
            g = soft_returns(torch.zeros(q.shape[:2], device=q.device), alpha_log_pi, rewards, batch.mask,
                             batch.lengths, batch.terminated, cfg.gamma)
            parts = [(h, batch.budgets, g, batch.mask, V)]
            if cost_batch is not None:
                cb = cost_batch.to(self.device)
                _, hc = batch_logits(self.student, cb, self.start_id, self.pad_id, return_hidden=True)
                zeros = torch.zeros_like(cb.teacher_logprobs)
                gc = soft_returns(torch.zeros(hc.shape[:2], device=hc.device), zeros, usage_costs(cb), cb.mask,
                                  cb.lengths, cb.terminated, 1.0)
                parts.append((hc, cb.budgets, gc, cb.mask, V_COST))
        opt = torch.optim.Adam(self.value.parameters(), lr=cfg.value_lr * 3)
        first = last = 0.0
        for k in range(steps):
            loss = sum(masked_mean(0.5 * (self.value(hh, bb)[:, :-1, col] - gg).pow(2), mm)
                       for hh, bb, gg, mm, col in parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
            first = last if k == 0 else first
        self.value_target.load_state_dict(self.value.state_dict())
        return {"value/warm_start_loss_first": first, "value/warm_start_loss_last": last}

    def apply_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, clip, AdamW step, Polyak update; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.student, self.cfg.grad_clip)
        if self.value is not None:
            torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.polyak_update()
        self.step += 1
        return grad_norm

    def batch_stats(self, batch: EpisodeBatch, grad_norm: torch.Tensor) -> dict[str, float]:
        return {"loss/grad_norm": float(grad_norm), **rollout_stats(batch), "learner/step": float(self.step)}

    @torch.no_grad()
    def polyak_update(self) -> None:
        """``θ_target ← (1 − ρ) θ_target + ρ θ`` with ``ρ = target_update_rate``; buffers are copied."""
        rate = self.cfg.target_update_rate
        pairs = [(t, o) for t, o in ((self.target, self.student), (self.value_target, self.value)) if t is not None]
        for target, online in pairs:
            for tp, p in zip(target.parameters(), online.parameters()):
                tp.lerp_(p, rate)
            for tb, b in zip(target.buffers(), online.buffers()):
                tb.copy_(b)

    # ---- checkpointing: a flat dict of tensors (safetensors-ready) -------------------------------------------
    def _nets(self) -> dict[str, nn.Module]:
        nets = {"student": self.student}
        if self.target is not None:
            nets["target"] = self.target
        if self.value is not None:
            nets.update(value=self.value, value_target=self.value_target)
        return nets

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Student, target, value heads, AdamW moments and the step count as a flat ``name → tensor`` dict.

        Tensors are cloned and contiguous, so tied weights do not share storage (safetensors refuses that).
        Optimiser hyperparameters are not stored: they come from the config.
        """
        return learner_state(self._nets(), self.optimizer, self.step)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.step = load_learner_state(state, self._nets(), self.optimizer)


def make_learner(cfg: RLConfig | Config, student: nn.Module, start_id: int, pad_id: int,
                 value: Optional[ValueHead] = None, **_) -> PCLLearner:
    """The registry entry point (``tw_rl.registry.ALGORITHMS["pcl"]``); accepts the run config or its ``rl`` part."""
    rl = cfg.rl if isinstance(cfg, Config) else cfg
    max_len = cfg.data.max_tgt_tokens if isinstance(cfg, Config) else 32
    return PCLLearner(rl, student, start_id, pad_id, value=value, max_len=max_len)
