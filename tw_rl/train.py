"""The driver: phase 0 → phase 1 → phase 2 → evaluation, one function per phase (SPEC §6).

Phase 2 reads like the algorithm: sample (rollout workers, teacher calls) → score (teacher log-probs as
rewards) → buffer → update (PCL with the budget Lagrangian) → sync (one weight broadcast per iteration).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tw_rl.envs.token_mdp import Example
from tw_rl.registry import get_algorithm
from tw_rl.algos.learner import COST_BATCH, TEACHER_SRC, Learner
from tw_rl.batch import DUAL_USAGE_SOURCES, Episode, EpisodeBatch, Source
from tw_rl.budget import BudgetMultipliers
from tw_rl.checkpoint import CONFIG_FILE, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tw_rl.config import (Config, ConfigError, check_device, load_config, save_config, source_room, to_dict,
                           to_yaml, training_budgets)
from tw_rl.data import load_split
from tw_rl.data.validate import check_token_lengths
from tw_rl.decoding import decode
from tw_rl.evaluation.driver import evaluate
from tw_rl.evaluation.report import write_outputs, write_report
from tw_rl.manifest import Manifest, changes, flatten, pairs_digest, say_recomputing
from tw_rl.examples import make_examples, pad_batch
from tw_rl.metrics import MetricsLogger, Timer
from tw_rl.models.factory import input_template, load_model, role_family
from tw_rl.models.family import CAUSAL, family_of, start_token_id
from tw_rl.prompt import budget_prompt
from tw_rl.models.student import Student
from tw_rl.optim import AddedRateAdamW
from tw_rl.oracle import Reference, bc_loss, build_references, corpus_thresholds, demo_episode, oracle_episode
from tw_rl.pretrain import pretrain
from tw_rl.refit import refit_gate, write_fit
from tw_rl.replay import ReplayBuffer
from tw_rl.rundir import ArtefactError, RunDir, atomic_dir, atomic_file, atomic_write
from tw_rl.teacher import Teacher


@dataclass
class Run:
    """What every phase needs: paths, tokenizer, teacher, examples."""

    cfg: Config
    dir: Path
    tokenizer: object
    teacher: Teacher
    teacher_dir: str
    base_student_dir: str
    train: list[Example]
    test: list[Example]
    eos_id: int
    pad_id: int
    start_id: int
    validation: list[Example] = field(default_factory=list)  # held-out inputs (the multipliers' usage, rl.dual_usage)
    inputs: dict[str, str] = field(default_factory=dict)  # manifest ids of the phase-0 artefacts, the data's hash

    @property
    def max_len(self) -> int:
        return self.cfg.data.max_tgt_tokens

    @property
    def paths(self) -> RunDir:
        return RunDir(self.dir)


# ------------------------------------------------------------------------------------------------------------------
def train(cfg: Config, resume: bool = False) -> dict:
    """Run every enabled phase and the evaluation; returns the report (also in ``out_dir/report.json``).

    Before anything is written: a run directory that already holds a started phase 2 or a finished run is refused
    without ``resume``, and with it unless the config is the same (:func:`check_run_dir`); every data split is
    opened and checked (:func:`check_data`). ``config.yaml`` is written only then."""
    t0 = time.perf_counter()
    check_device("teacher.driver_device", cfg.teacher.driver_device)  # before anything is written
    run_dir = Path(cfg.out_dir)
    check_run_dir(cfg, run_dir, resume)
    _seed_everything(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    check_data(cfg, run_dir)
    save_config(cfg, RunDir(run_dir).config)
    with MetricsLogger(run_dir, tensorboard=cfg.tensorboard) as log:
        with Timer(times := {}, "phase0"):
            run = phase0(cfg, run_dir)
        with Timer(times, "phase1"):
            student = phase1(run, log)
        phase1_student = Student.load(run.paths.model("phase1"))[0] if cfg.rl.enabled else student
        with Timer(times, "phase2"):
            student = phase2(run, student, log, resume)
        calibration = None
        if cfg.calibration.enabled:
            with Timer(times, "calibration"):  # one <τ> offset per budget, fitted on validation (calibration.py)
                calibration = calibrate(run, student, phase1_student)
        with Timer(times, "eval"):
            report = evaluate_run(run, student, phase1_student)
        if calibration is not None:
            report["calibration"] = calibration
        report["timing"] = {k: round(v, 1) for k, v in times.items()}
        report["wall_time_s"] = round(time.perf_counter() - t0, 1)
        report.update(provenance(cfg))
        write_report(run_dir, report)
        log.log(0, {f"eval/bleu_{r['budget']:g}": r["bleu"] for r in report["tw"]}, phase="eval")
    return report


def check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
    """Refuse, before anything is written, a run that would overwrite another: without ``resume``, a directory
    holding phase-2 checkpoints, a final student or a report (phase-0/1 caches alone are reused, docs/design.md);
    with ``resume``, a config that differs from the run's ``config.yaml`` (or its newest checkpoint's) in any
    key but ``out_dir``. Raises :class:`ConfigError` naming what is there or the keys that differ; a corrupt
    manifest is an :class:`~tw_rl.manifest.ArtefactError`."""
    manifest = Manifest(run_dir)  # a corrupt manifest.json stops the run here
    paths = RunDir(run_dir)
    found = [str(p) for p in (latest_checkpoint(run_dir), paths.model("final"), paths.report_json)
             if p is not None and p.exists()]
    if found and not resume:
        raise ConfigError(f"out_dir={str(run_dir)!r} already holds a run that reached phase 2 ({', '.join(found)}); "
                          f"tw-rl train does not write into it: choose a new out_dir, or pass --resume to continue "
                          f"it with the same config")
    manifest.verify_present()  # a torn or truncated cached artefact stops the run before anything is written
    if not resume:
        return
    ckpt = latest_checkpoint(run_dir)
    now = flatten(dataclasses.asdict(cfg))
    for path in (paths.config, ckpt / CONFIG_FILE if ckpt is not None else None):
        if path is None or not path.is_file():
            continue
        before = flatten(dataclasses.asdict(load_config(path)))
        diff = [d for d in changes(before, now) if not d.startswith("out_dir:")]
        if diff:
            raise ConfigError(f"--resume continues only the same config; {path} differs: {'; '.join(diff)}. "
                              f"Resume without these overrides, or start a new run in a new out_dir")


def checked_pairs(cfg: Config, tok, name: str, limit: int | None) -> list:
    """Split ``name`` (its first ``limit`` pairs) within the token limits (``data.on_error``), the budget prompt
    counted: the one length rule of every phase (tw_rl/data/validate.py)."""
    pairs = load_split(cfg.data, name)[:limit]
    return check_token_lengths(pairs, tok, source_room(cfg, tok), cfg.data.max_tgt_tokens,
                               cfg.data.on_error)


def _split_limits(cfg: Config) -> dict[str, int | None]:
    return {cfg.data.train_split: cfg.phase1.num_examples, cfg.data.validation_split: None,
            cfg.data.test_split: cfg.eval.max_examples}


def check_data(cfg: Config, run_dir: Path) -> None:
    """Open every split the run reads (pair alignment, gzip integrity, UTF-8: tw_rl/data/files.py) and check its
    token lengths with the tokenizer of phase 0 (trained now if it is not cached; it is phase 0's first
    artefact): a :class:`~tw_rl.data.DataError` names the file and line before any model is trained."""
    from tw_rl.pretrain import tokenizer as phase0_tokenizer

    for name in (cfg.data.train_split, cfg.data.validation_split, cfg.data.test_split):
        load_split(cfg.data, name)
    tok = phase0_tokenizer(cfg, run_dir)
    for name, limit in _split_limits(cfg).items():
        checked_pairs(cfg, tok, name, limit)
    sample = (budget_prompt(cfg.budget_prompt, max(cfg.budgets)) + cfg.task_prompt
              + load_split(cfg.data, cfg.data.train_split)[0].source)
    for role in ("teacher", "student"):  # a chat template that drops the user message: refused before training
        input_template(cfg, role, tok).check_keeps(sample)


# ------------------------------------------------------------------------------------------------------------------
def phase0(cfg: Config, run_dir: Path) -> Run:
    """Phase 0 (cached in the run directory): tokenizer, teacher and student; then the tokenized splits."""
    summary = pretrain(cfg, run_dir)
    _phase_rng(RunDir(run_dir).phase0_rng, computed=any(summary[r].get("trained") and not summary[r].get("cached")
                                                            for r in ("teacher", "student")))
    teacher_dir = cfg.teacher.name_or_path or summary["teacher"]["dir"]
    student_dir = cfg.student.name_or_path or summary["student"]["dir"]
    device = check_device("teacher.driver_device", cfg.teacher.driver_device)
    teacher_model, tok = load_model(teacher_dir, trust_remote_code=cfg.teacher.trust_remote_code,
                                    gguf_file=cfg.teacher.gguf_file)
    sampled = sorted(set(training_budgets(cfg)))  # training inputs carry a prompt for every budget training draws
    limits = _split_limits(cfg)
    templates = (input_template(cfg, "teacher", tok, family_of(teacher_model)), input_template(cfg, "student", tok))

    def split(name: str, budgets: list[float] = cfg.budgets) -> list[Example]:
        return make_examples(checked_pairs(cfg, tok, name, limits[name]), tok, budgets, cfg.budget_prompt,
                             *templates, task_prompt=cfg.task_prompt)

    train_pairs = checked_pairs(cfg, tok, cfg.data.train_split, limits[cfg.data.train_split])
    return Run(cfg=cfg, dir=run_dir, tokenizer=tok,
               teacher=Teacher(teacher_model, vocab_size=len(tok), pad_id=tok.pad_token_id,
                               start_id=start_token_id(teacher_model, tok.pad_token_id), device=device,
                               stack_caches=cfg.teacher.stack_caches,
                               reuse_prefixes=cfg.teacher.reuse_prefixes),
               teacher_dir=str(teacher_dir), base_student_dir=str(student_dir),
               train=make_examples(train_pairs, tok, sampled, cfg.budget_prompt, *templates,
                                   task_prompt=cfg.task_prompt),
               test=split(cfg.data.test_split),
               eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               start_id=student_start_id(cfg, str(student_dir), tok.pad_token_id),
               validation=(split(cfg.data.validation_split) if cfg.rl.enabled and cfg.rl.dual_usage == "heldout"
                           else []),
               inputs={**summary["artefact_ids"], "data/train": pairs_digest(train_pairs)})


PHASE1_RNG = "rng_after.json"


def _phase_rng(path: Path, computed: bool) -> None:
    """The global RNG states (Python, numpy, torch) after a phase: saved when the phase was computed, restored when
    it was reused from the cache — so that what follows (phase 2's value head is initialised from torch's global
    RNG) is the same whether the run computed the phase or a resumed run found it cached."""
    if computed:
        atomic_write(path, json.dumps(rng_state()))
    elif path.is_file():
        try:
            set_rng_state(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ArtefactError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it with the phase it "
                                f"belongs to to recompute that phase") from None


# ------------------------------------------------------------------------------------------------------------------
def references(run: Run) -> list[Reference]:
    """Teacher greedy paths of the training inputs with per-position KL to the phase-0 student (cached in
    ``models/references.npz``, recorded in the manifest with the phase-0 models and the training data)."""
    path = run.paths.references
    manifest = Manifest(run.dir)
    settings = {"data.max_tgt_tokens": run.max_len, "phase1.num_examples": run.cfg.phase1.num_examples}
    inputs = phase0_inputs(run)
    reuse, why = manifest.reuse("references", path, settings, inputs)
    if reuse:
        return read_references(path)
    say_recomputing("references", why)
    base = load_base_student(run)[0]
    refs = build_references(run.train, run.teacher, base.eval(), run.max_len, run.eos_id,
                            batch_size=run.cfg.eval.batch_size, pad_id=run.pad_id, start_id=run.start_id)
    off = np.concatenate([[0], np.cumsum([len(r.tokens) for r in refs])])
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a kill never leaves a torn references.npz
        np.savez(f, offsets=off, tokens=np.concatenate([r.tokens for r in refs]),
                 teacher_logprobs=np.concatenate([r.teacher_logprobs for r in refs]),
                 kl=np.concatenate([r.kl for r in refs]), terminated=np.array([r.terminated for r in refs]),
                 student_wrong=np.concatenate([r.student_wrong for r in refs]))
    manifest.record("references", path, settings, inputs)
    return refs


def phase0_inputs(run: Run) -> dict:
    """The manifest ids of what phases 1 and 2's artefacts are built from: phase 0's tokenizer and models and the
    training data."""
    return {k: run.inputs.get(k) for k in ("tokenizer", "teacher", "student", "data/train")}


def read_references(path: Path) -> list[Reference]:
    """The references of ``references.npz``; each array read once: NpzFile re-reads a whole array on every z[key],
    and each slice below would keep its own full copy alive (O(N²) memory in the number of references)."""
    try:
        with np.load(path) as f:
            z = dict(f)
        off = z["offsets"]
        return [Reference(z["tokens"][a:b], z["teacher_logprobs"][a:b], z["kl"][a:b], bool(t),
                          z["student_wrong"][a:b]) for a, b, t in zip(off[:-1], off[1:], z["terminated"])]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ArtefactError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it to recompute "
                            f"the references") from None


def load_base_student(run: Run):
    """The phase-0 student ``(model, tokenizer)`` (a given model, GGUF file included, or phase 0's)."""
    cfg = run.cfg.student
    return load_model(run.base_student_dir, trust_remote_code=cfg.trust_remote_code,
                      gguf_file=cfg.gguf_file)


def student_start_id(cfg: Config, student_dir: str, pad_id: int) -> int:
    """The phase-0 student's decoder start (a causal student has none: ``pad_id`` stands in, never read)."""
    if role_family(cfg, "student") == CAUSAL:
        return pad_id
    from transformers import AutoConfig

    return start_token_id(AutoConfig.from_pretrained(student_dir, trust_remote_code=cfg.student.trust_remote_code),
                          pad_id)


def new_student(run: Run) -> Student:
    base, tok = load_base_student(run)
    return Student.from_base(base, tok, use_delta=run.cfg.student.use_delta, tau_head=run.cfg.student.tau_head)


def phase1(run: Run, log: MetricsLogger) -> Student:
    """Behaviour cloning on KL-oracle traces (SPEC §6), then (``phase1.refit``) the gate refitted on the student's
    own states (tw_rl/refit.py); the result is saved to ``models/phase1``."""
    cfg, out = run.cfg.phase1, run.paths.model("phase1")
    # cached: redone when its settings, δ, the <τ> head (ablations), the phase-0 models or the training data changed
    settings = {**dataclasses.asdict(cfg), "use_delta": run.cfg.student.use_delta,
                "tau_head": run.cfg.student.tau_head, "budgets": list(run.cfg.budgets),
                "budget_prompt": run.cfg.budget_prompt, "budget_sampling": run.cfg.budget_sampling}
    recorded = {"phase1": settings, "seed": run.cfg.seed, "data.max_src_tokens": run.cfg.data.max_src_tokens,
                "data.max_tgt_tokens": run.cfg.data.max_tgt_tokens, "eval.batch_size": run.cfg.eval.batch_size}
    inputs = phase0_inputs(run)
    manifest = Manifest(run.dir)
    reuse, why = manifest.reuse("phase1_student", out, recorded, inputs)
    if reuse:
        cached = Student.load(out)[0]
        _phase_rng(out / PHASE1_RNG, computed=False)
        return cached
    say_recomputing("phase1_student", why)
    student = new_student(run)
    info: dict = {"steps": behaviour_cloning(run, student, log) if cfg.enabled else 0, "enabled": cfg.enabled,
                  "settings": settings}  # disabled (ablation): later phases start from the phase-0 student + <τ>
    student.eval()
    if cfg.refit:  # one DAgger step on the <τ> decision (tw_rl/refit.py)
        fit = refit_gate(student, run.teacher, run.train[:cfg.refit_examples], run.cfg.budgets, l2=cfg.refit_l2,
                         max_len=run.max_len, eos_id=run.eos_id, pad_id=run.pad_id, start_id=run.start_id,
                         batch_size=run.cfg.eval.batch_size)
        info["refit"] = fit.as_dict()
        log.log(info["steps"], fit.as_dict(), phase="phase1")
    with atomic_dir(out) as tmp:  # a kill leaves the old student or none, never half of one
        student.save(tmp, run.tokenizer)
        (tmp / "done.json").write_text(json.dumps(info))
        _phase_rng(tmp / PHASE1_RNG, computed=True)
    manifest.record("phase1_student", out, recorded, inputs)
    return student


def behaviour_cloning(run: Run, student: Student, log: MetricsLogger) -> int:
    """SPEC §6: cross-entropy over ``V ∪ {<τ>}`` on oracle traces plus token-level distillation; returns the steps."""
    cfg = run.cfg.phase1
    refs = references(run)
    thresholds = oracle_thresholds(run, refs)
    rng = np.random.default_rng(run.cfg.seed)
    steps = int(cfg.epochs * len(refs) / cfg.batch_size)
    opt = AddedRateAdamW(student, cfg.lr, cfg.added_lr, steps, cfg.final_lr_fraction)
    student.train()
    for step in tqdm(range(steps), desc="phase 1 (oracle BC)", unit="step"):
        idx = rng.integers(len(refs), size=cfg.batch_size)
        budgets = rng.choice(training_budgets(run.cfg), size=cfg.batch_size)
        eps = [oracle_episode(run.train[i], refs[i], float(b), student.tau_id, cfg.oracle, thresholds.get(float(b)))
               for i, b in zip(idx, budgets)]
        batch = EpisodeBatch.collate(eps, run.pad_id)
        dec, dec_tm = batch.decoder_inputs(run.start_id, run.pad_id)
        logits = student(batch.src_ids, batch.src_mask, dec[:, :-1], dec_tm[:, :-1])
        t_logp = run.teacher.distributions([run.train[i].teacher_src for i in idx],
                                           [refs[i].tokens.tolist() for i in idx])
        loss, stats = bc_loss(logits, batch.actions, batch.mask, batch.teacher_mask, t_logp, cfg.distill_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log.log(step, {**stats, "phase1/lr": opt.lr}, phase="phase1")
    return steps


# ------------------------------------------------------------------------------------------------------------------
def phase2(run: Run, student: Student, log: MetricsLogger, resume: bool) -> Student:
    """Reinforcement learning (SPEC §6): the RL loop (PCL by default), then, with ``rl.call_learner=rollout``, the
    call learner's rounds on the ``<τ>`` decision; with ``rl.trainable=tau`` the RL loop would train only that
    decision, so the call rounds replace it. Saves the student to ``models/final``."""
    cfg = run.cfg
    if not cfg.rl.enabled:
        return student
    pcl_loop = not (cfg.rl.call_learner == "rollout" and cfg.rl.trainable == "tau")
    value = None
    if pcl_loop:
        student, value = rl_loop(run, student, log, resume)
    if cfg.rl.call_learner == "rollout":
        student = call_rounds(run, student, log, first_step=cfg.rl.iterations if pcl_loop else 0)
    student.eval()
    student.tau_bias = {}  # offsets fitted to the phase-1 student do not carry over (calibrate() refits)
    final = run.paths.model("final")
    with atomic_dir(final) as tmp:  # a kill leaves no final student, never half of one
        student.save(tmp, run.tokenizer)
        if value is not None:  # saved beside the final student (deployment never reads it)
            value.save(tmp)
    manifest = Manifest(run.dir)
    manifest.record("final_student", final, final_settings(cfg), {"phase1_student": manifest.id("phase1_student")})
    return student


def final_settings(cfg: Config) -> dict:
    """What the final student records: the whole config but where the run is written and how it is evaluated."""
    d = dataclasses.asdict(cfg)
    for k in ("out_dir", "eval", "calibration", "tensorboard"):
        d.pop(k, None)
    return d


def call_rounds(run: Run, student: Student, log: MetricsLogger, first_step: int = 0) -> Student:
    """Phase 2's call learner (``rl.call_learner=rollout``; docs/design.md): ``rl.call_rounds`` rounds of policy
    iteration on the ``<τ>`` decision. In each, the rollout workers decode ``rl.call_examples`` training inputs
    greedily with the current student and measure at every visited state the Monte-Carlo advantage of a call under
    SPEC §3's reward, both branches scored by the teacher server; the gate is fitted to it (tw_rl/refit.py) and the
    new weights go to the workers with the next round. Metrics are logged at steps ``first_step + round``."""
    from tw_rl.distributed.cluster import init_ray  # Ray lives at the edge
    from tw_rl.distributed.rollout import RolloutGroup

    cfg = run.cfg
    levels = [b for b in cfg.budgets if b > 0]
    rng = np.random.default_rng(cfg.seed + 2)
    if cfg.rollout.num_workers > 0:
        init_ray()
    student.eval()
    group = RolloutGroup.from_config(cfg, run.paths.model("phase1"), run.teacher_dir, run.train, run.teacher,
                                     eos_id=run.eos_id)
    try:
        for r in tqdm(range(cfg.rl.call_rounds), desc="phase 2 (call learner)", unit="round"):
            times: dict[str, float] = {}
            idx = rng.choice(len(run.train), size=min(cfg.rl.call_examples, len(run.train)), replace=False)
            with Timer(times, "call_rollouts"):  # greedy paths, one flipped path per state, teacher-scored
                states = group.call_states(student.state_dict(), version=r, indices=idx.tolist())
            fit = write_fit(student, states, levels, cfg.rl.call_l2, setting="rl.call_learner=rollout",
                            examples_key="rl.call_examples")
            adv = states.target.double()
            log.log(first_step + r, {**{k.replace("refit/", "call/"): v for k, v in fit.as_dict().items()},
                                     "call/advantage_mean": float(adv.mean()),
                                     "call/advantage_positive": float((adv > 0).double().mean()), **times},
                    phase="phase2")
    finally:
        group.close()
    return student


def rl_loop(run: Run, student: Student, log: MetricsLogger, resume: bool) -> tuple[Student, object]:
    """PCL with budget multipliers on a replay buffer mixing demonstrations and on-policy rollouts (SPEC §4–6).
    Returns the student and the learner's value head (None without ``rl.value=learned``)."""
    from tw_rl.distributed.cluster import init_ray  # Ray lives at the edge
    from tw_rl.distributed.rollout import RolloutGroup

    cfg = run.cfg
    student.set_trainable(cfg.rl.trainable)
    learner = make_learner(run, student)
    if learner.owns_loop:  # an algorithm with its own sampling loop (RLlib): same inputs and output
        if cfg.rl.trainable != "all":
            raise ValueError(f"rl.trainable={cfg.rl.trainable!r} is not supported by algo={cfg.algo!r} (its own "
                             "training loop trains the whole student); use rl.trainable=all")
        return learner.run(run, log, resume), None
    rng = np.random.default_rng(cfg.seed + 1)
    multipliers = BudgetMultipliers(cfg.budgets, cfg.rl.lambda_lr, cfg.rl.lambda_init,
                                    equality=cfg.rl.budget_constraint == "equal")
    buffer = ReplayBuffer(cfg.rl.replay_capacity, cfg.rl.on_policy_fraction)
    if cfg.rl.demonstrations:  # false: on-policy only (ablation)
        buffer.add_demos(demonstrations(run, references(run), student.tau_id, rng))
    start = 0
    held = run.validation or run.train[:500]  # the inputs whose usage the dual's control variates average over
    held_prompts = start_prompts(held, cfg.budgets)
    reference = None
    if cfg.rl.dual_estimator == "reference":  # the phase-1 student's usage per held-out input (before any resume)
        reference = ReferenceUsage.decode(run, student, held, cfg.budgets, cfg.eval.batch_size)
    if resume and (ckpt := latest_checkpoint(run.dir)) is not None:
        start, buffer = restore(ckpt, learner, multipliers, rng)
        print(f"resumed from {ckpt} at iteration {start}")
    if cfg.rollout.num_workers > 0:
        init_ray()
    group = RolloutGroup.from_config(cfg, run.paths.model("phase1"), run.teacher_dir, run.train, run.teacher,
                                     eos_id=run.eos_id, greedy_examples=run.validation or None)
    critic = learner.value is not None  # rl.value=learned: V_φ and V_C (tw_rl/models/value.py)
    prompts = held_prompts if critic else None
    recent: list[Episode] = []  # this iteration's greedy on-policy episodes: V_C's training data
    try:
        for it in tqdm(range(start, cfg.rl.iterations), desc=f"phase 2 ({cfg.algo})", unit="iter"):
            times: dict[str, float] = {}
            with Timer(times, "rollout"):  # sample: on-policy episodes, <τ> answered, rewards scored
                episodes, rstats = group.sample(learner.student.state_dict(), version=it, seed=it)
            buffer.add([e for e in episodes if e.source != Source.GREEDY_HELDOUT])  # buffer (held-out inputs: never)
            dual = [e for e in dual_episodes(episodes, cfg.rl.dual_usage) if e.budget in multipliers]
            dual_usage, dual_stats = usage_by_budget(dual), {}
            if critic and it == 0:  # warm start: V_φ on MC soft returns, V_C on usage, before the first update
                warm = EpisodeBatch.collate([e for e in episodes if e.source == Source.ONPOLICY] or episodes, run.pad_id)
                dual_stats.update(learner.warm_start(warm, multipliers.for_episodes(warm.budgets),
                                                     EpisodeBatch.collate(dual, run.pad_id) if dual else None,
                                                     cfg.rl.value_warmup_steps))
            if critic and cfg.rl.dual_estimator in ("auto", "cost_value"):  # V_C(s_0) as a control variate (SPEC §5)
                dual_usage, cv = cost_value_usage(learner, dual, prompts)
                dual_stats.update(cv)
            elif reference is not None:  # the phase-1 usage of the same inputs as the control variate
                dual_usage, cv = control_variate_usage(dual, reference.predict, reference.pool_mean)
                dual_stats.update(cv)
            multipliers.update(dual_usage)  # dual ascent (SPEC §5)
            recent = dual  # V_C trains on this iteration's greedy episodes (so that --resume replays it exactly)
            with Timer(times, "update"):  # update: PCL steps on the mixed buffer (and V_C on recent greedy episodes)
                for u in range(cfg.rl.updates_per_iteration):
                    sampled = buffer.sample(cfg.rl.batch_size, rng)
                    batch = EpisodeBatch.collate(sampled, run.pad_id)
                    stats = learner.update(batch, multipliers.for_episodes(batch.budgets),
                                           **learner_inputs(learner, sampled, recent, cfg.rl.cost_batch_size, rng,
                                                            run.pad_id))
            log.log(it, {**stats, **rstats.as_metrics(), **multipliers.as_metrics(), **times, **dual_stats,
                         **{f"rollout/usage_{b:g}": u for b, u in usage_by_budget(episodes).items()},
                         **{f"dual/usage_{b:g}": u for b, u in dual_usage.items()},
                         "replay/demos": buffer.num_demos,
                         "replay/batch_onpolicy": float((batch.policy_version >= 0).float().mean())},
                    phase="phase2")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.rl.iterations:
                checkpoint(run, it + 1, learner, multipliers, buffer, rng)
    finally:
        group.close()
        learner.close()
    return learner.student, (learner.value if critic else None)


def make_learner(run: Run, student: Student) -> Learner:
    """The phase-2 learner of ``algo`` (tw_rl/algos registry), or its data-parallel form with
    ``learner.num_workers > 0`` (DDP replicas in Ray actors; the config allows that only for the algorithms in
    ``tw_rl.algos.DATA_PARALLEL``)."""
    cfg = run.cfg
    if cfg.learner.num_workers > 0:
        from tw_rl.distributed.cluster import init_ray  # Ray lives at the edge
        from tw_rl.distributed.data_parallel import make_learner as make_parallel_learner

        init_ray()
        return make_parallel_learner(cfg, student, run.start_id, run.pad_id)
    return get_algorithm(cfg.algo).make_learner(cfg, student, run.start_id, run.pad_id, teacher=run.teacher)


def learner_inputs(learner: Learner, sampled: list[Episode], recent: list[Episode], cost_batch_size: int,
                   rng: np.random.Generator, pad_id: int) -> dict:
    """The extra inputs ``learner.update`` declares (``Learner.inputs``) for the batch of ``sampled`` episodes:
    ``cost_batch``, up to ``cost_batch_size`` of this iteration's greedy episodes (``recent``; none: not passed),
    and ``teacher_src``, each sampled episode's teacher input."""
    out: dict = {}
    if COST_BATCH in learner.inputs and recent:
        pick = rng.choice(len(recent), size=min(cost_batch_size, len(recent)), replace=False)
        out[COST_BATCH] = EpisodeBatch.collate([recent[i] for i in pick], pad_id)
    if TEACHER_SRC in learner.inputs:
        missing = [i for i, e in enumerate(sampled) if e.teacher_src is None]
        if missing:
            raise ValueError(f"the learner needs each episode's teacher input, and {len(missing)} sampled episodes "
                             f"carry none (Episode.teacher_src; first: {missing[0]})")
        out[TEACHER_SRC] = [e.teacher_src.tolist() for e in sampled]
    return out


def start_prompts(examples: list[Example], budgets: list[float]) -> dict[float, list[list[int]]]:
    """The student's input ids of ``examples`` at every grid level: the prompts whose ``V_C(s_0)`` average
    estimates each level's usage (:func:`cost_value_usage`)."""
    return {float(b): [e.student_src[b] for e in examples if b in e.student_src] for b in budgets}


def control_variate_usage(episodes: list[Episode], predict, pool_mean
                          ) -> tuple[dict[float, float], dict[str, float]]:
    """Each level's usage with a control variate: ``û_b = pool_mean(b) + mean_{episodes i at b} (u_i − c_i)`` with
    ``c_i = predict([src_i], b)`` a prediction of episode ``i``'s usage from its input and ``pool_mean(b)`` the mean
    prediction over every held-out prompt — unbiased for the mean usage over the prompts (episodes drawn uniformly
    from them) whatever the predictor is, and of lower variance the better it predicts ``u``. ``predict(src, b)``
    returns an array. Returns ``{b: û_b}`` (levels with episodes) and ``dual/*`` stats: the per-episode variance
    of ``u`` and of ``u − c`` and their ratio (the variance reduction of the estimate)."""
    est, resid, raw = {}, [], []
    by: dict[float, list[Episode]] = {}
    for e in episodes:
        by.setdefault(e.budget, []).append(e)
    for b, eps in sorted(by.items()):
        u = np.array([e.usage() for e in eps])
        d = u - predict([e.src_ids.tolist() for e in eps], b)
        est[b] = float(np.clip(pool_mean(b, eps) + d.mean(), 0.0, 1.0))
        resid.extend((d - d.mean()).tolist())
        raw.extend((u - u.mean()).tolist())
    var_u, var_d = float(np.mean(np.square(raw))) if raw else 0.0, float(np.mean(np.square(resid))) if resid else 0.0
    return est, {"dual/var_count": var_u, "dual/var_control_variate": var_d,
                 "dual/variance_ratio": var_d / var_u if var_u > 0 else 1.0}


def cost_value_usage(learner, episodes: list[Episode], prompts: dict[float, list[list[int]]],
                     chunk: int = 512) -> tuple[dict[float, float], dict[str, float]]:
    """:func:`control_variate_usage` with the cost value ``V_C(s_0^i, b)`` as the predictor (SPEC §5), averaged
    over ``prompts[b]`` (or the episodes' own inputs when a level has no prompts)."""
    def v0(src: list[list[int]], b: float) -> np.ndarray:
        out = []
        for i in range(0, len(src), chunk):
            ids, mask = pad_batch(src[i:i + chunk], learner.pad_id)
            out.append(learner.start_cost_values(ids, mask, torch.full((len(ids),), b)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return control_variate_usage(
        episodes, v0, lambda b, eps: v0(prompts.get(b) or [e.src_ids.tolist() for e in eps], b).mean())


@dataclass
class ReferenceUsage:
    """The phase-1 student's greedy usage of every held-out prompt at every level (``rl.dual_estimator=reference``):
    ``usage[b][tuple(src_ids)]``, decoded once when phase 2 starts, in the driver, as the rollout workers decode
    their greedy rows (``<τ>`` allowed at every level, no offsets)."""

    usage: dict[float, dict[tuple[int, ...], float]]

    @classmethod
    def decode(cls, run: Run, student: Student, examples: list[Example], budgets: list[float],
               batch_size: int) -> "ReferenceUsage":
        """Decode every example's prompt at every level of ``budgets`` (examples without that level skip it)."""
        was_training = student.training
        student.eval()
        usage: dict[float, dict[tuple[int, ...], float]] = {}
        try:
            with torch.no_grad():
                for b in map(float, budgets):
                    usage[b] = {}
                    rows = [e for e in examples if b in e.student_src]
                    for i in range(0, len(rows), batch_size):
                        chunk = [e.student_src[b] for e in rows[i:i + batch_size]]
                        ids, mask = pad_batch(chunk, run.pad_id)
                        d = decode(student, ids, mask, max_len=run.cfg.data.max_tgt_tokens, eos_id=run.eos_id,
                                   teacher=run.teacher, teacher_src=[e.teacher_src for e in rows[i:i + batch_size]],
                                   start_id=run.start_id, pad_id=run.pad_id)
                        for s, calls, n in zip(chunk, d.teacher_mask.sum(1), d.lengths):
                            usage[b][tuple(s)] = float(calls) / max(int(n), 1)
        finally:
            student.train(was_training)
        return cls(usage)

    def predict(self, src: list[list[int]], b: float) -> np.ndarray:
        return np.array([self.usage[b][tuple(s)] for s in src])

    def pool_mean(self, b: float, _episodes=None) -> float:
        return float(np.mean(list(self.usage[b].values())))


def demonstrations(run: Run, refs: list[Reference], tau_id: int, rng: np.random.Generator) -> list[Episode]:
    """Seeded, never-evicted off-policy paths: teacher outputs and oracle traces, at random budgets."""
    budgets = rng.choice(training_budgets(run.cfg), size=len(refs))
    rank, thresholds = run.cfg.phase1.oracle, oracle_thresholds(run, refs)
    return ([oracle_episode(ex, r, float(b), tau_id, rank, thresholds.get(float(b)))
             for ex, r, b in zip(run.train, refs, budgets)]
            + [demo_episode(ex, r, float(b)) for ex, r, b in zip(run.train, refs, budgets) if b == 0.0])


def oracle_thresholds(run: Run, refs: list[Reference]) -> dict[float, float]:
    """``phase1.quota=corpus``: the KL level per budget (:func:`tw_rl.oracle.corpus_thresholds`); else {}."""
    return corpus_thresholds(refs, training_budgets(run.cfg)) if run.cfg.phase1.quota == "corpus" else {}


def dual_episodes(episodes: list[Episode], which: str) -> list[Episode]:
    """The on-policy episodes whose usage the multipliers follow (``rl.dual_usage``): ``heldout``, the greedy ones
    on held-out inputs (how the student is deployed and evaluated — greedily, on inputs it was not trained on: it
    calls less on its training inputs); ``greedy``, the greedy ones on training inputs (sampling at temperature 1
    calls at a different rate); or ``all``. Falls back to all episodes when the chosen kind is missing."""
    kind = DUAL_USAGE_SOURCES[which]
    chosen = [e for e in episodes if kind is None or e.source == kind]
    return chosen or episodes


def usage_by_budget(episodes: list[Episode]) -> dict[float, float]:
    by: dict[float, list[float]] = {}
    for e in episodes:
        by.setdefault(e.budget, []).append(e.usage())
    return {b: float(np.mean(u)) for b, u in sorted(by.items())}


def checkpoint(run: Run, it: int, learner, multipliers: BudgetMultipliers, buffer: ReplayBuffer,
               rng: np.random.Generator) -> Path:
    arrays, meta = buffer.state_dict()
    return save_checkpoint(run.dir, it, {"learner": learner.state_dict(), "multipliers": multipliers.state_dict(),
                                         "replay": {k: torch.from_numpy(v) for k, v in arrays.items()}},
                           {"iteration": it, "replay": meta, "rng": rng_state(rng)}, to_yaml(run.cfg))


def restore(path: Path, learner, multipliers: BudgetMultipliers, rng: np.random.Generator
            ) -> tuple[int, ReplayBuffer]:
    """Load a checkpoint into ``learner``, ``multipliers`` and ``rng``; returns the iteration and the buffer."""
    tensors, state = load_checkpoint(path)
    learner.load_state_dict(tensors["learner"])
    multipliers.load_state_dict(tensors["multipliers"])
    buffer = ReplayBuffer.from_state_dict({k: v.numpy() for k, v in tensors["replay"].items()}, state["replay"])
    set_rng_state(state["rng"], rng)
    return int(state["iteration"]), buffer


# ------------------------------------------------------------------------------------------------------------------
def calibrate(run: Run, student: Student, phase1_student: Student) -> dict:
    """Fit the per-budget ``<τ>`` offsets of the trained student and of the phase-1 student (for the report's
    ``phase1_only`` rows) on the validation split; stored in their ``tw_student.json`` (tw_rl/evaluation/calibration.py)."""
    from tw_rl.api import TrainedModel
    from tw_rl.evaluation.calibration import calibrate_run

    model = TrainedModel(run.cfg, run.tokenizer, student, run.teacher, base_student_dir=run.base_student_dir,
                         device=run.teacher.device)  # teacher.driver_device: both models, as tw-rl eval --device
    students = {"final": (student, run.paths.trained_student(run.cfg.rl.enabled))}
    if phase1_student is not student:
        students["phase1"] = (phase1_student, run.paths.model("phase1"))
    return calibrate_run(model, students, run.dir)


# ------------------------------------------------------------------------------------------------------------------
def evaluate_run(run: Run, student: Student, phase1_student: Student) -> dict:
    """Training Wheels at every budget (with and without the hard cap), the phase-1 student, student alone,
    teacher alone and the baselines of SPEC §7 on the held-out split; writes ``outputs.jsonl``."""
    from tw_rl.api import TrainedModel

    cfg = run.cfg
    model = TrainedModel(cfg, run.tokenizer, student, run.teacher, base_student_dir=run.base_student_dir,
                         device=run.teacher.device)
    validation = (model.load_examples(cfg.data.validation_split, cfg.eval.max_examples) if cfg.eval.baselines
                  else [])
    report, outputs = evaluate(model, run.test, validation, phase1_student=phase1_student,
                               split=cfg.data.test_split)
    write_outputs(run.dir, outputs)
    return report


def provenance(cfg: Config) -> dict:
    """What produced a report: ``commit`` (git describe of the code, else the package version) and the resolved
    ``config``."""
    from tw_rl.version import code_version

    return {"commit": code_version(), "config": to_dict(cfg)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
