"""Typed config: YAML + overrides merge onto the defaults; every error names the key and what is allowed."""

from functools import reduce
from pathlib import Path

import pytest

from tw_rl.cli import build_parser, main
from tw_rl.config import Config, ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["rl.alpha=0.5", "budgets=[0,0.25]", "data.kind=files", "data.path=/x"])
    assert isinstance(cfg, Config)
    assert cfg.rl.alpha == 0.5 and cfg.budgets == [0.0, 0.25] and cfg.data.path == "/x"
    assert cfg.algo == "pcl" and cfg.seed == 0  # untouched defaults
    y = tmp_path / "c.yaml"
    y.write_text("seed: 7\nrl:\n  window: 3\n")
    cfg = load_config(y, ["rl.window=5"])
    assert cfg.seed == 7 and cfg.rl.window == 5  # command line wins over the file


@pytest.mark.parametrize("override, words", [
    (["rl.alhpa=1"], ["rl.alhpa", "alpha"]),  # unknown key: names it and lists the known keys
    (["nope=1"], ["nope", "out_dir"]),
    (["rl.alpha=abc"], ["rl.alpha", "abc"]),  # wrong type
    (["budgets=[0.2,1.5]"], ["budgets", "1.5", "<= 1.0"]),  # a budget outside [0, 1]
    (["rl.gamma=0"], ["rl.gamma", "> 0.0"]),
    (["data.kind=csv"], ["data.kind", "embedded", "files", "hf"]),
    (["algo=sac"], ["algo", "pcl"]),
    (["rl.alpha"], ["key.sub=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    y = tmp_path / "bad.yaml"
    y.write_text("rollout:\n  num_wrokers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*rollout.num_wrokers.*num_workers"):
        load_config(y)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["rl.iterations=3", "teacher.arch.d_model=64"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parent.parent.glob("launch/configs/*.yaml")):
        load_config(path)


def test_cli_rejects_bad_config_before_running(capsys):
    assert main(["train", "rl.alpha=-1"]) == 2
    assert "rl.alpha" in capsys.readouterr().err


@pytest.mark.parametrize("text,override,words", [
    ("- rl\n- pcl\n", None, ["must be a mapping of keys", "not a list"]),
    ("rl: {iterations: 3\n", None, ["is not valid YAML", "line 2"]),
    (None, "budgets=[0,0.2", ["override 'budgets=[0,0.2'", "is not valid YAML"]),
])
def test_cli_names_a_bad_config_file_or_override(tmp_path, capsys, text, override, words):
    argv = ["train", "--dry-run"]
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        argv += ["--config", str(tmp_path / "c.yaml")]
        words = [str(tmp_path / "c.yaml"), *words]
    assert main(argv + ([override] if override else [])) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "eval", "generate", "pretrain"):
        assert cmd in out
    assert main(["eval"]) == 2  # not yet: says so instead of pretending


def test_refit_needs_the_gate_head():
    with pytest.raises(ConfigError, match=r"phase1.refit=true needs student.tau_head=gate.*'token'"):
        load_config(overrides=["phase1.refit=true", "student.tau_head=token"])
    assert load_config(overrides=["phase1.refit=true", "student.tau_head=gate"]).phase1.refit


def test_call_learner_needs_the_gate_head_and_a_positive_budget():
    with pytest.raises(ConfigError, match=r"rl.call_learner=rollout needs student.tau_head=gate.*'token'"):
        load_config(overrides=["rl.call_learner=rollout", "student.tau_head=token"])
    with pytest.raises(ConfigError, match=r"needs a positive budget; budgets=\[0.0\]"):
        load_config(overrides=["rl.call_learner=rollout", "student.tau_head=gate", "budgets=[0.0]"])
    with pytest.raises(ConfigError, match="rl.call_learner"):
        load_config(overrides=["rl.call_learner=mc"])
    cfg = load_config(overrides=["rl.call_learner=rollout", "student.tau_head=gate"])
    assert (cfg.rl.call_rounds, cfg.rl.call_examples) == (1, 4000)


def test_eval_overrides_may_follow_the_budget_list():
    from tw_rl.cli import overrides_last

    argv = ["eval", "a=1", "--run", "runs/x=y", "--budgets", "0.1", "0.2", "eval.max_examples=3", "--out", "o"]
    args = build_parser().parse_args(overrides_last(argv))
    assert args.budgets == [0.1, 0.2] and args.overrides == ["a=1", "eval.max_examples=3"]
    assert str(args.run) == "runs/x=y" and str(args.out) == "o"
    with pytest.raises(SystemExit):  # what argparse alone does with the same words
        build_parser().parse_args(argv)
    assert overrides_last(["generate", "--run", "r", "x=1"]) == ["generate", "--run", "r", "x=1"]


SMOKE = Path(__file__).resolve().parent.parent / "launch" / "configs" / "smoke.yaml"


def test_every_algorithm_runs_with_algo_alone():
    """``algo=NAME`` alone gives a config the algorithm runs with: what it needs (tw_rl.algos.REQUIRES) is applied
    where the user left it unset — rllib_ppo trains the whole student — and the others keep the defaults."""
    from tw_rl.algos import ALGORITHMS, requirements

    for name in ALGORITHMS:
        for path in (None, SMOKE):
            cfg = load_config(path, [f"algo={name}"])
            assert all(reduce(getattr, k.split("."), cfg) == v for k, (v, _) in requirements(name).items()), name
    assert load_config(SMOKE, ["algo=rllib_ppo"]).rl.trainable == "all"
    assert load_config(SMOKE).rl.trainable == "tau" and load_config(SMOKE, ["algo=gkd"]).rl.trainable == "tau"
    assert load_config(SMOKE, ["algo=rllib_ppo", "rl.trainable=all"]).rl.trainable == "all"  # explicit, agreeing


def test_algorithm_defaults_follow_an_algo_set_in_the_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algo: rllib_ppo\n")
    assert load_config(y).rl.trainable == "all"
    y.write_text("algo: rllib_ppo\nrl:\n  trainable: tau\n")
    with pytest.raises(ConfigError, match=r"algo=rllib_ppo .*rl.trainable='tau' \(from .*c.yaml\) conflicts"):
        load_config(y)


@pytest.mark.parametrize("overrides", [["algo=rllib_ppo", "rl.trainable=tau"], ["rl.trainable=tau", "algo=rllib_ppo"]])
def test_an_explicit_setting_that_conflicts_with_the_algorithm_names_both_keys(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, overrides)
    msg = str(e.value)
    assert "algo=rllib_ppo" in msg and "rl.trainable='tau'" in msg and "set rl.trainable=all or leave it unset" in msg


def test_learner_workers_are_for_pcl_only():
    assert load_config(None, ["learner.num_workers=2"]).learner.num_workers == 2
    with pytest.raises(ConfigError, match=r"algo=gkd .*algo=pcl only.*learner.num_workers=2 .*conflicts"):
        load_config(None, ["algo=gkd", "learner.num_workers=2"])


def test_validate_refuses_a_config_built_against_its_algorithm():
    from tw_rl.config import RLConfig, validate

    with pytest.raises(ConfigError, match="algo=rllib_ppo .*rl.trainable='tau' conflicts"):
        validate(Config(algo="rllib_ppo"))
    validate(Config(algo="rllib_ppo", rl=RLConfig(trainable="all")))


@pytest.mark.parametrize("override,words", [
    ("budgets=[0,0.2,0.2]", ["budgets=", "0.2 twice"]),
    ("budgets=[0,0.124,0.125]", ["0.124 and 0.125", "'teacher budget 12%: '"]),
    ("budget_prompt=budget", ["budget_prompt='budget'", "{pct}"]),
])
def test_budgets_the_student_could_not_tell_apart_are_refused(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_driver_device_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    import torch

    from tw_rl.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="teacher.driver_device='cuda' but this machine has 0 CUDA"):
        check_device("teacher.driver_device", "cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        check_device("teacher.driver_device", "gpu0")
    assert check_device("teacher.driver_device", "cpu").type == "cpu"
    repo = Path(__file__).resolve().parents[1]
    assert load_config(repo / "launch" / "configs" / "wmt19_flan_t5.yaml").teacher.driver_device == "cuda"


def test_the_prompt_length_rule_counts_the_prompts_the_student_reads():
    """One rule (config.prompt_tokens / source_room) over every budget training draws, each prompt written as the
    student's input writes it (budget_prompt rounds: 0.29 is "29%", which int() would truncate to 28)."""
    from tw_rl.config import prompt_tokens, source_room, training_budgets
    from tw_rl.prompt import budget_prompt

    def tok(text, add_special_tokens=False):  # "29" costs 100 tokens, every other character one
        return {"input_ids": [0] * (len(text) + (99 if "29" in text else 0))}

    cfg = load_config(None, ["budgets=[0.0,0.5]", "budget_sampling=continuous", "data.max_src_tokens=200"])
    assert 0.29 in training_budgets(cfg) and budget_prompt(cfg.budget_prompt, 0.29).count("29") == 1
    assert prompt_tokens(cfg, tok) == len(tok(budget_prompt(cfg.budget_prompt, 0.29))["input_ids"])
    assert source_room(cfg, tok) == 200 - prompt_tokens(cfg, tok)
    grid = load_config(None, ["budgets=[0.0,0.5]", "budget_sampling=grid"])
    assert prompt_tokens(grid, tok) == len(budget_prompt(grid.budget_prompt, 0.5))  # no 29 % on the grid


def test_every_dual_usage_choice_names_the_episodes_it_follows():
    from tw_rl.batch import DUAL_USAGE_SOURCES, Episode, Source
    from tw_rl.config import RLConfig
    from tw_rl.train import dual_episodes

    import dataclasses

    import numpy as np

    field = next(f for f in dataclasses.fields(RLConfig) if f.name == "dual_usage")
    assert set(DUAL_USAGE_SOURCES) == set(field.metadata["choices"])

    eps = [Episode(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32),
                   np.zeros(1, np.float32), 0.2, True, source=s) for s in (Source.ONPOLICY, Source.GREEDY_HELDOUT)]
    assert [e.source for e in dual_episodes(eps, "heldout")] == [Source.GREEDY_HELDOUT]
    assert dual_episodes(eps, "all") == eps and dual_episodes(eps, "greedy") == eps  # none greedy: all of them


def test_a_gguf_file_without_its_directory_is_refused(tmp_path):
    from tw_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"teacher.gguf_file='m.gguf' names a file inside teacher.name_or_path"):
        load_config(None, [f"out_dir={tmp_path}", "teacher.gguf_file=m.gguf"])
    cfg = load_config(None, [f"out_dir={tmp_path}", "teacher.name_or_path=/models", "teacher.gguf_file=m.gguf",
                             "student.arch.model_type=llama"])
    assert cfg.teacher.gguf_file == "m.gguf" and cfg.student.arch.model_type == "llama"
