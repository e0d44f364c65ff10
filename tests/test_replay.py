"""ReplayBuffer (SPEC.md §4): hand-filled episodes, wrap-around, demos kept, mix ratio, state round trip, usage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tw_rl.batch import Episode
from tw_rl.replay import ReplayBuffer

TAU = 99


def episode(ident: int, n: int = 3, budget: float = 0.2, calls: int = 0, source: str = "onpolicy",
            terminated: bool = True) -> Episode:
    """An episode whose first token is ``ident`` (to recognise it) with ``calls`` <τ> steps at its end."""
    tokens = np.array([ident] + list(range(1, n)), dtype=np.int64)
    actions = tokens.copy()
    if calls:
        actions[n - calls:] = TAU
    return Episode(src_ids=np.arange(ident % 4 + 1, dtype=np.int64), actions=actions, tokens=tokens,
                   teacher_logprobs=-np.linspace(0.1, 1.0, n).astype(np.float32) * (ident + 1),
                   behavior_logprobs=np.full(n, -0.5 * ident, np.float32), budget=budget, terminated=terminated,
                   policy_version=-1 if source != "onpolicy" else ident, source=source,
                   teacher_src=None if ident % 3 == 0 else np.arange(ident % 5, dtype=np.int64) + 7)


def ids(episodes: list[Episode]) -> list[int]:
    return [int(e.tokens[0]) for e in episodes]


def test_wrap_around_evicts_oldest_first() -> None:
    buf = ReplayBuffer(capacity=3, on_policy_fraction=0.5)
    buf.add([episode(i) for i in range(2)])
    assert ids(buf.onpolicy_episodes()) == [0, 1]
    buf.add([episode(2), episode(3)])
    assert ids(buf.onpolicy_episodes()) == [1, 2, 3]  # 0 evicted
    buf.add([episode(4)])
    assert ids(buf.onpolicy_episodes()) == [2, 3, 4]
    buf.add([episode(i) for i in range(5, 12)])  # more than a full turn in one call
    assert ids(buf.onpolicy_episodes()) == [9, 10, 11]
    assert buf.num_onpolicy == 3


def test_demos_are_never_evicted() -> None:
    buf = ReplayBuffer(capacity=2, on_policy_fraction=0.5)
    buf.add_demos([episode(100 + i, source="oracle") for i in range(5)])
    buf.add([episode(i) for i in range(50)])
    assert ids(buf.demos()) == [100, 101, 102, 103, 104]
    assert buf.num_demos == 5 and buf.num_onpolicy == 2 and len(buf) == 7


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.8])
def test_sample_mix_ratio(fraction: float) -> None:
    buf = ReplayBuffer(capacity=10, on_policy_fraction=fraction)
    buf.add_demos([episode(100 + i, source="teacher_demo") for i in range(4)])
    buf.add([episode(i) for i in range(10)])
    rng = np.random.default_rng(0)
    batch = buf.sample(20, rng)
    assert sum(e.source == "onpolicy" for e in batch) == round(fraction * 20)  # exact per batch
    big = buf.sample(20000, rng)
    on = np.array([int(e.tokens[0]) for e in big if e.source == "onpolicy"])
    off = np.array([int(e.tokens[0]) for e in big if e.source != "onpolicy"])
    assert len(on) == round(fraction * 20000)
    # uniform with replacement within each pool
    assert np.abs(np.bincount(on, minlength=10) / len(on) - 0.1).max() < 0.02
    assert np.abs(np.bincount(off - 100, minlength=4) / len(off) - 0.25).max() < 0.02


def test_sample_falls_back_to_the_non_empty_pool() -> None:
    rng = np.random.default_rng(1)
    only_demos = ReplayBuffer(capacity=4, on_policy_fraction=0.9)
    only_demos.add_demos([episode(100, source="oracle")])
    assert ids(only_demos.sample(5, rng)) == [100] * 5
    only_on = ReplayBuffer(capacity=4, on_policy_fraction=0.1)
    only_on.add([episode(7)])
    assert ids(only_on.sample(5, rng)) == [7] * 5
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=4, on_policy_fraction=0.5).sample(1, rng)


def assert_same_episode(a: Episode, b: Episode) -> None:
    for f in ("src_ids", "actions", "tokens", "teacher_logprobs", "behavior_logprobs"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f
    assert (a.budget, a.terminated, a.policy_version, a.source) == (b.budget, b.terminated, b.policy_version,
                                                                     b.source)
    assert (a.teacher_src is None) == (b.teacher_src is None)
    if a.teacher_src is not None:
        assert a.teacher_src.dtype == b.teacher_src.dtype and np.array_equal(a.teacher_src, b.teacher_src)


def test_state_round_trip_is_exact(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    buf = ReplayBuffer(capacity=4, on_policy_fraction=0.3)
    buf.add_demos([episode(100, n=5, source="teacher_demo"), episode(101, n=2, source="oracle", budget=0.1)])
    buf.add([episode(i, n=1 + i % 4, budget=0.1 * (i % 3), calls=i % 2, terminated=bool(i % 2))
             for i in range(6)])  # wrapped: write pointer in the middle of the ring
    arrays, meta = buf.state_dict()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    save_file(arrays, str(tmp_path / "replay.safetensors"))
    (tmp_path / "replay.json").write_text(json.dumps(meta))

    restored = ReplayBuffer.from_state_dict(load_file(str(tmp_path / "replay.safetensors")),
                                            json.loads((tmp_path / "replay.json").read_text()))
    for a, b in zip(buf.demos() + buf.onpolicy_episodes(), restored.demos() + restored.onpolicy_episodes(),
                    strict=True):
        assert_same_episode(a, b)
    # identical behaviour afterwards: same samples from the same seed, same eviction
    s1, s2 = buf.sample(50, np.random.default_rng(3)), restored.sample(50, np.random.default_rng(3))
    for a, b in zip(s1, s2, strict=True):
        assert_same_episode(a, b)
    buf.add([episode(50)])
    restored.add([episode(50)])
    assert ids(buf.onpolicy_episodes()) == ids(restored.onpolicy_episodes()) == [3, 4, 5, 50]


def test_state_round_trip_of_an_empty_buffer() -> None:
    buf = ReplayBuffer(capacity=3, on_policy_fraction=0.5)
    restored = ReplayBuffer.from_state_dict(*buf.state_dict())
    assert len(restored) == 0 and restored.capacity == 3


def test_recent_usage_per_budget() -> None:
    buf = ReplayBuffer(capacity=10, on_policy_fraction=0.5)
    buf.add_demos([episode(100, n=4, calls=4, budget=0.2, source="oracle")])  # demos don't count
    buf.add([
        episode(0, n=4, calls=4, budget=0.2),  # old: falls out of last_n=2
        episode(1, n=4, calls=1, budget=0.2),  # usage 0.25
        episode(2, n=5, calls=0, budget=0.5),  # usage 0.0
        episode(3, n=4, calls=2, budget=0.2),  # usage 0.5
        episode(4, n=2, calls=1, budget=0.5),  # usage 0.5
    ])
    usage = buf.recent_usage([0.0, 0.2, 0.5], last_n=2)
    assert usage == pytest.approx({0.2: (0.25 + 0.5) / 2, 0.5: (0.0 + 0.5) / 2})
    assert 0.0 not in usage  # no episode at this level: its multiplier must not move
    assert buf.recent_usage([0.2], last_n=10)[0.2] == pytest.approx((1.0 + 0.25 + 0.5) / 3)


def test_usage_of_an_episode_matches_its_batch_mask() -> None:
    e = episode(1, n=5, calls=2)
    assert e.usage() == pytest.approx(0.4)
    assert torch.from_numpy(e.teacher_mask).sum().item() == 2
