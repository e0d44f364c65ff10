"""Every path on decoder-only models: the driver end to end (phases 0 → 1 → 2 → evaluation with every baseline) on a
Llama-style teacher and a Qwen2-style student trained from scratch, every registered learner, Ray rollout workers
and the Ray teacher server, ``tw_rl.load``/``generate`` at budgets off the grid, the Gymnasium env, the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train import TINY, phase01_copy
from tw_rl.config import load_config
from tw_rl.metrics import read_metrics

CAUSAL = TINY + ["teacher.arch.model_type=llama", "teacher.arch.num_layers=2",
                 "student.arch.model_type=qwen2", "student.arch.num_layers=2"]
FAST = CAUSAL + ["rl.iterations=2", "eval.baselines=false", "eval.latency_examples=0", "eval.max_examples=8"]
SMOKE_CAUSAL = Path(__file__).resolve().parent.parent / "launch" / "configs" / "smoke_causal.yaml"


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    from tw_rl.train import train

    out = tmp_path_factory.mktemp("causal")
    cfg = load_config(None, CAUSAL + [f"out_dir={out}"])
    return cfg, out, train(cfg)


def test_the_driver_runs_every_phase_and_row_on_causal_models(causal_run) -> None:
    from tw_rl.models.family import CAUSAL as FAMILY, family_of
    from tw_rl.models.student import Student

    cfg, out, report = causal_run
    pre = json.loads((out / "pretrain.json").read_text())
    assert pre["teacher"]["trained"] and pre["student"]["trained"]
    student, _ = Student.load(out / "models" / "final")
    assert family_of(student.model) == FAMILY and type(student.model).__name__ == "Qwen2ForCausalLM"
    for key in ("tw", "phase1_only"):
        assert [r["budget"] for r in report[key]] == cfg.budgets
        for r in report[key]:
            assert 0.0 <= r["usage_mean"] <= 1.0 and np.isfinite(r["bleu"])
    assert report["tw"][0]["usage_mean"] == 0.0  # b = 0: the deploy-time guard
    base = report["baselines"]
    assert {"random", "confidence"} <= set(base)
    spec = base["speculative"]
    lossless = [r for r in spec if r.get("lenience", 1.0) == 1.0]
    assert lossless and all(r["matches_teacher"] == 1.0 for r in lossless)  # lossless on a causal target too
    assert report["oracle"] and all(r["deployable"] is False for r in report["oracle"])
    assert len(read_metrics(out, phase="phase2")) == cfg.rl.iterations


def test_a_causal_run_loads_and_generates_at_any_budget(causal_run) -> None:
    import tw_rl

    _, out, _ = causal_run
    model = tw_rl.load(out)
    texts = [e.text for e in model.load_examples("test", limit=4)]
    for b in (0.0, 0.15, 0.35):
        gens = model.generate(texts, budget=b)
        assert len(gens) == 4 and all(g.budget == b and len(g.from_teacher) == len(g.token_ids) for g in gens)
        assert all(g.text == model.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in gens)
        if b == 0:
            assert not any(any(g.from_teacher) for g in gens)


@pytest.fixture(scope="module")
def base(causal_run, tmp_path_factory):
    from tw_rl.train import train

    out = tmp_path_factory.mktemp("causal_base")
    phase01_copy(causal_run[1], out)
    train(load_config(None, FAST + [f"out_dir={out}", "rl.enabled=false"]))
    return out


@pytest.mark.parametrize("algo, loss_key", [("pcl", "loss/pcl"), ("gkd", "loss/gkd"), ("ppo", "loss/ppo"),
                                            ("reinforce", "loss/reinforce")])
def test_every_learner_trains_a_causal_student(base, tmp_path, algo, loss_key) -> None:
    from tw_rl.models.student import Student
    from tw_rl.train import train

    out = phase01_copy(base, tmp_path / "run")
    extra = ["rl.on_policy_fraction=1.0"] if algo in ("ppo", "reinforce") else []
    report = train(load_config(None, FAST + [f"out_dir={out}", f"algo={algo}", *extra]))
    rows = read_metrics(out, phase="phase2")
    assert len(rows) == 2 and all(np.isfinite(r[loss_key]) for r in rows)
    assert len(report["tw"]) == 3
    p1, _ = Student.load(out / "models" / "phase1")
    final, _ = Student.load(out / "models" / "final")
    changed = {n for (n, a), (_, b) in zip(p1.named_parameters(), final.named_parameters()) if not torch.equal(a, b)}
    out_layer = final.model.get_output_embeddings().weight
    names = [n for n, p in final.named_parameters() if p is out_layer]
    assert changed == set(names)  # rl.trainable=tau: only the (tied) output layer's <τ> row moved
    delta = (final.model.get_output_embeddings().weight - p1.model.get_output_embeddings().weight).abs().sum(1)
    assert delta[:final.tau_id].sum() == 0 and delta[final.tau_id] > 0


def test_ray_rollout_workers_teacher_server_and_rllib_on_causal_models(base, tmp_path) -> None:
    from tw_rl.distributed.cluster import shutdown_ray
    from tw_rl.train import train

    try:
        out = phase01_copy(base, tmp_path / "ray")
        train(load_config(None, FAST + [f"out_dir={out}", "rollout.num_workers=2", "rollout.envs_per_worker=4"]))
        rows = read_metrics(out, phase="phase2")
        assert [r["rollout/episodes"] for r in rows] == [8, 8]  # 2 Ray workers × 4 episodes, one Ray teacher
        out = phase01_copy(base, tmp_path / "rllib")
        train(load_config(None, FAST + [f"out_dir={out}", "algo=rllib_ppo", "rllib.episodes_per_iteration=4",
                                        "rllib.minibatch_size=64"]))
        rows = read_metrics(out, phase="phase2")
        assert len(rows) == 2 and all("loss/policy_loss" in r for r in rows)
    finally:
        shutdown_ray()


def test_the_env_on_causal_models_passes_the_gymnasium_checker(causal_toy) -> None:
    from gymnasium.utils.env_checker import check_env

    from tw_rl.envs.token_mdp import TokenMDPEnv

    toy = causal_toy
    ex = toy["examples"]
    env = TokenMDPEnv(ex, toy["teacher"], n_actions=toy["student"].n_actions, eos_id=toy["eos"],
                      budgets=[0.0, 0.2, 0.5], max_len=8, max_src_len=max(len(s) for e in ex
                                                                           for s in e.student_src.values()))
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0, options={"budget": 0.2})
    _, reward, *_ = env.step(toy["student"].tau_id)  # a call: the causal teacher answers and scores
    assert np.isfinite(reward)


def test_smoke_causal_passes_the_dry_run(capsys) -> None:
    from tw_rl.cli import main

    assert main(["train", "--dry-run", "--config", str(SMOKE_CAUSAL)]) == 0
    text = capsys.readouterr().out
    assert "llama" in text and "qwen2" in text
