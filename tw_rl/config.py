"""Typed configuration: every default is defined once, here.

A run is configured by one :class:`Config`. YAML files (``launch/configs/*.yaml``) and command-line overrides
(``key.sub=value``) are merged onto these dataclasses with OmegaConf, which rejects unknown keys and wrong types;
:func:`validate` then checks ranges and choices declared in each field's metadata. Every error names the key and
what is allowed, and is raised before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tw_rl.prompt import budget_prompt


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range. The message names the key."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices: Any = None,
          ge: float | None = None, le: float | None = None, gt: float | None = None) -> Any:
    """A config field with its documentation and its allowed values (checked by :func:`validate`).

    For list fields the range applies to every element.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "le": le, "gt": gt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EmbeddedTaskConfig:
    """The offline, seeded translation-like task (``tw_rl/data/embedded.py``)."""

    n_common: int = param(300, "common words (determiners and prepositions included); short, one token each",
                          ge=10)
    n_rare: int = param(2000, "rare content words (nouns, adjectives, verbs); spelled as several target pieces",
                        ge=0)
    zipf_a: float = param(1.0, "Zipf exponent of word frequencies inside each word class (common words ranked "
                               "first); a smaller exponent gives more rare words", ge=0.0)
    rare_syllables: int = param(3, "syllables of a rare word (source and target)", ge=2)
    n_determiners: int = param(6, "determiners (part of n_common)", ge=1)
    n_prepositions: int = param(12, "prepositions (part of n_common)", ge=1)
    p_adjective: float = param(0.5, "probability that a noun phrase has an adjective", ge=0.0, le=1.0)
    p_object: float = param(0.7, "probability that a sentence has an object noun phrase", ge=0.0, le=1.0)
    p_pp: float = param(0.5, "probability that a sentence ends with a prepositional phrase", ge=0.0, le=1.0)
    n_train: int = param(20000, "training pairs", ge=1)
    n_validation: int = param(500, "validation pairs", ge=1)
    n_test: int = param(500, "test pairs", ge=1)
    task_seed: int = param(1234, "seed of the lexicon, the word mapping and the splits (independent of `seed`)")


@dataclass
class DataConfig:
    """Where the parallel data comes from and how it is checked."""

    kind: str = param("embedded", "data source", choices=["embedded", "files", "hf"])
    path: Optional[str] = param(None, "directory with the split files (kind=files)")
    format: str = param("auto", "file format (kind=files): line-aligned pair files (plain or .gz), jsonl or tsv",
                        choices=["auto", "pairs", "jsonl", "tsv"])
    src_lang: str = param("de", "source suffix of pair files / source key of jsonl rows / hf translation key")
    tgt_lang: str = param("en", "target suffix of pair files / target key of jsonl rows / hf translation key")
    train_split: str = param("train", "name of the training split")
    validation_split: str = param("validation", "name of the validation split")
    test_split: str = param("test", "name of the held-out split used by evaluation")
    hf_name: Optional[str] = param(None, "Hugging Face dataset name (kind=hf), e.g. wmt19 or xsum")
    hf_config: Optional[str] = param(None, "Hugging Face dataset config, e.g. de-en")
    max_examples: Optional[int] = param(None, "keep the first N pairs of every split (None: all)", ge=1)
    max_src_tokens: int = param(40, "longest source in tokens; longer examples are errors (or skipped)", ge=4)
    max_tgt_tokens: int = param(32, "longest target in tokens, and the episode length limit", ge=2)
    on_error: str = param("raise", "bad examples: raise an error naming file and line, or skip and count them",
                          choices=["raise", "skip"])
    embedded: EmbeddedTaskConfig = param(factory=EmbeddedTaskConfig, help="the embedded task")


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ArchConfig:
    """Kind and size of a model built from scratch (used when ``name_or_path`` is not given)."""

    model_type: str = param("t5", "what phase 0 builds: t5 (an encoder-decoder) or a decoder-only causal LM: llama, "
                                  "qwen2 or gpt2 (num_layers layers; num_decoder_layers unused)",
                            choices=["t5", "llama", "qwen2", "gpt2"])
    d_model: int = param(128, "hidden size", ge=4)
    d_ff: int = param(512, "feed-forward size", ge=4)
    d_kv: int = param(32, "size of one attention head", ge=2)
    num_heads: int = param(4, "attention heads", ge=1)
    num_layers: int = param(2, "encoder layers (a decoder-only model's layers)", ge=1)
    num_decoder_layers: int = param(2, "decoder layers", ge=1)
    dropout_rate: float = param(0.0, "dropout", ge=0.0, le=1.0)


@dataclass
class TokenizerConfig:
    """The subword tokenizer shared by teacher and student when models are trained from scratch."""

    path: Optional[str] = param(None, "load this tokenizer (hub name or directory) instead of training one")
    vocab_size: int = param(1000, "vocabulary size of a tokenizer trained on the task", ge=32)


@dataclass
class TeacherConfig:
    """The teacher: a model and the server that answers `<τ>` calls and scores outputs."""

    name_or_path: Optional[str] = param(None, "hub name, local directory or .gguf file; None: train one in phase 0")
    gguf_file: Optional[str] = param(None, "the GGUF file inside the directory name_or_path (a GGUF model source)")
    trust_remote_code: bool = param(False, "allow custom model code from the hub (off unless you trust it)")
    chat_template: bool = param(True, "a causal LM whose tokenizer has a chat template reads its input as the user "
                                      "message (false: the plain template, input then EOS)")
    arch: ArchConfig = param(factory=lambda: ArchConfig(d_model=128, d_ff=512, d_kv=32, num_heads=4,
                                                        num_layers=2, num_decoder_layers=2),
                             help="size when trained from scratch")
    num_replicas: int = param(1, "teacher server replicas (Ray actors)", ge=1)
    num_cpus: float = param(1.0, "CPUs per teacher replica", ge=0.0)
    num_gpus: float = param(0.0, "GPUs per teacher replica", ge=0.0)
    max_batch_size: int = param(64, "dynamic batching: largest batch of queued requests served at once", ge=1)
    max_wait_ms: float = param(2.0, "dynamic batching: longest wait for more requests before serving", ge=0.0)
    stack_caches: bool = param(False, "a causal LM teacher answers a <τ> request of many rows with one forward over "
                                      "the rows' own KV caches, stacked, feeding only the tokens each lacks (false: "
                                      "one forward over the full prefixes, no cache); pays where the teacher's "
                                      "per-position cost dominates a forward, e.g. SmolLM2-135M on CPU "
                                      "(docs/benchmarks.md)")
    reuse_prefixes: bool = param(False, "a sequence whose prefix does not extend the teacher's kept KV cache for its "
                                        "input reuses the kept cache sharing the longest start with it, cropped "
                                        "(false: it reads its input again); pays where the same inputs are decoded "
                                        "again and again: calibration, the evaluation's baselines")
    driver_device: str = param("cpu", "torch device of the driver's own teacher: phase 1 (oracle traces, "
                                      "distillation), calibration and evaluation, e.g. cpu, cuda or cuda:1 (the "
                                      "replicas of phase 2 use teacher.num_gpus). cuda on a machine without one "
                                      "stops the run at its start; give the driver a GPU with learner.num_gpus")


@dataclass
class StudentConfig:
    """The student: a model with `<τ>` added to its vocabulary and the teacher-token offset δ."""

    name_or_path: Optional[str] = param(None, "hub name, local directory or .gguf file; None: train one in phase 0")
    gguf_file: Optional[str] = param(None, "the GGUF file inside the directory name_or_path (a GGUF model source)")
    trust_remote_code: bool = param(False, "allow custom model code from the hub (off unless you trust it)")
    chat_template: bool = param(True, "a causal LM whose tokenizer has a chat template reads its input as the user "
                                      "message, budget prompt included (false: the plain template, input then EOS)")
    arch: ArchConfig = param(factory=lambda: ArchConfig(d_model=32, d_ff=64, d_kv=16, num_heads=2,
                                                        num_layers=2, num_decoder_layers=2),
                             help="size when trained from scratch")
    use_delta: bool = param(True, "add the learnable offset δ to teacher-provided tokens in the decoder input")
    tau_head: str = param("token", "how <τ> is scored: token (one more row of the output layer, SPEC §4 as written) "
                                   "or gate (Q(<τ>) = u(s) + logsumexp_V Q: a learned call gate over the student's "
                                   "own next-token distribution). Measured at b = 0.2: gate +5.9 BLEU on the demo "
                                   "after phase 1, −1.1 on Multi30K; docs/design.md) or prompt_gate (the gate plus "
                                   "an attention read-out of the input, so the call rule can follow the budget the "
                                   "prompt states; demo.yaml sets it)",
                          choices=["token", "gate", "prompt_gate"])
    init_layers: Optional[list[int]] = param(None, "build the phase-0 student from the teacher: its embeddings, final "
                                                   "norm, output layer and these decoder layers (0-based, in order; "
                                                   "layer-dropped as DistilBERT); needs a decoder-only teacher of the "
                                                   "Llama/Qwen2/GPT-2 kind; student.arch is then unused (None: build "
                                                   "student.arch from scratch)", ge=0)


# --------------------------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PretrainConfig:
    """Phase 0: supervised training of teacher and student from scratch (SPEC §6)."""

    enabled: bool = param(True, "run phase 0 when a model is not given")
    teacher_epochs: float = param(3.0, "passes over the training split for the teacher", gt=0.0)
    student_epochs: float = param(4.0, "passes over the training split for the student", gt=0.0)
    batch_size: int = param(32, "pairs per step", ge=1)
    lr: float = param(3e-2, "peak learning rate (AdamW with per-tensor scaled steps, 'AdamWScale')", gt=0.0)
    warmup_steps: int = param(100, "linear warm-up steps", ge=0)
    final_lr_fraction: float = param(0.05, "cosine decay after warm-up ends at this fraction of the peak lr",
                                     ge=0.0, le=1.0)
    weight_decay: float = param(0.0, "decoupled weight decay", ge=0.0)
    grad_clip: float = param(1.0, "gradient norm clip (0: off)", ge=0.0)
    time_limit_s: Optional[float] = param(None, "stop a model's training after this many seconds", gt=0.0)
    num_threads: Optional[int] = param(1, "torch threads while phase 0 trains and evaluates (None: the run's "
                                          "num_threads). 1: on a 2-core machine shared with other work, 2 threads "
                                          "slowed training 2-50x; alone on the machine 2 threads are ~1.6x faster",
                                       ge=1)
    bf16: bool = param(False, "train with bfloat16 autocast (weights, optimizer and loss stay float32): ~1.6x "
                              "more tokens/s on a CPU with AVX512-BF16 or AMX (measured on this machine's EPYC); "
                              "much slower on CPUs without them. Evaluation stays float32")
    student_targets: str = param("reference", "what the phase-0 student is trained on: reference (the data's "
                                              "targets) or teacher (the teacher's greedy outputs for the training "
                                              "sources: sequence-level distillation, Kim & Rush 2016; cached in "
                                              "models/teacher_targets.json)", choices=["reference", "teacher"])


@dataclass
class Phase1Config:
    """Phase 1: behaviour cloning on KL-oracle traces (SPEC §6)."""

    enabled: bool = param(True, "run phase 1")
    num_examples: Optional[int] = param(4000, "training inputs used by phases 1 and 2 (None: the whole split)",
                                        ge=1)
    epochs: float = param(8.0, "passes over the training inputs (one random budget per example and pass)", gt=0.0)
    batch_size: int = param(64, "examples per step", ge=1)
    lr: float = param(3e-3, "learning rate", gt=0.0)
    added_lr: Optional[float] = param(None, "learning rate of what the method adds to the student and starts from "
                                            "zero: the output layer's <τ> row, the gate bias, the prompt reader and "
                                            "δ (None: phase1.lr). For a pretrained student whose body needs a small "
                                            "phase1.lr (tw_rl/optim.py)", gt=0.0)
    final_lr_fraction: float = param(0.05, "cosine decay of the learning rate over phase 1, ending at this fraction of "
                                           "lr (1.0: constant; the constant rate cost the student's own tokens ~3 BLEU "
                                           "on the demo, docs/results.md)", gt=0.0, le=1.0)
    distill_weight: float = param(1.0, "weight of token-level distillation on unmarked positions", ge=0.0)
    oracle: str = param("kl", "which positions the oracle marks: kl (the top round(b·T) by KL(π_T ‖ π_S), SPEC §6) or "
                              "wrong_first (positions where the phase-0 student's greedy token is wrong first, KL "
                              "within each group)", choices=["kl", "wrong_first"])
    quota: str = param("sequence", "how many positions the oracle marks: sequence (the top round(b·T) of every "
                                   "sequence, SPEC §6) or corpus (every position whose KL is above the level a "
                                   "fraction b of all training positions exceed: hard sequences get more calls, easy "
                                   "ones fewer; docs/design.md)", choices=["sequence", "corpus"])
    refit: bool = param(False, "after behaviour cloning, refit the gate's <τ> decision on the student's own "
                               "states (one DAgger step, token policy frozen): ridge regression of KL(π_T ‖ π_S) on "
                               "the output layer's input and the student's log-confidence (tw_rl/refit.py; needs "
                               "student.tau_head=gate)")
    refit_examples: int = param(4000, "training inputs the refit decodes (one budget level each, cycled)", ge=1)
    refit_l2: float = param(1e-3, "ridge penalty of the refit, on standardised features", ge=0.0)


@dataclass
class RolloutConfig:
    """On-policy data collection by Ray rollout workers."""

    num_workers: int = param(2, "rollout workers (Ray actors), each holding a student replica", ge=0)
    envs_per_worker: int = param(64, "episodes decoded together by one worker per request", ge=1)
    num_cpus: float = param(0.5, "CPUs per rollout worker", ge=0.0)
    num_gpus: float = param(0.0, "GPUs per rollout worker", ge=0.0)
    temperature: float = param(1.0, "sampling temperature for exploration", gt=0.0)
    greedy_fraction: float = param(0.5, "fraction of each worker's episodes decoded greedily, as the student is "
                                         "deployed; their usage drives the multipliers (rl.dual_usage); with "
                                         "rl.dual_usage=heldout they decode held-out inputs and are not trained on",
                                   ge=0.0, le=1.0)


@dataclass
class LearnerConfig:
    """Resources of the learner: the driver process (the Ray job's entrypoint), or with ``num_workers`` ≥ 1 a group
    of data-parallel learner actors."""

    num_cpus: float = param(0.0, "CPUs reserved for the driver/learner when submitted as a Ray job "
                                 "(ray job submit --entrypoint-num-cpus; 0: none reserved, Ray's default)", ge=0.0)
    num_gpus: float = param(0.0, "GPUs reserved for the driver/learner when submitted as a Ray job "
                                 "(--entrypoint-num-gpus): places the driver on a GPU node. The learner itself "
                                 "still trains on the student's device (CPU today; docs/design.md)", ge=0.0)
    num_workers: int = param(0, "data-parallel PCL learner (tw_rl/distributed/data_parallel.py): 0, the learner "
                                "runs in the driver; N ≥ 1, N Ray actors each holding a DDP replica of the student, every learner batch "
                                "split across them and gradients all-reduced (algo=pcl only)", ge=0)
    use_gpu: bool = param(False, "with num_workers ≥ 1: one GPU per learner worker (DDP over NCCL); false: CPU "
                                 "workers over gloo")
    worker_num_cpus: float = param(0.5, "CPUs reserved per learner worker (fractions allowed)", ge=0.0)


@dataclass
class RLConfig:
    """Phase 2: PCL with budget multipliers (SPEC §4, §5)."""

    enabled: bool = param(True, "run phase 2")
    iterations: int = param(12, "sample → score → buffer → update → sync iterations", ge=0)
    updates_per_iteration: int = param(4, "learner steps per iteration", ge=1)
    batch_size: int = param(64, "episodes per learner step", ge=1)
    trainable: str = param("tau", "what phase 2 trains: tau (only the <τ> decision: the output layer's <τ> row and "
                                  "the gate bias; the token policy stays phase 1's) or all (the whole student). On "
                                  "the demo after phase 1 with a decaying rate, all cost 0.6–5.1 BLEU at b = 0.2 "
                                  "(both heads, rl.lr 3e-5–1e-4), tau −0.2 to −0.3 at 1e-3 (docs/results.md)",
                           choices=["tau", "all"])
    lr: float = param(1e-3, "learning rate (1e-3 is for rl.trainable=tau: one row of the output layer; with "
                            "rl.trainable=all use 3e-5–1e-4, higher rates undo phase 1; docs/results.md)", gt=0.0)
    alpha: float = param(1.0, "entropy temperature α", gt=0.0)
    gamma: float = param(1.0, "discount γ", gt=0.0, le=1.0)
    window: int = param(8, "multi-step window d (0: to the end of the sequence)", ge=0)
    multi_step_weight: float = param(0.5, "mix: (1-w)·single-step + w·multi-step consistency over rl.window steps "
                                           "(SPEC §4 uses both; with rl.value=zero the multi-step term pushed greedy "
                                           "usage past the budgets, docs/design.md)", ge=0.0, le=1.0)
    value: str = param("learned", "the value in the consistency: learned (a value head V_φ over the student's "
                                  "decoder state with a Polyak target, SPEC §4's standard PCL; warm-started on "
                                  "Monte-Carlo soft returns), zero (V ≡ 0, the exact soft optimum of SPEC §3 at "
                                  "α = 1 without calls: no bootstrapping) or soft (V = α·logsumexp(Q/α), SPEC §4's "
                                  "unified form); docs/design.md", choices=["learned", "zero", "soft"])
    value_hidden: int = param(64, "rl.value=learned: hidden units of the value head's MLP (V_φ and V_C)", ge=1)
    value_lr: float = param(1e-3, "rl.value=learned: learning rate of the value heads", gt=0.0)
    value_warmup_steps: int = param(200, "rl.value=learned: steps regressing V_φ on the phase-1 student's Monte-Carlo "
                                         "soft returns (and V_C on its usage) before the first PCL update", ge=0)
    dual_estimator: str = param("auto", "the usage estimate of the dual ascent: count (mean usage of the "
                                        "rl.dual_usage episodes), cost_value (the same with V_C(s_0) as a control "
                                        "variate, averaged over every held-out prompt: lower variance; needs "
                                        "rl.value=learned), reference (the same with, as the control variate, "
                                        "the phase-1 student's own greedy usage of each held-out input at each "
                                        "level, decoded once when phase 2 starts: the input's difficulty, "
                                        "which dominates the spread of ~10 episodes per level) or auto "
                                        "(cost_value with rl.value=learned, else count)",
                                choices=["auto", "count", "cost_value", "reference"])
    cost_batch_size: int = param(64, "rl.value=learned: greedy on-policy episodes per V_C update (with every "
                                     "learner step, drawn from the iteration's rl.dual_usage episodes)", ge=1)
    target_update_rate: float = param(0.05, "Polyak rate of the target copy", gt=0.0, le=1.0)
    replay_capacity: int = param(4096, "on-policy episodes kept (demonstrations are never evicted)", ge=1)
    on_policy_fraction: float = param(0.5, "fraction of each batch drawn from on-policy episodes", ge=0.0, le=1.0)
    lambda_lr: float = param(0.5, "dual ascent step η_λ", ge=0.0)
    lambda_init: float = param(0.0, "initial multipliers", ge=0.0)
    budget_constraint: str = param("upper", "the constraint per budget level: upper (mean usage ≤ b, SPEC §5: λ_b ≥ 0) "
                                            "or equal (mean usage = b: λ_b may turn negative and pay the student "
                                            "to spend a budget it would leave unused; b = 0 stays an upper bound)",
                                   choices=["upper", "equal"])
    dual_usage: str = param("heldout", "whose usage drives the dual ascent: the greedy episodes on held-out inputs "
                                       "(data.validation_split; never trained on), the greedy episodes on training "
                                       "inputs, or all on-policy episodes (docs/design.md)",
                            choices=["heldout", "greedy", "all"])
    grad_clip: float = param(1.0, "gradient norm clip", gt=0.0)
    demonstrations: bool = param(True, "seed the replay buffer with demonstrations (teacher outputs, oracle traces); "
                                       "false: on-policy only (ablation)")
    call_learner: str = param("pcl", "what learns the <τ> decision in phase 2: pcl (the same consistency as the "
                                     "tokens, SPEC §4) or rollout (rounds of policy iteration on the Monte-Carlo "
                                     "advantage of a call under SPEC §3's reward, measured by the rollout workers; "
                                     "needs student.tau_head=gate; with rl.trainable=tau it replaces the PCL loop; "
                                     "docs/design.md)", choices=["pcl", "rollout"])
    call_rounds: int = param(1, "rl.call_learner=rollout: rounds (greedy rollouts with a flipped path per state, "
                                "then the gate's fit)", ge=1)
    call_examples: int = param(4000, "rl.call_learner=rollout: training inputs per round (one positive budget level "
                                     "each, cycled; split over the rollout workers)", ge=1)
    call_l2: float = param(1e-3, "rl.call_learner=rollout: ridge penalty of the gate's fit, on standardised "
                                 "features", ge=0.0)


@dataclass
class GKDConfig:
    """The ``gkd`` learner (tw_rl/algos/gkd.py): generalized JSD to the teacher plus the <τ> decision."""

    beta: float = param(0.5, "JSD interpolation: 0 forward KL(T||S), 1 reverse KL(S||T), 0.5 symmetric JSD",
                        ge=0.0, le=1.0)
    tau_weight: float = param(1.0, "weight of the <τ> decision term (cross-entropy towards sigmoid(A/α))", ge=0.0)


@dataclass
class PPOConfig:
    """The ``ppo`` learner (tw_rl/algos/ppo.py): token-level clipped surrogate, batch baseline."""

    clip: float = param(0.2, "clip range ε of the ratio", gt=0.0)
    epochs: int = param(1, "gradient steps on each sampled batch", ge=1)


@dataclass
class RLlibConfig:
    """The ``rllib_ppo`` algorithm (tw_rl/distributed/rllib_ppo.py): RLlib's PPO on TokenMDPEnv; rl.iterations,
    rl.lr, rl.gamma and the budget multipliers (rl.lambda_lr) are shared with the other learners."""

    num_env_runners: int = param(0, "RLlib env runners (0: sample in the driver process)", ge=0)
    episodes_per_iteration: int = param(16, "episodes sampled per RLlib iteration (train batch ≈ this × length)",
                                        ge=1)
    minibatch_size: int = param(128, "PPO minibatch size in env steps", ge=1)
    num_epochs: int = param(1, "PPO epochs over each train batch", ge=1)
    clip: float = param(0.2, "PPO clip parameter", gt=0.0)
    entropy_coeff: float = param(0.0, "PPO entropy bonus", ge=0.0)


@dataclass
class CalibrationConfig:
    """Budget calibration after training (tw_rl/evaluation/calibration.py): one offset on the <τ> logit per budget level, fitted
    on the validation split so that the deployed greedy student's mean usage is the budget."""

    enabled: bool = param(True, "calibrate the trained student (and the phase-1 student of the report) after training")
    tolerance: float = param(0.005, "stop when validation usage is within this of the budget", gt=0.0, le=0.5)
    max_iter: int = param(16, "most search steps (greedy decodes of the validation inputs) per budget", ge=1)
    search: str = param("bisect", "how every knob is searched on validation (the <τ> offsets and the calibrated "
                                  "baselines' rates and thresholds): bisect (halve the bracket) or secant (Illinois "
                                  "regula falsi, each budget level starting from the previous level's decodes: about "
                                  "half the decodes, docs/design.md)", choices=["bisect", "secant"])
    max_examples: Optional[int] = param(500, "validation inputs used (None: the whole split)", ge=1)


@dataclass
class EvalConfig:
    """Evaluation of a run on the held-out split."""

    max_examples: Optional[int] = param(None, "evaluate the first N held-out pairs (None: all)", ge=1)
    batch_size: int = param(128, "sequences decoded together", ge=1)
    hard_cap: bool = param(False, "tw-rl generate's default: forbid <τ> once calls reach ceil(b·max_len) (SPEC §5); "
                                  "evaluation reports both, with and without the cap")
    baselines: bool = param(True, "also evaluate random calls, confidence fallback (calibrated on the validation "
                                  "split) and speculative decoding (SPEC §7)")
    latency_examples: int = param(64, "inputs timed one at a time (batch size 1) for every row; 0: no latency or "
                                     "throughput", ge=0)
    latency_repeats: int = param(1, "timed repeats of each input (latency is the median) and of the throughput batch",
                                 ge=1)
    throughput_batch_size: int = param(32, "batch size of the throughput measurement (sequences/s)", ge=1)
    spec_lenience: list[float] = param(factory=lambda: [1.0, 0.5, 0.2, 0.1],
                                       help="lenience of the draft-and-verify speculative decoding curve (1: lossless; "
                                            "smaller: lossy, as in DistillSpec); []: Hugging Face assisted generation "
                                            "only", gt=0.0, le=1.0)
    baseline_tolerance: float = param(0.01, "a calibrated baseline's knob (random-call rate, confidence threshold, "
                                            "oracle gain) stops when its validation usage is within this of "
                                            "Training Wheels' there", gt=0.0, le=0.5)
    baseline_max_iter: int = param(20, "most search steps (greedy decodes of the validation inputs) per "
                                       "calibrated baseline and budget; the closest usage seen is kept", ge=1)
    spec_draft_tokens: int = param(5, "tokens the draft proposes per round in draft-and-verify decoding", ge=1)
    bootstrap_samples: int = param(1000, "paired bootstrap resamples (sacrebleu) for the BLEU difference of each "
                                         "baseline against Training Wheels at the same budget; 0: no test", ge=0)
    task: str = param("auto", "metrics: translation (BLEU, chrF), summarization (also ROUGE-1/2/L), math (also the "
                              "exact match of the final answer, GSM8K's '#### N') or qa (also the answer accuracy: a "
                              "reference answer, alternatives split at '|', found in the output); auto: "
                              "summarization or math when data.hf_name names such a set (xsum, cnn_dailymail, samsum, "
                              "...; gsm8k, svamp)",
                      choices=["auto", "translation", "summarization", "math", "qa"])


@dataclass
class Config:
    """A tw-rl run."""

    out_dir: str = param("runs/demo", "the run directory: config, models, checkpoints, metrics, reports")
    seed: int = param(0, "seed of everything random in the run")
    algo: str = param("pcl", "the phase-2 learner (tw_rl.registry.ALGORITHMS)")
    budgets: list[float] = param(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                                 help="teacher budgets trained and evaluated", ge=0.0, le=1.0)
    budget_prompt: str = param("teacher budget {pct}%: ", "prefix of the student's input; {pct} = 100·b")
    task_prompt: str = param("", "an instruction written before every input, the teacher's and the student's (after "
                                 "the budget prompt), e.g. 'Translate German to English: ' for instruction-tuned "
                                 "models; phase 0's models train with it too")
    budget_sampling: str = param("grid", "budgets drawn in training (phase-1 traces, phase-2 rollouts and "
                                         "demonstrations): grid (the levels of `budgets`) or continuous (every "
                                         "whole percent between the grid's smallest and largest level, so that the "
                                         "student reads any budget from its prompt; the multipliers are "
                                         "interpolated between levels and the constraint is enforced at the "
                                         "levels)", choices=["grid", "continuous"])
    num_threads: int = param(1, "torch threads in the driver process (phases 1, 2 and evaluation). 1 by default: "
                                "during phase 2 the Ray teacher and rollout actors share the cores, and an "
                                "oversubscribed torch thread pool runs small models many times slower", ge=1)
    checkpoint_every: int = param(10, "phase-2 iterations between checkpoints", ge=1)
    tensorboard: bool = param(True, "write TensorBoard event files next to metrics.jsonl")
    data: DataConfig = param(factory=DataConfig, help="data")
    tokenizer: TokenizerConfig = param(factory=TokenizerConfig, help="tokenizer")
    teacher: TeacherConfig = param(factory=TeacherConfig, help="teacher")
    student: StudentConfig = param(factory=StudentConfig, help="student")
    pretrain: PretrainConfig = param(factory=PretrainConfig, help="phase 0")
    phase1: Phase1Config = param(factory=Phase1Config, help="phase 1")
    rollout: RolloutConfig = param(factory=RolloutConfig, help="rollout workers")
    learner: LearnerConfig = param(factory=LearnerConfig, help="learner resources")
    rl: RLConfig = param(factory=RLConfig, help="phase 2")
    gkd: GKDConfig = param(factory=GKDConfig, help="the gkd learner")
    ppo: PPOConfig = param(factory=PPOConfig, help="the ppo learner")
    rllib: RLlibConfig = param(factory=RLlibConfig, help="the rllib_ppo algorithm")
    calibration: CalibrationConfig = param(factory=CalibrationConfig, help="budget calibration")
    eval: EvalConfig = param(factory=EvalConfig, help="evaluation")


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------
def _field_names(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)]


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's declared choices and ranges, recursively. Raises :class:`ConfigError`."""
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None:
                continue
            if meta.get("choices") is not None and v not in meta["choices"]:
                raise ConfigError(f"{key}={v!r} is not allowed; allowed values: {meta['choices']}")
            lo, hi, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if (lo is not None and v < lo) or (hi is not None and v > hi) or (gt is not None and v <= gt):
                    rng = " and ".join(s for s in [f">= {lo}" if lo is not None else "",
                                                   f"> {gt}" if gt is not None else "",
                                                   f"<= {hi}" if hi is not None else ""] if s)
                    raise ConfigError(f"{key}={v!r} is out of range; allowed: {rng}")
    if prefix == "":
        from tw_rl.registry import ALGORITHMS, requirements  # the registry is the list of allowed learners

        if cfg.algo not in ALGORITHMS:
            raise ConfigError(f"algo={cfg.algo!r} is unknown; allowed values: {sorted(ALGORITHMS)}")
        if not cfg.budgets:
            raise ConfigError("budgets=[] is empty; give at least one budget in [0, 1]")
        _check_budgets(cfg)
        for role in ("teacher", "student"):
            m = getattr(cfg, role)
            if m.gguf_file and not m.name_or_path:
                raise ConfigError(f"{role}.gguf_file={m.gguf_file!r} names a file inside {role}.name_or_path, which "
                                  f"is not set: give {role}.name_or_path=DIR (the directory holding it)")
        _check_phase0_student(cfg)
        for key, (value, why) in requirements(cfg.algo).items():  # load_config applied them where left unset
            current = _get(cfg, key)
            if current != value:
                raise ConfigError(_conflict(cfg.algo, why, key, current, value))
        for setting, on in (("phase1.refit=true", cfg.phase1.refit),
                            ("rl.call_learner=rollout", cfg.rl.call_learner == "rollout")):
            if on and cfg.student.tau_head != "gate":  # both write a fitted gate (tw_rl/refit.py)
                raise ConfigError(f"{setting} needs student.tau_head=gate (the token head cannot represent the "
                                  f"fitted decision), not student.tau_head={cfg.student.tau_head!r}")
        if cfg.student.tau_head in ("gate", "prompt_gate") and cfg.rl.alpha != 1.0:  # Student.head: Q(<τ>) = u + logsumexp_V Q
            raise ConfigError(f"student.tau_head={cfg.student.tau_head} is written for rl.alpha=1 (its <τ> "
                              f"probability is σ(u) only "
                              f"then); rl.alpha={cfg.rl.alpha} with it would change the call rule silently: use "
                              f"rl.alpha=1 or student.tau_head=token")
        if cfg.rl.dual_estimator == "cost_value" and cfg.rl.value != "learned":
            raise ConfigError(f"rl.dual_estimator=cost_value needs the cost value V_C of rl.value=learned, not "
                              f"rl.value={cfg.rl.value!r}; set rl.dual_estimator=count")
        if cfg.rl.call_learner == "rollout" and not any(b > 0 for b in cfg.budgets):
            raise ConfigError(f"rl.call_learner=rollout needs a positive budget; budgets={list(cfg.budgets)}")


def _check_phase0_student(cfg: "Config") -> None:
    """``pretrain.student_targets=teacher`` only for a student phase 0 trains; ``student.init_layers``: a non-empty,
    strictly increasing list, for a student built in phase 0; when the teacher is built in phase 0 too, of a
    decoder-only kind with that many layers (a given teacher is checked when phase 0 loads it,
    :func:`tw_rl.models.factory.check_init_layers`)."""
    if cfg.pretrain.student_targets == "teacher" and cfg.student.name_or_path:
        raise ConfigError(f"pretrain.student_targets=teacher sets what the phase-0 student trains on, but "
                          f"student.name_or_path={cfg.student.name_or_path!r} gives the student (phase 0 does not "
                          f"train it): unset one of the two")
    layers = cfg.student.init_layers
    if layers is None:
        return
    key = f"student.init_layers={list(layers)}"
    if not layers:
        raise ConfigError(f"{key} is empty: list the teacher's decoder layers the student keeps (e.g. [0, 2]), or "
                          f"leave student.init_layers unset to build student.arch from scratch")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"{key} must list each teacher layer once, in increasing order (the student's layers run "
                          f"in the teacher's order), e.g. {sorted(set(layers))}")
    if cfg.student.name_or_path:
        raise ConfigError(f"{key} builds the student from the teacher in phase 0, but student.name_or_path="
                          f"{cfg.student.name_or_path!r} gives one: unset one of the two")
    if not cfg.teacher.name_or_path:
        arch = cfg.teacher.arch
        if arch.model_type == "t5":
            raise ConfigError(f"{key} needs a decoder-only teacher (llama, qwen2 or gpt2), not teacher.arch."
                              f"model_type=t5: set teacher.arch.model_type or leave student.init_layers unset")
        if layers[-1] >= arch.num_layers:
            raise ConfigError(f"{key}: the teacher built in phase 0 has teacher.arch.num_layers={arch.num_layers} "
                              f"layers (0..{arch.num_layers - 1}); drop layer {layers[-1]} or add teacher layers")


def _check_budgets(cfg: "Config") -> None:
    """``budget_prompt`` has a ``{pct}`` field and no other; every budget is listed once and states a prompt of its
    own (the student reads its budget from the prompt only: 0.124 and 0.125 would both read "12%")."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(cfg.budget_prompt) if f is not None]
    except ValueError as e:
        raise ConfigError(f"budget_prompt={cfg.budget_prompt!r} is not a format string: {e}") from None
    if "pct" not in fields or any(f != "pct" for f in fields):
        raise ConfigError(f"budget_prompt={cfg.budget_prompt!r} must contain {{pct}} (the budget in percent) and no "
                          f"other {{...}} field, e.g. 'teacher budget {{pct}}%: '")
    seen: dict[str, float] = {}
    for b in cfg.budgets:
        if b in seen.values():
            raise ConfigError(f"budgets={list(cfg.budgets)} lists {b:g} twice; give each budget once")
        prompt = budget_prompt(cfg.budget_prompt, b)
        if prompt in seen:
            raise ConfigError(f"budgets={list(cfg.budgets)}: {seen[prompt]:g} and {b:g} give the same prompt "
                              f"{prompt!r} (budget_prompt states whole percents), so the student could not tell them "
                              f"apart; give budgets at least 0.01 apart")
        seen[prompt] = b


def check_device(key: str, device: str) -> "torch.device":
    """``device`` as a torch device, or a :class:`ConfigError` naming ``key`` when it is malformed or asks for a
    CUDA device this machine lacks (checked where the run starts: a config may be written on a machine without
    the GPU it will run on)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{key}={device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"{key}={device!r} but this machine has {n} CUDA device(s) (torch "
                              f"{torch.__version__}); set {key}=cpu or run where the GPU is")
    elif dev.type != "cpu":
        raise ConfigError(f"{key}={device!r}: only cpu and cuda devices are supported")
    return dev


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _conflict(algo: str, why: str, key: str, current: Any, value: Any, where: str = "") -> str:
    return f"algo={algo} {why}; {key}={current!r}{where} conflicts; set {key}={value} or leave it unset"


_UNSET = object()


def _apply_algorithm_requirements(merged: DictConfig, sources: list[tuple[str, DictConfig]]) -> None:
    """The settings the chosen algorithm needs (``tw_rl.algos.requirements``), in place: a key that no source (the
    YAML file, an override) sets takes the algorithm's value; one set explicitly to another value is a
    :class:`ConfigError` naming both keys and where the value came from."""
    from tw_rl.registry import ALGORITHMS, requirements

    algo = merged.algo
    if algo not in ALGORITHMS:
        return  # validate names the unknown algorithm
    for key, (value, why) in requirements(algo).items():
        setters = [name for name, src in sources if OmegaConf.select(src, key, default=_UNSET) is not _UNSET]
        if not setters:
            OmegaConf.update(merged, key, value)
        elif (current := OmegaConf.select(merged, key)) != value:
            raise ConfigError(_conflict(algo, why, key, current, value, f" (from {setters[-1]})"))


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    allowed = ""
    parent = Config()
    for part in str(key).split(".")[:-1]:
        parent = getattr(parent, part, None)
        if not dataclasses.is_dataclass(parent):
            break
    if dataclasses.is_dataclass(parent) and "not in" in msg:
        allowed = f"; known keys here: {_field_names(parent)}"
    return ConfigError(f"{source}: bad config key {key!r}: {msg}{allowed}")


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line: the problem and where (line, column), without the parser's context dump."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge ``path`` (YAML) and ``overrides`` (``key.sub=value``) onto the defaults, apply the settings the chosen
    ``algo`` needs where neither sets them (``tw_rl.algos.REQUIRES``), then validate."""
    merged: DictConfig = OmegaConf.structured(Config)
    sources: list[tuple[str, DictConfig]] = []
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                file_cfg = OmegaConf.load(p)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
            if not isinstance(file_cfg, DictConfig):  # a list, or a scalar
                raise ConfigError(f"config file {p} must be a mapping of keys (e.g. 'rl: {{iterations: 3}}') at its "
                                  f"top level, not a {type(file_cfg).__name__.replace('Config', '').lower()}")
            merged = OmegaConf.merge(merged, file_cfg)
            sources.append((str(p), file_cfg))
    except OmegaConfBaseException as e:
        raise _explain(e, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            item_cfg = OmegaConf.from_dotlist([item])
            merged = OmegaConf.merge(merged, item_cfg)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value {item.partition('=')[2]!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or e}); e.g. budgets=[0,0.2] or rl.iterations=3"
                              ) from None
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {item!r}") from None
        sources.append((f"override {item}", item_cfg))
    _apply_algorithm_requirements(merged, sources)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (``report.json``'s ``config``)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included)."""
    from tw_rl.rundir import atomic_write

    atomic_write(path, to_yaml(cfg))


def given_tokenizer(cfg: "Config") -> Optional[str]:
    """The tokenizer a run is given: ``tokenizer.path``, else the teacher's, else the student's (a directory or hub
    id); None when phase 0 trains one on the data."""
    return cfg.tokenizer.path or cfg.teacher.name_or_path or cfg.student.name_or_path


def training_budgets(cfg: "Config") -> list[float]:
    """The budgets training draws from, uniformly (``budget_sampling``): the grid, or every whole percent from its
    smallest to its largest level with the grid's levels repeated so that they carry about half of the draws (the
    constraint is enforced at the levels, and b = 0 would otherwise be one draw in 51)."""
    grid = sorted(float(b) for b in cfg.budgets)
    if cfg.budget_sampling == "grid":
        return grid
    lo, hi = int(round(100 * grid[0])), int(round(100 * grid[-1]))
    between = sorted({round(k / 100, 2) for k in range(lo, hi + 1)} - set(grid))
    return sorted(between + grid * max(1, round(len(between) / len(grid))))


def prompt_tokens(cfg: "Config", tokenizer: Any) -> int:
    """The longest budget prompt (:func:`budget_prompt`) of any budget training draws (:func:`training_budgets`),
    in tokens, without special tokens."""
    return max(len(tokenizer(budget_prompt(cfg.budget_prompt, b) + cfg.task_prompt,
                             add_special_tokens=False)["input_ids"])
               for b in sorted(set(training_budgets(cfg))))


def source_room(cfg: "Config", tokenizer: Any) -> int:
    """The most tokens a source may have: ``data.max_src_tokens`` less :func:`prompt_tokens`, the room the budget
    prompt takes. The one length rule of the data checks, phase 0, training, evaluation and the dry run (one input
    at a time, :meth:`tw_rl.api.TrainedModel.examples` checks its exact prompted ids instead)."""
    return cfg.data.max_src_tokens - prompt_tokens(cfg, tokenizer)
