"""The data-parallel PCL learner (tw_rl/distributed/data_parallel.py): 2 CPU workers over gloo equal the
single-process learner."""

import copy

import numpy as np
import pytest
import torch

from tw_rl.algos.pcl import PCLLearner
from tw_rl.batch import Episode, EpisodeBatch
from tw_rl.checkpoint import latest_checkpoint, load_checkpoint
from tw_rl.config import RLConfig, load_config
from tw_rl.distributed.data_parallel import DataParallelLearner, merge_stats, split_batch

START, PAD = 0, 0
RL = RLConfig(lr=1e-3, alpha=1.0, gamma=0.9, window=3, multi_step_weight=0.5, value="soft",
              target_update_rate=0.3, grad_clip=0.05)  # a small clip: clipping must act on the all-reduced gradient


@pytest.fixture(scope="module")
def dp(ray_cluster, toy):
    learner = DataParallelLearner(RL, copy.deepcopy(toy["student"]), START, PAD, num_workers=2, num_cpus=0.5)
    yield learner
    learner.close()


def episodes(toy, n: int, seed: int) -> list[Episode]:
    """``n`` random episodes of varied lengths, some calling the teacher (<τ> = V), some truncated."""
    rng = np.random.default_rng(seed)
    V, out = toy["V"], []
    for i in range(n):
        ex = toy["examples"][i % len(toy["examples"])]
        b = [0.0, 0.2, 0.5][i % 3]
        T = int(rng.integers(1, 7))
        tokens = rng.integers(2, V, size=T)
        actions = np.where(rng.random(T) < 0.3, V, tokens)
        out.append(Episode(src_ids=np.array(ex.student_src[b]), actions=actions, tokens=tokens,
                           teacher_logprobs=-rng.random(T).astype(np.float32) * 3,
                           behavior_logprobs=np.zeros(T, np.float32), budget=b, terminated=bool(rng.random() < 0.6)))
    return out


def fresh(toy) -> PCLLearner:
    return PCLLearner(RL, copy.deepcopy(toy["student"]), START, PAD)


def assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-5, msg=k)


def test_split_weights_make_the_ddp_average_the_full_batch_mean(toy):
    batch = EpisodeBatch.collate(episodes(toy, 7, seed=0), PAD)
    shards = split_batch(batch, torch.arange(7.0), 3)
    assert [len(s) for s, _, _ in shards] == [2, 3, 2]
    assert sum(w for _, _, w in shards) == pytest.approx(3.0)  # Σ_k W·N_k/N = W
    assert torch.equal(torch.cat([lam for _, lam, _ in shards]), torch.arange(7.0))
    one = split_batch(EpisodeBatch.collate(episodes(toy, 1, seed=0), PAD), torch.zeros(1), 2)
    assert [w for _, _, w in one] == [0.0, 2.0]  # the idle rank joins the all-reduce at weight 0
    merged = merge_stats([{"loss/pcl": 1.0, "rollout/length": 2.0, "learner/step": 3.0, "_steps": 3, "_episodes": 1},
                          {"loss/pcl": 3.0, "rollout/length": 4.0, "learner/step": 3.0, "_steps": 1, "_episodes": 3}])
    assert merged == {"loss/pcl": 1.5, "rollout/length": 3.5, "learner/step": 3.0}


@pytest.mark.parametrize("sizes", [(7, 5), (1,)], ids=["uneven", "fewer_episodes_than_workers"])
def test_two_gloo_workers_equal_the_single_process_learner(dp, toy, sizes):
    single = fresh(toy)
    dp.load_state_dict(single.state_dict())  # both from the same start, optimiser moments empty
    for i, n in enumerate(sizes):
        batch = EpisodeBatch.collate(episodes(toy, n, seed=10 + i), PAD)
        lam = torch.linspace(0.0, 1.0, n)
        s_single = single.update(batch, lam)
        s_dp = dp.update(batch, lam)
        assert s_dp.keys() == s_single.keys()
        for k in s_single:
            assert s_dp[k] == pytest.approx(s_single[k], rel=1e-5, abs=1e-6), k
    assert s_single["loss/grad_norm"] > RL.grad_clip  # the clip was active
    moved = 0.0
    for p_dp, p, p0 in zip(dp.student.parameters(), single.student.parameters(), toy["student"].parameters()):
        torch.testing.assert_close(p_dp, p, atol=1e-6, rtol=1e-5)
        moved = max(moved, float((p - p0).abs().max()))
    assert moved > 100 * 1e-6  # the parameters moved well beyond the tolerance
    assert_states_close(dp.state_dict(), single.state_dict())  # student, target, AdamW moments, step


def test_state_dict_round_trip(dp, toy):
    single = fresh(toy)
    dp.load_state_dict(single.state_dict())
    batches = [EpisodeBatch.collate(episodes(toy, 6, seed=20 + i), PAD) for i in range(2)]
    lam = torch.full((6,), 0.5)
    dp.update(batches[0], lam)
    saved = dp.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in saved.values())
    assert int(saved["learner.step"]) == 1 and any(k.startswith("optimizer.") for k in saved)
    stats_a = dp.update(batches[1], lam)
    after_a = dp.state_dict()
    dp.load_state_dict(saved)  # back to step 1: the same next update
    assert dp.step == 1
    assert_states_close(dp.state_dict(), saved, atol=0.0)
    for k, v in dp.student.state_dict().items():
        assert torch.equal(v, saved["student." + k]), k
    stats_b = dp.update(batches[1], lam)
    assert stats_a == stats_b
    assert_states_close(dp.state_dict(), after_a, atol=0.0)
    # a single-process learner resumes from the data-parallel checkpoint and vice versa
    single.load_state_dict(saved)
    assert single.update(batches[1], lam) == pytest.approx(stats_a, rel=1e-5, abs=1e-6)


TINY_DP = ["learner.num_workers=2", "learner.worker_num_cpus=0.5", "rl.iterations=2", "eval.baselines=false"]


def test_phase2_through_train_and_resume_with_two_learner_workers(ray_cluster, tmp_path):
    from tests.test_train import TINY
    from tw_rl.metrics import read_metrics
    from tw_rl.train import train

    cfg = load_config(None, TINY + TINY_DP + [f"out_dir={tmp_path}"])
    train(cfg)
    rows = read_metrics(tmp_path, phase="phase2")
    assert len(rows) == 2
    assert all(np.isfinite(r["loss/pcl"]) for r in rows) and rows[-1]["learner/step"] == 4.0
    assert any((tmp_path / "models" / "final").glob("*.safetensors"))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and int(load_checkpoint(ckpt)[0]["learner"]["learner.step"]) == 4
    # --resume goes through DataParallelLearner.load_state_dict: a run stopped after its first checkpoint (the
    # second one, the final student and the report removed) continues at learner step 2 and ends at step 4
    import shutil

    shutil.rmtree(ckpt)
    shutil.rmtree(tmp_path / "models" / "final")
    (tmp_path / "report.json").unlink()
    train(cfg, resume=True)
    rows = read_metrics(tmp_path, phase="phase2")
    assert rows[-1]["step"] == 1 and rows[-1]["learner/step"] == 4.0
    assert int(load_checkpoint(latest_checkpoint(tmp_path))[0]["learner"]["learner.step"]) == 4


def test_unplaceable_learner_workers_fail_fast(ray_cluster, toy):
    with pytest.raises(ValueError, match="need 1 GPUs but Ray has 0"):
        DataParallelLearner(RL, toy["student"], START, PAD, num_workers=1, use_gpu=True)
    with pytest.raises(ValueError, match="need 4 CPUs but Ray has 2"):
        DataParallelLearner(RL, toy["student"], START, PAD, num_workers=4, num_cpus=1.0)


def test_config_refuses_learner_workers_for_other_algorithms():
    from tw_rl.config import ConfigError

    assert load_config(None, ["learner.num_workers=2"]).learner.num_workers == 2
    with pytest.raises(ConfigError, match="algo=pcl only"):
        load_config(None, ["learner.num_workers=2", "algo=gkd"])
