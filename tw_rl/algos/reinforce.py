"""The smallest learner, as the example of ``docs/algorithms.md``: REINFORCE with a batch-mean baseline.

``loss = −mean_t (G_t − mean G) log π(a_t|s_t)`` over on-policy steps, ``G_t`` the return-to-go of the Lagrangian
reward (SPEC §3, §5). On-policy only: demonstrations (``policy_version < 0``) are masked out.
"""

from __future__ import annotations

import torch

from tw_rl.algos.learner import Learner
from tw_rl.algos.common import (batch_logits, clip_gradients, learner_state, load_learner_state, masked_mean,
                               rollout_stats)
from tw_rl.algos.pcl import lagrangian_rewards
from tw_rl.algos.ppo import returns_to_go


class ReinforceLearner(Learner):
    def __init__(self, cfg, student, start_id: int, pad_id: int) -> None:
        self.cfg, self.student, self.start_id, self.pad_id = cfg, student, start_id, pad_id
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.rl.lr, weight_decay=0.0)
        self.step = 0

    def update(self, batch, lambdas: torch.Tensor) -> dict[str, float]:
        mask = batch.mask & (batch.policy_version >= 0)[:, None]
        g = returns_to_go(lagrangian_rewards(batch, lambdas), mask, self.cfg.rl.gamma)
        advantage = torch.where(mask, g - masked_mean(g, mask), torch.zeros_like(g))
        logits = batch_logits(self.student, batch, self.start_id, self.pad_id)[:, :-1]
        actions = torch.where(batch.mask, batch.actions, torch.zeros_like(batch.actions))
        logp = torch.log_softmax(logits.float(), -1).gather(-1, actions[..., None]).squeeze(-1)
        loss = -masked_mean(advantage * logp, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.student, self.cfg.rl.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"loss/reinforce": loss.item(), **rollout_stats(batch)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return learner_state({"student": self.student}, self.optimizer, self.step)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = load_learner_state(state, {"student": self.student}, self.optimizer)


def make_learner(cfg, student, start_id: int, pad_id: int, **_) -> ReinforceLearner:
    return ReinforceLearner(cfg, student, start_id, pad_id)
