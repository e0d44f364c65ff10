"""Token-level PPO on the Training Wheels reward and budget cost (SPEC §3, §5), for ablations against PCL.

Every action ``a_t ∈ V ∪ {<τ>}`` is a PPO action; the reward is PCL's, ``r_t = log π_T(y_t|·) − λ_b (c_t − b)``
(:func:`tw_rl.algos.pcl.lagrangian_rewards`, applied at update time so stored episodes never go stale when ``λ``
moves), plus the entropy term of SPEC §3 as a reward, ``−α log μ(a_t|s_t)`` with the acting policy's log-prob
(as KL-shaped rewards are in RLHF), so PPO and PCL optimise the same objective.

**Baseline, no value head [choice]**: the student has no value head, and a new head would need its own warm-up
before its advantages help. Episodes are complete, so the return-to-go ``G_t = Σ_{k≥t} γ^(k−t) r_k`` is exact
(a truncated episode is not bootstrapped); the advantage is ``G_t`` minus the mean ``G_t`` of the batch's rows at
the same step ``t``, whitened over the batch. Loss: the clipped surrogate (Schulman et al. 2017)

    L = − mean_t min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t),   ρ_t = π_θ(a_t|s_t) / μ(a_t|s_t)

with ``μ`` the stored ``behavior_logprobs``. Demonstrations (``policy_version < 0``) have no behaviour policy and
are masked out, so set ``rl.on_policy_fraction=1`` (or ``rl.demonstrations=false``) to use the whole batch; greedy
on-policy episodes enter with the log-probs of the temperature-1 policy they were decoded from. Each sampled batch
gets ``ppo.epochs`` gradient steps.
"""

from __future__ import annotations

import torch
from torch import nn

from tw_rl.algos.learner import Learner
from tw_rl.algos.common import (batch_logits, clip_gradients, learner_state, load_learner_state, masked_mean,
                               rollout_stats)
from tw_rl.algos.pcl import lagrangian_rewards
from tw_rl.batch import EpisodeBatch
from tw_rl.config import Config


# --------------------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------------------
def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = Σ_{k ≥ t} γ^(k−t) r_k`` over real steps: ``[B, T]`` → ``[B, T]`` (0 on padding)."""
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    offset = idx[None, :] - idx[:, None]  # k − t
    w = torch.where(offset >= 0, gamma ** offset.clamp(min=0).to(torch.float32), torch.zeros((), device=rewards.device))
    r = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    return torch.where(mask, r @ w.T, torch.zeros_like(r))


def baseline_advantages(returns: torch.Tensor, mask: torch.Tensor, whiten: bool = True) -> torch.Tensor:
    """``G_t`` minus the mean ``G_t`` of the rows that reach step ``t``; optionally whitened over real steps."""
    m = mask.float()
    baseline = (returns * m).sum(0) / m.sum(0).clamp(min=1)  # [T]
    adv = torch.where(mask, returns - baseline[None, :], torch.zeros_like(returns))
    if whiten:
        n = mask.sum().clamp(min=1)
        mean = adv.sum() / n
        std = (torch.where(mask, adv - mean, torch.zeros_like(adv)).pow(2).sum() / n).sqrt()
        adv = torch.where(mask, (adv - mean) / (std + 1e-8), torch.zeros_like(adv))
    return adv


def ppo_clip_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``−mean min(ρ A, clip(ρ, 1−ε, 1+ε) A)`` over real steps; ``[B, T]`` inputs, ``ρ = exp(logp − behavior_logp)``."""
    ratio = torch.exp(logp - behavior_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    loss = -masked_mean(surrogate, mask)
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip) & mask
        stats = {"loss/ppo": loss.item(), "ppo/ratio": float(masked_mean(ratio, mask)),
                 "ppo/clip_fraction": float(clipped.sum() / mask.sum().clamp(min=1)),
                 "ppo/approx_kl": float(masked_mean(behavior_logp - logp, mask))}
    return loss, stats


# --------------------------------------------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------------------------------------------
class PPOLearner(Learner):
    def __init__(self, cfg: Config, student: nn.Module, start_id: int, pad_id: int) -> None:
        self.cfg, self.student, self.start_id, self.pad_id = cfg, student, start_id, pad_id
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.rl.lr, weight_decay=0.0)
        self.step = 0

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def update(self, batch: EpisodeBatch, lambdas: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        batch = batch.to(self.device)
        mask = batch.mask & (batch.policy_version >= 0)[:, None]  # demonstrations have no behaviour policy
        T = batch.tokens.shape[1]
        rewards = lagrangian_rewards(batch, lambdas) - cfg.rl.alpha * batch.behavior_logprobs
        advantages = baseline_advantages(returns_to_go(rewards, mask, cfg.rl.gamma), mask)
        safe_actions = torch.where(batch.mask, batch.actions, torch.zeros_like(batch.actions))
        self.student.train()
        stats: dict[str, float] = {}
        for _ in range(cfg.ppo.epochs):
            logits = batch_logits(self.student, batch, self.start_id, self.pad_id)[:, :T].float()
            logp = torch.log_softmax(logits, -1).gather(-1, safe_actions[..., None]).squeeze(-1)
            loss, stats = ppo_clip_loss(logp, batch.behavior_logprobs, advantages, mask, cfg.ppo.clip)
            if not bool(mask.any()):  # no on-policy row in this batch: nothing to learn from
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["loss/grad_norm"] = float(clip_gradients(self.student, cfg.rl.grad_clip))
            self.optimizer.step()
        self.step += 1
        return {**stats, **rollout_stats(batch), "ppo/onpolicy_steps": float(mask.sum()),
                "value/reward": float(masked_mean(rewards, mask)), "learner/step": float(self.step)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return learner_state({"student": self.student}, self.optimizer, self.step)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = load_learner_state(state, {"student": self.student}, self.optimizer)


def make_learner(cfg: Config, student: nn.Module, start_id: int, pad_id: int, **_) -> PPOLearner:
    """Registry entry point (``ALGORITHMS["ppo"]``)."""
    return PPOLearner(cfg, student, start_id, pad_id)
