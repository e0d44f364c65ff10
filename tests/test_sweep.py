"""``tw-rl sweep``: grid parsing, what trials may share, and a 2-trial Ray Tune sweep on the tiny config."""

from __future__ import annotations

import json

from tests.test_algos_train import FAST
from tw_rl.sweep import combinations, parse_grid, share_level, table_markdown


def test_grid_parsing_keeps_list_values_whole():
    fixed, axes = parse_grid(["algo=pcl,gkd,ppo", "budgets=[0,0.2]", "rl.on_policy_fraction=0.5,1.0", "seed=3"])
    assert fixed == ["budgets=[0,0.2]", "seed=3"]
    assert axes == {"algo": ["pcl", "gkd", "ppo"], "rl.on_policy_fraction": ["0.5", "1.0"]}
    combos = combinations(axes)
    assert len(combos) == 6 and combos[0] == ["algo=pcl", "rl.on_policy_fraction=0.5"]
    assert combinations({}) == [[]]


def test_share_level_follows_what_the_grid_changes():
    assert share_level({"algo": [], "phase1.enabled": [], "student.use_delta": []}) == "phase1"
    assert share_level({"phase1.lr": []}) == "phase0"
    assert share_level({"student.arch.d_model": []}) == "none"
    for key in ("student.init_layers", "task_prompt", "teacher.gguf_file", "student.chat_template"):  # phase 0 keys
        assert share_level({key: []}) == "none", key
    assert share_level({"seed": []}) == "none"


def test_sweep_runs_two_trials_and_writes_one_table(tmp_path):
    from tw_rl.distributed.cluster import shutdown_ray
    from tw_rl.sweep import sweep

    out = tmp_path / "sweep"
    try:
        table = sweep(None, FAST + ["algo=pcl,gkd"], out, cpus_per_trial=1)
    finally:
        shutdown_ray()
    assert [r["run"] for r in table["rows"]] == ["algo=pcl", "algo=gkd"]
    for r in table["rows"]:
        assert set(r["budgets"]) == {"0", "0.2", "0.5"}, r
        usage = {b: r["budgets"][b]["usage"] for b in ("0.2", "0.5")}  # each trial's calibrated student calls more
        assert usage["0.2"] <= usage["0.5"] and 0.0 < usage["0.5"] < 1.0, r  # at the larger budget
    assert (out / "trials" / "algo=gkd" / "report.json").is_file()
    assert "algo: gkd" in (out / "trials" / "algo=gkd" / "config.yaml").read_text()
    assert (out / "base" / "models" / "phase1" / "done.json").is_file()  # phases 0-1 ran once, in base
    from tw_rl.metrics import read_metrics

    assert not read_metrics(out / "trials" / "algo=pcl", phase="phase1")  # the trial reused them (copied)
    md = (out / "sweep.md").read_text()
    assert "| algo=gkd |" in md and "b=0.2 BLEU / usage" in md
    assert json.loads((out / "sweep.json").read_text()) == table
    assert table_markdown(table) in md
