"""The critic heads of phase 2: ``V_φ(s)`` and ``V_C(s)`` over the student's decoder state (SPEC §4, §5).

SPEC §4's standard PCL parameterisation keeps the policy ``π_θ = softmax(Q_θ/α)`` (the student's logits) and learns
a separate value ``V_φ``; SPEC §5's secondary constraint value ``V_C`` predicts the usage still to come. Both read
the output layer's input ``h(s)`` of the student (detached: the critics never move the student), the episode's
budget ``b`` (part of the state ``s = (x, b, X_in[<t])``) and the step ``t / max_len``, through one small MLP with
two outputs::

    [V_φ(s), V_C(s)] = W₂ tanh(W₁ [LN(h(s)), b, t / max_len] + c₁) + c₂

The last layer starts at zero, so a fresh head predicts 0 — the exact soft value of SPEC §3 at ``α = 1`` without
calls — until the warm start (:meth:`tw_rl.algos.pcl.PCLLearner.warm_start`) regresses it on Monte-Carlo returns.
It is saved beside the student as ``tw_value.safetensors`` (+ its sizes in ``tw_value.json``); deployment never
reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_FILE = "tw_value.safetensors"
_META = "tw_value.json"
V, V_COST = 0, 1  # output columns


class ValueHead(nn.Module):
    """``[V_φ, V_C]`` at every decoder position: ``h [B, L, d]``, ``budgets [B]`` → ``[B, L, 2]``."""

    def __init__(self, d_model: int, hidden: int = 64, max_len: int = 32) -> None:
        super().__init__()
        self.d_model, self.hidden, self.max_len = int(d_model), int(hidden), int(max_len)
        self.norm = nn.LayerNorm(self.d_model, elementwise_affine=False)
        self.net = nn.Sequential(nn.Linear(self.d_model + 2, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        B, L, _ = h.shape
        b = budgets.to(device=h.device, dtype=torch.float32)[:, None, None].expand(B, L, 1)
        pos = (torch.arange(L, device=h.device, dtype=torch.float32) / self.max_len)[None, :, None].expand(B, L, 1)
        return self.net(torch.cat([self.norm(h.detach().float()), b, pos], dim=-1))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / VALUE_FILE))
        (d / _META).write_text(json.dumps({"d_model": self.d_model, "hidden": self.hidden, "max_len": self.max_len}))

    @classmethod
    def load(cls, directory: str | Path) -> "ValueHead":
        d = Path(directory)
        if not (d / _META).is_file() or not (d / VALUE_FILE).is_file():
            raise FileNotFoundError(f"{d} has no value head ({_META} and {VALUE_FILE})")
        head = cls(**json.loads((d / _META).read_text()))
        head.load_state_dict(load_file(str(d / VALUE_FILE)))
        return head
