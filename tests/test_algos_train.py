"""Every registered algorithm trains two iterations through the same driver (``train(cfg)`` with ``algo=...``),
and every ablation switch has its effect. One tiny run's phase-0/1 products are shared by all (copied)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train import TINY, phase01_copy
from tw_rl.config import load_config
from tw_rl.metrics import read_metrics

FAST = TINY + ["rl.iterations=2", "eval.baselines=false", "eval.latency_examples=0", "eval.max_examples=8"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Phases 0 and 1 of the tiny run (no phase 2)."""
    from tw_rl.train import train

    out = tmp_path_factory.mktemp("base")
    train(load_config(None, FAST + [f"out_dir={out}", "rl.enabled=false"]))
    return out


def run(base, tmp_path, *overrides):
    from tw_rl.train import train

    out = phase01_copy(base, tmp_path / "run")
    report = train(load_config(None, FAST + [f"out_dir={out}", *overrides]))
    return out, report


def changed_parameters(out):
    from tw_rl.models.student import Student

    p1, _ = Student.load(out / "models" / "phase1")
    final, _ = Student.load(out / "models" / "final")
    return {n for (n, a), (_, b) in zip(p1.named_parameters(), final.named_parameters()) if not torch.equal(a, b)}


@pytest.mark.parametrize("algo, loss_key", [("pcl", "loss/pcl"), ("gkd", "loss/gkd"), ("ppo", "loss/ppo"),
                                            ("reinforce", "loss/reinforce")])
def test_algorithm_trains_two_iterations_through_the_driver(base, tmp_path, algo, loss_key):
    extra = ["rl.on_policy_fraction=1.0"] if algo in ("ppo", "reinforce") else []  # on-policy learners
    out, report = run(base, tmp_path, f"algo={algo}", *extra)
    rows = read_metrics(out, phase="phase2")
    assert len(rows) == 2 and all(loss_key in r and torch.isfinite(torch.tensor(r[loss_key])) for r in rows)
    assert len(report["tw"]) == 3
    # rl.trainable=tau (the default): the learner moved the <τ> row of the tied output layer and nothing else
    assert changed_parameters(out) == {"model.shared.weight"}


def test_trainable_all_moves_the_whole_student(base, tmp_path):
    out, _ = run(base, tmp_path, "rl.trainable=all", "rl.lr=1e-4")
    assert len(changed_parameters(out)) > 10


def test_rllib_ppo_refuses_an_explicit_trainable_tau_before_anything_runs(tmp_path):
    from tw_rl.config import ConfigError

    with pytest.raises(ConfigError, match=r"algo=rllib_ppo .*rl.trainable='tau' .*set rl.trainable=all or leave it"):
        load_config(None, FAST + [f"out_dir={tmp_path}", "algo=rllib_ppo", "rl.trainable=tau"])
    assert not any(tmp_path.iterdir())  # refused at config load: nothing was written


def test_rllib_ppo_trains_two_rllib_iterations_through_the_driver(base, tmp_path):
    """``algo=rllib_ppo`` alone (rl.trainable=all comes from the algorithm's requirements) runs through phase 2."""
    from tw_rl.distributed.cluster import shutdown_ray

    try:
        out, report = run(base, tmp_path, "algo=rllib_ppo", "rllib.episodes_per_iteration=4",
                          "rllib.minibatch_size=64")
    finally:
        shutdown_ray()
    rows = read_metrics(out, phase="phase2")
    assert len(rows) == 2
    assert all("loss/policy_loss" in r and any(k.startswith("lambda/") for k in r) for r in rows)
    assert any(k.startswith("rollout/usage_") for r in rows for k in r)
    assert len(report["tw"]) == 3
    assert len(changed_parameters(out)) > 10


def test_replay_mix_ratio_sets_the_batch_composition(base, tmp_path):
    out, _ = run(base, tmp_path, "rl.on_policy_fraction=0.25")  # batch 8 → 2 on-policy, 6 demonstrations
    rows = read_metrics(out, phase="phase2")
    assert all(r["replay/batch_onpolicy"] == 0.25 and r["replay/demos"] > 0 for r in rows)


def test_on_policy_only_phase1_off_and_delta_off(base, tmp_path):
    """Three switches in one run, each checked on its own effect."""
    out, _ = run(base, tmp_path, "rl.demonstrations=false", "phase1.enabled=false", "student.use_delta=false")
    rows = read_metrics(out, phase="phase2")
    # on-policy only: no demonstrations in the buffer, every sampled episode is on-policy
    assert all(r["replay/demos"] == 0 and r["replay/batch_onpolicy"] == 1.0 for r in rows)
    # phase 1 off: not trained (no phase-1 metrics in this run), phase 2 started from the phase-0 student + <τ>
    done = json.loads((out / "models" / "phase1" / "done.json").read_text())
    assert (done["steps"], done["enabled"], done["settings"]["enabled"]) == (0, False, False)
    from tw_rl.models.student import Student

    p1, _ = Student.load(out / "models" / "phase1")
    assert float(p1.model.get_output_embeddings().weight[p1.tau_id].abs().max()) == 0.0  # fresh <τ> row
    base_p1, _ = Student.load(base / "models" / "phase1")
    assert float(base_p1.model.get_output_embeddings().weight[base_p1.tau_id].abs().max()) > 0.0
    # δ off: saved as off, never trained, so teacher tokens enter the decoder unmarked
    final, _ = Student.load(out / "models" / "final")
    assert final.use_delta is False and float(final.delta.abs().max()) == 0.0
    assert "delta" not in changed_parameters(out)
