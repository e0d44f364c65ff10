"""RLlib's own PPO (new API stack) training the student on :class:`tw_rl.envs.token_mdp.TokenMDPEnv`.

The point is the adapter, not PPO: :class:`StudentRLModule` is a ``TorchRLModule`` (+ ``ValueFunctionAPI``) that
wraps the :class:`~tw_rl.models.student.Student`, so any RLlib algorithm whose learner only needs action logits
(and values) can train the student on the token MDP the same way — swap ``PPOConfig`` for e.g. ``APPOConfig`` or
``IMPALAConfig`` in :func:`build_algorithm`.

How it differs from the driver's batch contract (``update(EpisodeBatch, lambdas)``, docs/algorithms.md):

- **Sampling**: RLlib's env runners step :class:`TokenMDPEnv` one token at a time (the env asks the teacher for
  ``<τ>`` tokens and scores each student token: ``r_t = log π_T(y_t|·) − λ_b (c_t − b)`` per step) instead of the
  driver's Ray rollout workers with KV-cached batched decoding; there is no replay buffer and no demonstrations
  (PPO is on-policy), so ``rl.on_policy_fraction`` / ``rl.demonstrations`` do not apply.
- **The student's forward**: RLlib hands the module single observations (fixed-size padded arrays: source,
  prefix, teacher mask, step), so each state costs a full decoder pass over the padded prefix (no KV cache) and
  the logits at position ``step`` are read. Correct, but O(T) more decoder work per token than the driver's path.
- **Multipliers**: the driver's :class:`~tw_rl.budget.BudgetMultipliers`, updated after every ``algo.train()`` from
  the usage of the episodes the env runners finished (sampled at temperature 1: RLlib's exploration; there is no
  greedy fraction, so ``rl.dual_usage`` does not apply), pushed into every env runner
  (:class:`BudgetLagrangian` picks the episode's budget and sets its ``λ_b``).
- **Value function**: a linear head on the decoder's last hidden state at ``step`` (RLlib's GAE needs values);
  it is trained by PPO and discarded afterwards — only the student is saved.
- **Checkpoints**: none inside phase 2 and no ``--resume``: the run saves ``models/final`` when RLlib is done.

It lives in the Ray wing because all of it is RLlib: the registry (:data:`tw_rl.algos.ALGORITHMS`) names this
module by its path, so ``algo=rllib_ppo`` finds it while ``tw_rl/algos/`` imports neither Ray nor the wing. RLlib
itself is imported when the algorithm is built, not when the module is.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from tw_rl.algos.learner import Learner
from tw_rl.distributed.cluster import init_ray
from tw_rl.envs.token_mdp import TokenMDPEnv
from tw_rl.rundir import RunDir

ENV_NAME = "tw_rl/TokenMDP-budgeted"

# per env-runner process: the multipliers the envs apply, and the usage of finished episodes not yet collected
_LAMBDAS: dict[float, float] = {}
_FINISHED: list[tuple[float, float]] = []


# --------------------------------------------------------------------------------------------------------------
# env side
# --------------------------------------------------------------------------------------------------------------
class BudgetLagrangian(gym.Wrapper):
    """Draws each episode's budget itself so that it can set that budget's multiplier ``λ_b`` (read from this
    process's ``_LAMBDAS``) before the episode starts; records ``(budget, usage)`` of every finished episode."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        env: TokenMDPEnv = self.env.unwrapped
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        elif not hasattr(self, "_rng"):
            self._rng = np.random.default_rng()
        options = dict(options or {})
        b = float(options.get("budget", env.budgets[int(self._rng.integers(len(env.budgets)))]))
        env.set_lambda(_LAMBDAS.get(b, 0.0))
        options["budget"] = b
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            _FINISHED.append((float(info["budget"]), float(info["usage"])))
        return obs, reward, terminated, truncated, info


def make_env(env_config: dict) -> gym.Env:
    """RLlib's env creator: the run's examples and teacher (``examples``, ``teacher_dir``, ...) or, with an empty
    config, ``gymnasium.make("tw_rl/TokenMDP-v0")`` (the embedded task with tiny models)."""
    if not env_config.get("teacher_dir"):
        import tw_rl.envs  # noqa: F401  registers tw_rl/TokenMDP-v0

        kwargs = {k: env_config[k] for k in ("n_examples", "max_len", "seed") if k in env_config}
        return BudgetLagrangian(gym.make("tw_rl/TokenMDP-v0", **kwargs).unwrapped)
    from tw_rl.models.factory import load_model
    from tw_rl.teacher import Teacher

    model, _ = load_model(env_config["teacher_dir"], gguf_file=env_config.get("teacher_gguf_file"))
    torch.set_num_threads(1)
    teacher = Teacher(model, vocab_size=env_config["n_actions"] - 1, pad_id=env_config["pad_id"],
                      start_id=env_config["start_id"], stack_caches=env_config.get("teacher_stack_caches", False),
                      reuse_prefixes=env_config.get("teacher_reuse_prefixes", False))
    env = TokenMDPEnv(env_config["examples"], teacher, n_actions=env_config["n_actions"],
                      eos_id=env_config["eos_id"], budgets=env_config["budgets"], max_len=env_config["max_len"],
                      max_src_len=env_config["max_src_len"], pad_id=env_config["pad_id"])
    return BudgetLagrangian(env)


def set_lambdas(lambdas: dict[float, float]) -> None:
    _LAMBDAS.clear()
    _LAMBDAS.update({float(b): float(v) for b, v in lambdas.items()})


def drain_finished() -> list[tuple[float, float]]:
    out = list(_FINISHED)
    _FINISHED.clear()
    return out


# --------------------------------------------------------------------------------------------------------------
# the RLModule
# --------------------------------------------------------------------------------------------------------------
def _module_class():
    """Built lazily so that importing this module (``get_algorithm("rllib_ppo")``) does not import RLlib."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule

    class StudentRLModule(TorchRLModule, ValueFunctionAPI):
        """The student as an RLModule. ``model_config``: ``student_dir`` (a saved Student), or ``arch`` (a dict of
        T5Config sizes: a fresh tiny student over the env's action space); ``start_id``, ``pad_id``."""

        def setup(self):
            from tw_rl.models.student import Student

            mc = dict(self.model_config or {})
            if mc.get("student_dir"):
                self.student = Student.load(mc["student_dir"])[0]
            else:
                from transformers import T5Config, T5ForConditionalGeneration

                n = int(self.action_space.n)
                cfg = T5Config(vocab_size=n, decoder_start_token_id=mc.get("start_id", 0),
                               pad_token_id=mc.get("pad_id", 0), eos_token_id=1, **mc.get("arch", {}))
                torch.manual_seed(int(mc.get("seed", 0)))
                base = T5ForConditionalGeneration(cfg)
                with torch.no_grad():
                    base.get_output_embeddings().weight[n - 1].zero_()
                self.student = Student(base, tau_id=n - 1)
            if self.student.n_actions != int(self.action_space.n):
                raise ValueError(f"student has {self.student.n_actions} actions, env {self.action_space.n}")
            self.start_id, self.pad_id = int(mc.get("start_id", 0)), int(mc.get("pad_id", 0))
            self.value_head = nn.Linear(self.student.model.get_input_embeddings().weight.shape[1], 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

        def _logits_and_hidden(self, batch):
            obs = batch[Columns.OBS]
            src = obs["source"].long()
            src_mask = torch.arange(src.shape[1], device=src.device)[None, :] < obs["source_len"].long()[:, None]
            prefix = obs["prefix"].long()
            B = prefix.shape[0]
            start = torch.full((B, 1), self.start_id, dtype=torch.long, device=prefix.device)
            dec = torch.cat([start, prefix], 1)
            tmask = torch.cat([torch.zeros((B, 1), dtype=torch.bool, device=prefix.device),
                               obs["teacher_mask"].bool()], 1)
            logits, hidden = self.student(src, src_mask, dec, tmask, return_hidden=True)  # either model family
            step = obs["step"].long().clamp(max=dec.shape[1] - 1)
            rows = torch.arange(B, device=dec.device)
            return logits[rows, step], hidden[rows, step]

        def _forward(self, batch, **kwargs):
            logits, _ = self._logits_and_hidden(batch)
            return {Columns.ACTION_DIST_INPUTS: logits}

        def _forward_train(self, batch, **kwargs):
            logits, hidden = self._logits_and_hidden(batch)
            return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: hidden}

        def compute_values(self, batch, embeddings=None):
            if embeddings is None:
                _, embeddings = self._logits_and_hidden(batch)
            return self.value_head(embeddings).squeeze(-1)

    return StudentRLModule


def build_algorithm(env_config: dict, model_config: dict, *, lr: float, gamma: float, episodes_per_iteration: int,
                    max_len: int, minibatch_size: int, num_epochs: int, clip: float, entropy_coeff: float,
                    num_env_runners: int, seed: int):
    """RLlib PPO on :data:`ENV_NAME` with :class:`StudentRLModule` (new API stack)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
    steps = episodes_per_iteration * max_len  # an upper bound of the env steps per iteration
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config=env_config)
        .framework("torch")
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=1,
                     rollout_fragment_length="auto", num_cpus_per_env_runner=1 if num_env_runners else 0)
        .learners(num_learners=0)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=_module_class(), model_config=model_config))
        .training(lr=lr, gamma=gamma, train_batch_size_per_learner=steps, minibatch_size=min(minibatch_size, steps),
                  num_epochs=num_epochs, clip_param=clip, entropy_coeff=entropy_coeff, vf_loss_coeff=0.5,
                  use_kl_loss=False)
        .debugging(seed=seed, log_level="ERROR")
        .reporting(metrics_num_episodes_for_smoothing=episodes_per_iteration)
    )
    return config.build_algo()


def collect_usage(algo) -> dict[float, float]:
    """Mean usage per budget of the episodes every env runner finished since the last call."""
    by: dict[float, list[float]] = {}
    for part in algo.env_runner_group.foreach_env_runner(lambda _: drain_finished(), local_env_runner=True):
        for b, u in part:
            by.setdefault(b, []).append(u)
    return {b: float(np.mean(u)) for b, u in sorted(by.items())}


def push_lambdas(algo, lambdas: dict[float, float]) -> None:
    algo.env_runner_group.foreach_env_runner(lambda _: set_lambdas(lambdas), local_env_runner=True)


def module_student(algo):
    """The trained student inside the algorithm's (local) learner module."""
    return algo.get_module().student


def _learner_metrics(result: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    learner = result.get("learners", {}).get("default_policy", {})
    for k in ("policy_loss", "vf_loss", "entropy", "mean_kl_loss", "vf_explained_var"):
        if k in learner:
            out[f"loss/{k}"] = float(learner[k])
    runners = result.get("env_runners", {})
    for k, name in (("episode_return_mean", "rollout/return"), ("episode_len_mean", "rollout/length"),
                    ("num_episodes", "rollout/episodes")):
        if k in runners:
            out[name] = float(runners[k])
    return out


# --------------------------------------------------------------------------------------------------------------
# the learner: it owns its loop (tw_rl.train.rl_loop calls run() for algo=rllib_ppo)
# --------------------------------------------------------------------------------------------------------------
class RLlibPPOLearner(Learner):
    """RLlib's PPO as a :class:`~tw_rl.algos.learner.Learner` that samples and trains in its own loop."""

    owns_loop = True

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    def update(self, batch, lambdas, **inputs) -> dict[str, float]:
        raise NotImplementedError("rllib_ppo samples and trains in its own loop (owns_loop): call run()")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # no phase-2 checkpoints: RLlib's state lives in its algorithm

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError("rllib_ppo keeps no phase-2 checkpoints")

    def run(self, run, log, resume: bool) -> nn.Module:
        return run_phase2(run, self.student, log, resume)


def make_learner(cfg, student: nn.Module, start_id: int, pad_id: int, **_) -> RLlibPPOLearner:
    """Registry entry point (``ALGORITHMS["rllib_ppo"]``)."""
    return RLlibPPOLearner(student)


def run_phase2(run, student, log, resume: bool):
    """``rl.iterations`` RLlib PPO iterations on the run's examples, teacher and phase-1 student, with the budget
    multipliers updated between iterations; returns the student (the driver saves it)."""
    from tw_rl.budget import BudgetMultipliers
    from tw_rl.metrics import Timer

    cfg = run.cfg
    if resume:
        print("rllib_ppo keeps no phase-2 checkpoints: --resume starts phase 2 from the phase-1 student")
    init_ray()
    max_src = max(len(s) for ex in run.train for s in ex.student_src.values())
    env_config = {"teacher_dir": run.teacher_dir, "teacher_gguf_file": cfg.teacher.gguf_file,
                  "teacher_stack_caches": cfg.teacher.stack_caches,
                  "teacher_reuse_prefixes": cfg.teacher.reuse_prefixes, "examples": run.train,
                  "n_actions": student.n_actions,
                  "eos_id": run.eos_id, "pad_id": run.pad_id, "start_id": run.start_id, "budgets": cfg.budgets,
                  "max_len": cfg.data.max_tgt_tokens, "max_src_len": max_src}
    student_dir = RunDir(run.dir).model("phase1")
    model_config = {"student_dir": str(student_dir), "start_id": run.start_id, "pad_id": run.pad_id}
    r = cfg.rllib
    algo = build_algorithm(env_config, model_config, lr=cfg.rl.lr, gamma=cfg.rl.gamma,
                           episodes_per_iteration=r.episodes_per_iteration, max_len=cfg.data.max_tgt_tokens,
                           minibatch_size=r.minibatch_size, num_epochs=r.num_epochs, clip=r.clip,
                           entropy_coeff=r.entropy_coeff, num_env_runners=r.num_env_runners, seed=cfg.seed)
    multipliers = BudgetMultipliers(cfg.budgets, cfg.rl.lambda_lr, cfg.rl.lambda_init)
    try:
        push_lambdas(algo, dict(zip(multipliers.budgets.tolist(), multipliers.lambdas.tolist())))
        for it in range(cfg.rl.iterations):
            times: dict[str, float] = {}
            with Timer(times, "rllib_train"):
                result = algo.train()
            usage = collect_usage(algo)
            multipliers.update(usage)
            push_lambdas(algo, dict(zip(multipliers.budgets.tolist(), multipliers.lambdas.tolist())))
            log.log(it, {**_learner_metrics(result), **multipliers.as_metrics(), **times,
                         **{f"rollout/usage_{b:g}": u for b, u in usage.items()}}, phase="phase2")
        student.load_state_dict(module_student(algo).state_dict())
    finally:
        algo.stop()
    return student  # the driver's phase2 saves it (models/final)
