"""BudgetMultipliers (SPEC.md §5): projection, direction, per-episode lookup, convergence, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tw_rl.budget import BudgetMultipliers

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def test_projection_at_zero_and_direction() -> None:
    m = BudgetMultipliers([0.2, 0.5], lr=2.0, init=0.1)
    m.update({0.2: 0.0})  # under budget: λ decreases, but not below 0
    assert m.as_metrics()["lambda/0.2"] == 0.0
    m.update({0.2: 0.5})  # over budget by 0.3: λ grows by η·0.3
    assert m.as_metrics()["lambda/0.2"] == pytest.approx(0.6)
    m.update({0.2: 0.1})  # under by 0.1: shrinks by η·0.1
    assert m.as_metrics()["lambda/0.2"] == pytest.approx(0.4)
    assert m.as_metrics()["lambda/0.5"] == pytest.approx(0.1)  # absent from the updates: unchanged


def test_for_episodes_maps_budgets_to_levels() -> None:
    m = BudgetMultipliers(GRID, lr=1.0, init=0.0)
    m.update({b: b + 0.1 * (i + 1) for i, b in enumerate(GRID)})  # λ_i = 0.1·(i+1)
    lam = m.for_episodes(torch.tensor([0.5, 0.0, 0.2, 0.2 + 1e-7, 0.3], dtype=torch.float32))
    torch.testing.assert_close(lam, torch.tensor([0.6, 0.1, 0.3, 0.3, 0.4]))
    assert lam.dtype == torch.float32
    # between two levels: the linear interpolation of their multipliers (budget_sampling=continuous)
    torch.testing.assert_close(m.for_episodes(torch.tensor([0.25])), torch.tensor([0.35]))
    with pytest.raises(ValueError, match="outside the grid"):
        m.for_episodes(torch.tensor([float(max(GRID)) + 0.1]))
    with pytest.raises(ValueError):
        m.update({0.15: 0.3})


def test_metrics_names() -> None:
    assert set(BudgetMultipliers([0.2, 0.0], lr=1.0, init=0.5).as_metrics()) == {"lambda/0.0", "lambda/0.2"}


def test_dual_ascent_converges_on_a_simulated_response() -> None:
    # usage responds to λ like a policy would: a larger penalty, fewer teacher calls
    m = BudgetMultipliers(GRID, lr=0.5, init=0.0)
    for _ in range(200):
        lam = m.for_episodes(torch.tensor(GRID)).double().numpy()
        usage = np.clip(0.6 - lam, 0.0, 1.0)
        m.update(dict(zip(GRID, usage.tolist())))
    lam = m.for_episodes(torch.tensor(GRID)).double().numpy()
    usage = np.clip(0.6 - lam, 0.0, 1.0)
    np.testing.assert_allclose(usage, GRID, atol=0.02)
    assert (lam >= 0).all()


def test_state_round_trip() -> None:
    m = BudgetMultipliers(GRID, lr=1.0, init=0.3)
    m.update({0.1: 0.9, 0.4: 0.0})
    m2 = BudgetMultipliers(GRID, lr=1.0, init=0.0)
    m2.load_state_dict(m.state_dict())
    assert m2.as_metrics() == m.as_metrics()
    with pytest.raises(ValueError):
        BudgetMultipliers([0.2], lr=1.0, init=0.0).load_state_dict(m.state_dict())
