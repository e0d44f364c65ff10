"""The driver end to end on a tiny configuration: phases 0 → 1 → 2 → evaluation, checkpoints and resume."""

import json
import math

import numpy as np
import pytest
import torch

from tw_rl.checkpoint import latest_checkpoint, load_checkpoint
from tw_rl.config import load_config
from tw_rl.manifest import PHASE0_ARTEFACTS, PHASE1_ARTEFACTS, Manifest
from tw_rl.metrics import read_metrics

# Tiny models and one short pass of every phase: shared by the driver tests here and the Multi30K-shaped pipeline test
TINY_PHASES = [
    "teacher.arch.d_model=32", "teacher.arch.d_ff=64", "teacher.arch.num_layers=1",
    "teacher.arch.num_decoder_layers=1", "teacher.arch.num_heads=2", "teacher.arch.d_kv=16",
    "student.arch.d_model=16", "student.arch.d_ff=32", "student.arch.num_heads=2", "student.arch.d_kv=8",
    "pretrain.teacher_epochs=1", "pretrain.student_epochs=1", "pretrain.batch_size=32", "pretrain.warmup_steps=2",
    "phase1.num_examples=48", "phase1.epochs=1", "phase1.batch_size=16",
    "rl.batch_size=8", "rl.replay_capacity=64", "rollout.num_workers=0", "rollout.envs_per_worker=8",
    "eval.max_examples=12", "eval.batch_size=16", "tensorboard=false", "budgets=[0.0,0.2,0.5]",
    "eval.latency_examples=1", "eval.latency_repeats=1", "eval.throughput_batch_size=4", "eval.spec_lenience=[]",
]
TINY = [
    "data.embedded.n_train=240", "data.embedded.n_validation=16", "data.embedded.n_test=24",
    "tokenizer.vocab_size=400", *TINY_PHASES,
    "rl.iterations=3", "rl.updates_per_iteration=2", "checkpoint_every=1", "num_threads=1",
    "student.arch.num_layers=1", "student.arch.num_decoder_layers=1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tw_rl.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + [f"out_dir={out}"])
    report = train(cfg)
    return cfg, out, report


def phase01_copy(out, dest):
    """A new run directory holding the finished run's phase-0 and phase-1 products (cached), not its phase 2."""
    import shutil

    shutil.copytree(out / "models", dest / "models", ignore=shutil.ignore_patterns("final"))
    shutil.copytree(out / "tokenizer", dest / "tokenizer")
    shutil.copy(out / "pretrain.json", dest / "pretrain.json")
    Manifest(out).copy_to(dest, PHASE0_ARTEFACTS + PHASE1_ARTEFACTS)  # the records of what was copied
    return dest


def test_report_schema_and_files(tiny_run):
    cfg, out, report = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    for key in ("student_only", "teacher_only"):
        assert set(report[key]) >= {"bleu", "chrf"}
    for key in ("tw", "phase1_only"):
        assert [r["budget"] for r in report[key]] == cfg.budgets
        for r in report[key]:
            assert set(r) >= {"budget", "bleu", "chrf", "usage_mean", "usage_p95", "calls_per_token"}
            assert 0.0 <= r["usage_mean"] <= r["usage_p95"] + 1e-9 <= 1.0 + 1e-9
    # the calibrated student calls more at the larger budget (b = 0: test_budget_zero_masks_tau_even_where_it_would_win)
    usage = {r["budget"]: r["usage_mean"] for r in report["tw"]}
    assert usage[0.2] <= usage[0.5] and 0.0 < usage[0.5] < 1.0, usage
    validation = {c["budget"]: c["usage"] for c in report["calibration"]["final"]}  # where it was calibrated
    assert all(abs(validation[b] - b) <= 0.1 for b in (0.2, 0.5)), validation
    assert "0.2" in report["gap_closed"] and report["wall_time_s"] > 0
    assert (out / "report.md").read_text().startswith("# tw-rl report")
    assert (out / "config.yaml").is_file()
    for d in ("teacher", "student", "phase1", "final"):
        assert any((out / "models" / d).glob("*.safetensors")), d


def test_budget_zero_masks_tau_even_where_it_would_win(tiny_run):
    """b = 0 never calls because decoding masks <τ> there, whatever the student prefers: with an offset that makes
    <τ> every step's argmax, b = 0.2 calls at every step while b = 0 decodes exactly as the student alone."""
    from tw_rl.api import load
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch

    cfg, out, _ = tiny_run
    model = load(out)
    examples = model.load_examples(cfg.data.test_split, limit=8)
    forced = model.decode(examples, 0.2, tau_bias=100.0)
    assert all(forced.teacher_mask[k, :n].all() for k, n in enumerate(forced.lengths))
    zero = model.decode(examples, 0.0, tau_bias=100.0)
    assert not zero.teacher_mask.any()
    ids, mask = pad_batch([e.student_src[0.0] for e in examples], model.pad_id)
    alone = decode(model.student, ids, mask, max_len=model.max_len, eos_id=model.eos_id, start_id=model.start_id,
                   pad_id=model.pad_id, allow_tau=False)
    assert np.array_equal(zero.tokens, alone.tokens) and np.array_equal(zero.lengths, alone.lengths)


def test_metrics_cover_every_namespace(tiny_run):
    _, out, _ = tiny_run
    rows = read_metrics(out, phase="phase2")
    assert len(rows) == 3
    keys = set().union(*rows)
    for prefix in ("loss/", "rollout/", "lambda/", "timing/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert read_metrics(out, phase="phase1")


def test_phase2_changed_only_the_tau_decision(tiny_run):
    """rl.trainable=tau (the default): phase 2 moved the output layer's <τ> row and nothing else."""
    from tw_rl.models.student import Student

    cfg, out, _ = tiny_run
    assert cfg.rl.trainable == "tau"
    p1, _ = Student.load(out / "models" / "phase1")
    final, _ = Student.load(out / "models" / "final")
    changed = {n for (n, a), (_, b) in zip(p1.named_parameters(), final.named_parameters()) if not torch.equal(a, b)}
    assert changed == {"model.shared.weight"}  # the tied input/output embedding (its first name)
    rows = (final.model.shared.weight - p1.model.shared.weight).abs().sum(-1)
    assert rows[final.tau_id] > 0 and rows[: final.tau_id].max() == 0


def test_resume_after_the_driver_is_killed_ends_with_the_uninterrupted_report(tiny_run, tmp_path):
    """The driver SIGKILLed right after the checkpoint of iteration 2 of 3, then ``--resume``: the same learner,
    multipliers and buffer as the uninterrupted run at iterations 2 and 3, and the same report. (Phases 0–1 are
    the finished run's, cached: their recorded RNG states make phase 2's value head start where it started.)"""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tw_rl.train import train

    cfg, out, report = tiny_run
    killed = phase01_copy(out, tmp_path / "killed")
    overrides = TINY + [f"out_dir={killed}"]
    code = (f"import os, signal\nimport tw_rl.train as t\nfrom tw_rl.config import load_config\n"
            f"save = t.checkpoint\n"
            f"def checkpoint(run, it, *a):\n    path = save(run, it, *a)\n"
            f"    if it == 2: os.kill(os.getpid(), signal.SIGKILL)\n    return path\n"
            f"t.checkpoint = checkpoint\nt.train(load_config(None, {overrides!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert latest_checkpoint(killed).name == "step_000002" and not (killed / "report.json").exists()
    assert_same_state(out / "checkpoints" / "step_000002", latest_checkpoint(killed), 2)
    resumed = train(load_config(None, overrides), resume=True)
    assert_same_state(latest_checkpoint(out), latest_checkpoint(killed), 3)
    assert resumed["config"] == {**report["config"], "out_dir": str(killed)}  # the same config, another directory
    drop = ("timing", "wall_time_s", "latency_ms", "latency_ms_p95", "throughput", "sequences_per_s",
            "tokens_per_s", "latency", "config")

    def stable(x):
        if isinstance(x, dict):
            return {k: stable(v) for k, v in x.items() if not any(d in k for d in drop)}
        return [stable(v) for v in x] if isinstance(x, list) else x

    assert stable(resumed) == stable(report)


def assert_same_state(path_a, path_b, iteration):
    """Same episodes (ids, actions, budgets exactly) and the same learner, multipliers and buffer. Floats agree to
    rounding: the teacher's dynamic batches (and its encoder cache) differ between the runs, which moves
    log-probs in the last bits — exact restoration itself is tested below."""
    a, sa = load_checkpoint(path_a)
    b, sb = load_checkpoint(path_b)
    assert sa["iteration"] == sb["iteration"] == iteration
    for group in ("learner", "multipliers", "replay"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            tol = 0 if not a[group][k].is_floating_point() else 1e-4
            torch.testing.assert_close(a[group][k], b[group][k], atol=tol, rtol=tol, msg=f"{group}/{k}")


def test_restore_gives_back_the_saved_state(tiny_run):
    from tw_rl.budget import BudgetMultipliers
    from tw_rl.models.student import Student
    from tw_rl.algos.pcl import PCLLearner
    from tw_rl.train import restore

    cfg, out, _ = tiny_run
    path = latest_checkpoint(out)
    saved, state = load_checkpoint(path)
    student, _ = Student.load(out / "models" / "phase1")
    learner = PCLLearner(cfg.rl, student, 0, 0)
    mult = BudgetMultipliers(cfg.budgets, cfg.rl.lambda_lr, cfg.rl.lambda_init)
    rng = np.random.default_rng(123)
    it, buffer = restore(path, learner, mult, rng)
    assert it == state["iteration"] == 3
    for k, v in learner.state_dict().items():
        torch.testing.assert_close(v, saved["learner"][k], atol=0, rtol=0)
    torch.testing.assert_close(mult.state_dict()["lambdas"], saved["multipliers"]["lambdas"], atol=0, rtol=0)
    arrays, _ = buffer.state_dict()
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, saved["replay"][k].numpy())


def test_phase2_on_ray_rollout_workers(tiny_run, tmp_path):
    """The demo's path: 2 Ray rollout actors sharing a teacher actor (this module's one ray.init)."""
    from tw_rl.distributed.cluster import shutdown_ray
    from tw_rl.train import train

    _, out, _ = tiny_run
    run = phase01_copy(out, tmp_path / "ray")
    try:
        report = train(load_config(None, TINY + [f"out_dir={run}", "rollout.num_workers=2", "rl.iterations=2",
                                                 "rollout.envs_per_worker=4"]))
    finally:
        shutdown_ray()
    rows = read_metrics(run, phase="phase2")
    assert [r["rollout/episodes"] for r in rows] == [8, 8]  # 2 workers × 4 episodes
    assert all(r["rollout/stale_episodes"] == 0 for r in rows)
    assert len(report["tw"]) == 3


def test_phase1_cache_is_reused_only_with_the_same_settings(tiny_run, tmp_path):
    from tw_rl.metrics import MetricsLogger
    from tw_rl.train import phase0, phase1

    cfg, out, _ = tiny_run
    dest = phase01_copy(out, tmp_path / "run")
    stamp = (dest / "models" / "phase1" / "done.json").stat().st_mtime_ns

    def phase1_of(*overrides):
        c = load_config(None, TINY + [f"out_dir={dest}", *overrides])
        with MetricsLogger(dest, tensorboard=False) as log:
            return phase1(phase0(c, dest), log)

    phase1_of()  # same settings: the cached student, nothing rewritten
    assert (dest / "models" / "phase1" / "done.json").stat().st_mtime_ns == stamp
    before = len(read_metrics(dest, phase="phase1"))
    student = phase1_of("phase1.quota=corpus", "student.tau_head=token",  # changed: phase 1 runs again
                        "phase1.final_lr_fraction=0.1")
    done = json.loads((dest / "models" / "phase1" / "done.json").read_text())
    assert done["settings"]["quota"] == "corpus" and done["settings"]["tau_head"] == "token"
    assert student.tau_head == "token"
    # the learning rate follows the cosine decay: 48 inputs / batch 16 = 3 steps, logged at steps 0 and 2
    lrs = [r["phase1/lr"] for r in read_metrics(dest, phase="phase1")[before:]]
    lr = cfg.phase1.lr
    assert lrs == pytest.approx([lr, lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))])


def test_phase1_refit_rewrites_only_the_gate_and_records_the_fit(tiny_run, tmp_path):
    """``phase1.refit=true``: behaviour cloning as before, then the gate refitted on the student's own states. Against
    the same phase 1 without the refit (same seed), only the <τ> row and the gate bias differ; the fit is logged
    and kept in done.json, and it is part of the phase-1 cache key."""
    from tw_rl.metrics import MetricsLogger
    from tw_rl.train import phase0, phase1

    _, out, _ = tiny_run
    students = {}
    for refit in ("false", "true"):
        dest = phase01_copy(out, tmp_path / f"refit_{refit}")
        c = load_config(None, TINY + [f"out_dir={dest}", "student.tau_head=gate", f"phase1.refit={refit}",
                                      "phase1.refit_examples=40"])
        with MetricsLogger(dest, tensorboard=False) as log:
            students[refit] = phase1(phase0(c, dest), log)
    done = json.loads((tmp_path / "refit_true" / "models" / "phase1" / "done.json").read_text())
    assert done["settings"]["refit"] is True and done["refit"]["refit/coef_conf"] < 0
    assert done["refit"]["refit/positions"] > 40  # every visited state of 40 decoded inputs
    logged = read_metrics(tmp_path / "refit_true", phase="phase1")
    assert any("refit/r2" in r for r in logged)
    a, b = students["false"].state_dict(), students["true"].state_dict()
    tau = students["true"].tau_id
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert "gate_bias" in differ and differ <= {"gate_bias", "model.shared.weight", "model.lm_head.weight",
                                                "model.encoder.embed_tokens.weight",
                                                "model.decoder.embed_tokens.weight"}
    for k in differ - {"gate_bias"}:
        assert torch.equal(a[k][:tau], b[k][:tau]) and not torch.equal(a[k][tau], b[k][tau])


def test_cached_references_share_one_copy_of_each_array(tmp_path):
    """references.npz is read once: every Reference is a view of the same arrays. Re-reading an array per
    reference (NpzFile's z[key]) kept a full copy per reference alive, O(N²) memory: 20,000 examples → OOM."""
    from tw_rl.train import read_references

    lengths = [3, 5, 4, 2]
    off = np.concatenate([[0], np.cumsum(lengths)])
    n = int(off[-1])
    (tmp_path / "models").mkdir()
    np.savez(tmp_path / "models" / "references.npz", offsets=off, tokens=np.arange(n, dtype=np.int64),
             teacher_logprobs=-np.arange(n, dtype=np.float32), kl=np.arange(n, dtype=np.float32),
             terminated=np.array([True, False, True, True]), student_wrong=np.arange(n) % 2 == 0)
    refs = read_references(tmp_path / "models" / "references.npz")
    assert [len(r.tokens) for r in refs] == lengths and [r.terminated for r in refs] == [True, False, True, True]
    assert refs[1].tokens.tolist() == [3, 4, 5, 6, 7] and refs[1].kl.tolist() == [3, 4, 5, 6, 7]
    for field in ("tokens", "teacher_logprobs", "kl", "student_wrong"):
        bases = {id(getattr(r, field).base) for r in refs}
        assert len(bases) == 1, f"{field}: {len(bases)} separate copies for {len(refs)} references"


def _phase2_from_a_gate_phase1(out, dest, *overrides):
    """Phases 0–1 of the finished tiny run (phase 1 redone with the gate head), then phase 2 with ``overrides``.
    Returns the phase-1 state, the final student and phase 2's metric rows."""
    from tw_rl.metrics import MetricsLogger
    from tw_rl.train import phase0, phase1, phase2

    dest = phase01_copy(out, dest)
    c = load_config(None, TINY + [f"out_dir={dest}", "student.tau_head=gate", "rl.call_learner=rollout",
                                  "rl.call_examples=30", *overrides])
    with MetricsLogger(dest, tensorboard=False) as log:
        run = phase0(c, dest)
        p1 = phase1(run, log)
        before = {k: v.clone() for k, v in p1.state_dict().items()}
        final = phase2(run, p1, log, resume=False)
    return before, final, read_metrics(dest, phase="phase2")


def test_phase2_call_learner_fits_only_the_gate_from_rollout_advantages(tiny_run, tmp_path):
    """``rl.call_learner=rollout`` with ``rl.trainable=tau``: no PCL steps; each round fits the gate to Monte-Carlo
    call advantages (logged), and the final student differs from phase 1's only in the <τ> row and the gate bias."""
    from tw_rl.models.student import Student

    before, final, rows = _phase2_from_a_gate_phase1(tiny_run[1], tmp_path / "calls", "rl.call_rounds=2")
    assert len(rows) == 2 and not any(k.startswith("loss/") for r in rows for k in r)  # no PCL loop
    assert all(r["call/coef_conf"] < 0 and r["call/positions"] > 30 for r in rows)
    assert all(0 < r["call/raw_usage_before"] < 1 for r in rows)
    after = final.state_dict()
    tau = final.tau_id
    differ = {k for k in before if not torch.equal(before[k], after[k])}
    assert "gate_bias" in differ and differ <= {"gate_bias", "model.shared.weight", "model.lm_head.weight",
                                                "model.encoder.embed_tokens.weight",
                                                "model.decoder.embed_tokens.weight"}
    for k in differ - {"gate_bias"}:
        assert torch.equal(before[k][:tau], after[k][:tau])
    saved, _ = Student.load(tmp_path / "calls" / "models" / "final")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in after.items())


def test_phase2_call_learner_after_pcl_on_the_whole_student(tiny_run, tmp_path):
    """``rl.trainable=all``: the PCL loop trains the student first, then the call round refits the decision on it
    (logged after the PCL iterations)."""
    before, final, rows = _phase2_from_a_gate_phase1(tiny_run[1], tmp_path / "calls_all", "rl.trainable=all",
                                                     "rl.iterations=2", "rl.lr=1e-3")
    pcl = [r for r in rows if "loss/pcl" in r]
    calls = [r for r in rows if "call/coef_conf" in r]
    assert [r["step"] for r in pcl] == [0, 1] and [r["step"] for r in calls] == [2]
    tau = final.tau_id
    token_rows = final.model.get_output_embeddings().weight[:tau]
    assert not torch.equal(token_rows, before["model.shared.weight"][:tau])  # PCL moved the token policy


# ---- run-directory identity: the manifest, refusals before writing, torn artefacts ----------------------------
def _stamps(d):
    """(mtime, content) of every file of the run directory but the checkpoints: what a refused run must not touch."""
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*"))
            if p.is_file() and "checkpoints" not in p.parts}


def test_stale_phase1_is_recomputed_when_the_data_changes(tiny_run, tmp_path, capsys):
    """The reproduction of issue 16: phases 0–1 cached in a directory, then other data (``task_seed=7``): phase 0
    retrains the tokenizer and both models, and phase 1 — whose record names them as inputs — is recomputed for
    the new vocabulary instead of returning the stale student."""
    from tw_rl.metrics import MetricsLogger
    from tw_rl.models.student import Student
    from tw_rl.train import phase0, phase1

    _, out, _ = tiny_run
    dest = phase01_copy(out, tmp_path / "run")
    old = (dest / "models" / "phase1" / "model.safetensors").read_bytes()
    old_vocab = Student.load(dest / "models" / "phase1")[1].get_vocab()
    c = load_config(None, TINY + [f"out_dir={dest}", "data.embedded.task_seed=7"])
    with MetricsLogger(dest, tensorboard=False) as log:
        run = phase0(c, dest)
        student = phase1(run, log)
    err = capsys.readouterr().err
    assert "recomputing tokenizer: data.embedded.task_seed: 1234 → 7; input data/train changed" in err
    assert "recomputing student: input data/train changed; input tokenizer changed" in err
    assert "recomputing phase1_student: input data/train changed; input student changed; input teacher changed; " \
           "input tokenizer changed" in err
    new_vocab = Student.load(dest / "models" / "phase1")[1].get_vocab()  # built for the new tokenizer
    assert student.tau_id == len(run.tokenizer) and new_vocab != old_vocab
    assert {k: v for k, v in new_vocab.items() if v != student.tau_id} == run.tokenizer.get_vocab()
    assert (dest / "models" / "phase1" / "model.safetensors").read_bytes() != old
    manifest = json.loads((dest / "manifest.json").read_text())["artefacts"]
    assert manifest["phase1_student"]["inputs"]["student"] == manifest["student"]["id"]
    assert manifest["phase1_student"]["settings"]["seed"] == c.seed and manifest["student"]["code"]


def test_train_refuses_a_finished_run_and_a_resume_with_another_config_before_writing(tiny_run, capsys):
    from tw_rl.cli import main

    _, out, _ = tiny_run
    before = _stamps(out)
    assert main(["train", *TINY, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"out_dir='{out}' already holds a run that reached phase 2" in err and "report.json" in err
    assert main(["train", "--resume", *TINY, f"out_dir={out}", "rl.iterations=4", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues only the same config" in err
    assert "rl.iterations: 3 → 4" in err and "seed: 0 → 1" in err
    assert _stamps(out) == before  # config.yaml, metrics.jsonl, pretrain.json, report.json: untouched


@pytest.mark.parametrize("name,damage", [
    ("models/references.npz", "truncate"), ("models/phase1/model.safetensors", "truncate"),
    ("models/phase1/tw_student.json", "garble"), ("tokenizer/tokenizer.json", "delete"),
    ("manifest.json", "garble"),
])
def test_a_torn_cached_artefact_stops_train_before_writing(tiny_run, tmp_path, capsys, name, damage):
    from tw_rl.cli import main

    _, out, _ = tiny_run
    dest = phase01_copy(out, tmp_path / "run")
    f = dest / name
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garble":
        f.write_text('{"tau_id": ')
    else:
        f.unlink()
    before = _stamps(dest)
    assert main(["train", *TINY, f"out_dir={dest}"]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and ("missing" if damage == "delete" else "corrupt") in err, err
    assert _stamps(dest) == before and not (dest / "config.yaml").exists()
