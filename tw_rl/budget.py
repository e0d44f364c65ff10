"""Budget multipliers: one Lagrange multiplier ``λ_b ≥ 0`` per budget level (SPEC.md §5).

The constraint for level ``b`` is mean usage ≤ ``b``; the reward carries ``−λ_b (c_t − b)``
(:func:`tw_rl.algos.pcl.lagrangian_rewards`), and the multipliers follow projected dual ascent
``λ_b ← max(0, λ_b + η_λ (usage_b − b))`` on the usage of recent on-policy episodes
(:meth:`tw_rl.replay.ReplayBuffer.recent_usage`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

GRID_TOLERANCE = 1e-6  # a budget within this of a grid level is that level (YAML, CLI and float round trips)


def grid_level(budget: float, grid: Iterable[float]) -> float | None:
    """The level of ``grid`` that ``budget`` is (within :data:`GRID_TOLERANCE`), or None: the one rule by which
    a budget is matched to the grid (multipliers, usage per level, the API's budget check)."""
    levels = [float(g) for g in grid]
    if not levels:
        return None
    best = min(levels, key=lambda g: abs(g - float(budget)))
    return best if abs(best - float(budget)) <= GRID_TOLERANCE else None


class BudgetMultipliers:
    """``λ_b`` for every budget level ``b`` of the grid, updated by projected dual ascent (SPEC §5)."""

    def __init__(self, budgets: Iterable[float], lr: float, init: float, equality: bool = False) -> None:
        self.budgets = np.array(sorted(float(b) for b in budgets), dtype=np.float64)  # [K]
        if self.budgets.size == 0:
            raise ValueError("budgets is empty")
        if np.any(np.diff(self.budgets) <= GRID_TOLERANCE):
            raise ValueError(f"budget levels must be distinct: {self.budgets.tolist()}")
        if lr < 0 or init < 0:
            raise ValueError(f"lr={lr} and init={init} must be >= 0")
        self.lr = float(lr)
        self.equality = bool(equality)  # usage = b: λ_b unprojected (except at b = 0, where usage ≥ 0 = b anyway)
        self.lambdas = np.full(self.budgets.shape, float(init), dtype=np.float64)  # [K], ≥ 0 unless equality

    def __contains__(self, budget: float) -> bool:
        """Whether ``budget`` is a level of the grid (:func:`grid_level`)."""
        return grid_level(budget, self.budgets) is not None

    def level_index(self, budget: float) -> int:
        """Index of the grid level equal to ``budget`` (:func:`grid_level`); ValueError if there is none."""
        level = grid_level(budget, self.budgets)
        if level is None:
            raise ValueError(f"budget {budget} is not a level of the grid {self.budgets.tolist()}")
        return int(np.flatnonzero(self.budgets == level)[0])

    def update(self, usage_by_budget: dict[float, float]) -> None:
        """``λ_b ← max(0, λ_b + η (usage_b − b))`` for each level in ``usage_by_budget`` (``equality``: without the
        projection at levels b > 0, the multiplier of the constraint usage = b); others unchanged."""
        for b, usage in usage_by_budget.items():
            i = self.level_index(b)
            step = self.lambdas[i] + self.lr * (float(usage) - self.budgets[i])
            self.lambdas[i] = step if self.equality and self.budgets[i] > 0 else max(0.0, step)

    def for_episodes(self, budgets: torch.Tensor) -> torch.Tensor:
        """Per-episode multipliers: ``budgets [B]`` → ``λ [B]`` float32 on the same device. A budget between two
        levels gets the linear interpolation of their multipliers (``budget_sampling=continuous``: ``λ`` is a
        piecewise-linear function of ``b``); one outside the grid's range is an error."""
        b = budgets.detach().cpu().to(torch.float64).numpy()
        bad = (b < self.budgets[0] - GRID_TOLERANCE) | (b > self.budgets[-1] + GRID_TOLERANCE)
        if bad.any():
            raise ValueError(f"budgets {b[bad].tolist()} lie outside the grid {self.budgets.tolist()}")
        lam = np.interp(b, self.budgets, self.lambdas) if self.budgets.size > 1 else np.full(b.shape, self.lambdas[0])
        return torch.as_tensor(lam, dtype=torch.float32, device=budgets.device)

    def as_metrics(self) -> dict[str, float]:
        """``{"lambda/0.2": λ_0.2, ...}``."""
        return {f"lambda/{float(b)}": float(lam) for b, lam in zip(self.budgets, self.lambdas)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"budgets": torch.from_numpy(self.budgets.copy()), "lambdas": torch.from_numpy(self.lambdas.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        budgets = state["budgets"].to(torch.float64).numpy()
        if budgets.shape != self.budgets.shape or np.abs(budgets - self.budgets).max() > GRID_TOLERANCE:
            raise ValueError(f"checkpoint budgets {budgets.tolist()} differ from {self.budgets.tolist()}")
        self.lambdas = state["lambdas"].to(torch.float64).numpy().copy()
