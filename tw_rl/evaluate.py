"""Evaluation of a trained run: quality against teacher cost, for Training Wheels and the baselines (SPEC §7).

Rows (``report.json``; every row has the same metrics):

- ``student_only`` / ``teacher_only``: the phase-0 student / the teacher alone, greedy, on the bare source, each
  in tw-rl's own decoding loop (:meth:`TrainedModel.decode_base` without a rule, ``<τ>`` never allowed;
  :func:`tw_rl.decoding.decode_teacher`), the loop that decodes Training Wheels.
- ``tw`` / ``tw_hard_cap``: the trained student deciding its own ``<τ>`` calls at each budget, without / with the
  inference-time hard cap (SPEC §5), with the student's calibrated ``<τ>`` offset of each budget
  (tw_rl/calibration.py). ``tw_uncalibrated`` (when the student is calibrated): the same student with offset 0.
  ``phase1_only``: the phase-1 student the same way (from the driver only).
- ``baselines.random``: the trained student at the same budget prompt, its own ``<τ>`` masked, the teacher called
  at random steps (:func:`tw_rl.baselines.random_calls`) at the rate that gives, on the validation split, the
  usage Training Wheels has on the validation split at that budget (calibrated: calls shorten or lengthen
  outputs, so the rate is not exactly the usage). The target is Training Wheels' *validation* usage (decoded
  greedily with the ``tw`` row's settings, :func:`tw_validation_usage`), so the test split chooses no knob.
- ``baselines.confidence``: the same student calling when its top ``V`` probability is below a threshold
  calibrated on the validation split to the same target (:func:`tw_rl.baselines.calibrate_threshold`).
  ``baselines.confidence_base``: the same rule on the phase-0 student (bare source, no Training Wheels training at
  all): Big Little Decoder's fallback on the plain small model — the simplest way to spend the same teacher tokens.
  All three report ``usage_target`` (Training Wheels' validation usage; ``usage_target_split: "validation"``),
  ``validation_usage`` (their own, at the calibrated knob) and their own usage on the test split.
- ``oracle`` (top level, one row per budget; ``deployable: false``): the ``confidence`` row's student and setting,
  calling where its greedy token differs from the teacher's greedy token for the same prefix and the teacher's
  log-prob gain exceeds a threshold calibrated to the same target (:class:`tw_rl.baselines.OracleCalls`). It reads
  the teacher's distribution at every step; those look-ups are not counted (usage and calls/token count its
  ``<τ>`` only), and the row is not timed (not an operating point anyone can deploy). ``gap_closed`` on the row.
- ``baselines.speculative``: speculative decoding, teacher as target, phase-0 student as draft: first Hugging Face
  assisted generation (lossless), then draft-and-verify decoding at each ``eval.spec_lenience`` (1: lossless,
  smaller: lossy; :func:`tw_rl.baselines.speculative_greedy`). ``matches_teacher``: the fraction of outputs equal
  to the teacher's.

Metrics:

- ``bleu``, ``chrf``: sacrebleu corpus scores (signatures in ``report["signatures"]``); ``rouge1/2/L``: mean
  F-measure × 100 from rouge-score when the task is summarization.
- ``usage_mean`` / ``usage_p95``: teacher-produced tokens / output tokens per sequence (EOS counted), mean and 95th
  percentile over sequences. Teacher alone and lossless speculative decoding: every token is the teacher's (1.0);
  lossy speculative decoding: the tokens that are the teacher's own greedy choice.
- ``calls_per_token``: teacher forward passes / output tokens over the corpus, a pass over ``k`` rows counting
  ``k`` (Training Wheels and the baselines: one per ``<τ>``; teacher alone: one per token; speculative decoding:
  one per verification round).
- ``loop`` on every row: the loop that decoded and timed it (``tw_rl.decoding.decode``,
  ``tw_rl.decoding.decode_teacher``, Hugging Face ``generate`` with an assistant model, or
  ``tw_rl.baselines.speculative_greedy``).
- ``vs_tw`` on every random, confidence, confidence_base, oracle and phase-1 row: its BLEU minus the Training
  Wheels row's at the same budget and the p-value of a paired bootstrap test of that difference (sacrebleu,
  ``eval.bootstrap_samples`` resamples, seeded); ``bleu_ci95`` on every Training Wheels row: its 95 % CI
  half-width.
- ``gap_closed`` per budget: ``(Q_tw(b) − Q_student) / (Q_teacher − Q_student)`` with Q = BLEU (ROUGE-L for
  summarization).
- ``latency_ms``: median wall time of decoding one pre-tokenized input at batch size 1 (``eval.latency_examples``
  inputs × ``eval.latency_repeats``), models already loaded and warmed up by one untimed call, the teacher's
  encoder cache emptied before each timed call, both models on the same device. Tokenization is not timed. All
  rows are timed together in rounds (:func:`timings`), after every quality pass.
- ``throughput_seq_s``: sequences per second decoding a batch of ``eval.throughput_batch_size`` inputs (median of
  ``eval.latency_repeats``). Speculative decoding is batch-size-1 only (Hugging Face's and ours): it decodes a
  batch one sequence after another, so its throughput is ``1000 / mean latency_ms``.

Files (:func:`write_report`, :func:`write_outputs`): ``report.json``, ``report.md`` (one table),
``quality_vs_cost.png`` and ``outputs.jsonl`` (per method, budget and example: source, reference, output, tokens and
which of them the teacher produced).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import sacrebleu
import torch
from tqdm.auto import tqdm

from tw_rl.envs.token_mdp import Example
from tw_rl.baselines import Calibration, OracleCalls, calibrate_threshold, confidence_fallback, oracle_threshold, \
    random_calls, speculative_generate, speculative_greedy
from tw_rl.decoding import Decoded, TeacherSteps, decode_teacher
from tw_rl.examples import pad_batch
from tw_rl.models.student import Student

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel

SUMMARIZATION_SETS = ("xsum", "cnn_dailymail", "cnn", "samsum", "gigaword", "multi_news", "billsum", "summ")


# ------------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------------
def quality(hyps: Sequence[str], refs: Sequence[str], task: str = "translation") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults); plus ROUGE-1/2/L (mean F1 × 100) for summarization."""
    q = {"bleu": round(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, 2),
         "chrf": round(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score, 2)}
    if task == "summarization":
        q.update(rouge(hyps, refs))
    return q


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    return {k: round(100 * float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0, 2)
            for k in ("rouge1", "rouge2", "rougeL")}


def signatures(task: str) -> dict[str, str]:
    """The sacrebleu signature strings of the scores in the report (and the rouge-score settings)."""
    from importlib.metadata import version

    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu.corpus_score(["a"], [["a"]])
    chrf.corpus_score(["a"], [["a"]])
    sig = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
    if task == "summarization":
        sig["rouge"] = f"rouge-score {version('rouge-score')}|F1 mean|use_stemmer:yes|rouge1,rouge2,rougeL"
    return sig


def resolve_task(cfg) -> str:
    """``eval.task``, with ``auto`` read from the data source's name."""
    if cfg.eval.task != "auto":
        return cfg.eval.task
    name = (cfg.data.hf_name or "").lower() if cfg.data.kind == "hf" else ""
    return "summarization" if any(s in name for s in SUMMARIZATION_SETS) else "translation"


def detok(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------------------------
# methods: each decodes one batch of examples
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """Per-example results of one method."""

    tokens: list[list[int]] = field(default_factory=list)  # X_out, EOS included when produced
    teacher_mask: list[np.ndarray] = field(default_factory=list)  # bool per token: the teacher produced it
    teacher_passes: list[int] = field(default_factory=list)  # teacher forward passes spent on the example

    def extend(self, other: "Outputs") -> "Outputs":
        self.tokens += other.tokens
        self.teacher_mask += other.teacher_mask
        self.teacher_passes += other.teacher_passes
        return self

    @staticmethod
    def from_decoded(out: Decoded) -> "Outputs":
        res = Outputs()
        for i in range(len(out.lengths)):
            n = int(out.lengths[i])
            tm = out.teacher_mask[i, :n].copy()
            res.tokens.append(out.tokens[i, :n].tolist())
            res.teacher_mask.append(tm)
            res.teacher_passes.append(int(tm.sum()))
        return res

    @staticmethod
    def all_teacher(tokens: list[list[int]], passes: list[int] | None = None) -> "Outputs":
        return Outputs(tokens, [np.ones(len(t), dtype=bool) for t in tokens],
                       passes if passes is not None else [len(t) for t in tokens])


Method = Callable[[Sequence[Example]], Outputs]


LOOP = "tw_rl.decoding.decode"  # the ``loop`` of every row decoded by the student's KV-cached loop
LOOP_TEACHER = "tw_rl.decoding.decode_teacher"
LOOP_HF_ASSISTED = "transformers.generate(assistant_model=...)"
LOOP_DRAFT_VERIFY = "tw_rl.baselines.speculative_greedy"


def student_alone(model: "TrainedModel", examples: Sequence[Example]) -> Outputs:
    """The phase-0 student, greedy on the bare source, in :func:`tw_rl.decoding.decode` (``<τ>`` masked, no rule:
    :meth:`TrainedModel.decode_base`) — the loop Training Wheels is decoded and timed with."""
    return Outputs.from_decoded(model.decode_base(examples))


def teacher_alone(model: "TrainedModel", examples: Sequence[Example]) -> Outputs:
    """The teacher, greedy on the bare source, in :func:`tw_rl.decoding.decode_teacher` (the same KV-cached loop,
    one teacher position per step; :meth:`Teacher.generate` goes through Hugging Face ``generate``)."""
    teacher = model.teacher
    ids, mask = pad_batch([e.teacher_src for e in examples], model.pad_id, teacher.device)
    return Outputs.from_decoded(decode_teacher(teacher.model, ids, mask, max_len=model.max_len, eos_id=model.eos_id,
                                               vocab_size=teacher.vocab_size, start_id=teacher.start_id,
                                               pad_id=model.pad_id))


def training_wheels(model: "TrainedModel", examples: Sequence[Example], budget: float,
                    hard_cap: bool = False, tau_bias: float | None = None, zero_guard: bool = True) -> Outputs:
    """``tau_bias=None``: the student's calibrated ``<τ>`` offset for ``budget``; 0.0 with ``zero_guard=False``:
    the raw student, ``<τ>`` not masked even at b = 0 (whether it obeys by itself)."""
    return Outputs.from_decoded(model.decode(examples, budget, hard_cap=hard_cap, tau_bias=tau_bias,
                                             zero_guard=zero_guard))


def random_baseline(model: "TrainedModel", budget: float, rate: float, seed: int) -> Method:
    """A fresh seeded generator per method, so the quality pass is reproducible."""
    rule = random_calls(rate, torch.Generator().manual_seed(seed))
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget, rule=rule))


def confidence_baseline(model: "TrainedModel", budget: float, threshold: float) -> Method:
    rule = confidence_fallback(threshold, model.student.tau_id)
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget, rule=rule))


def oracle_rule(model: "TrainedModel", examples: Sequence[Example], threshold: float) -> OracleCalls:
    """:class:`tw_rl.baselines.OracleCalls` for one batch: the teacher stepped along the batch's bare sources."""
    teacher = model.teacher
    ids, mask = pad_batch([e.teacher_src for e in examples], model.pad_id, teacher.device)
    steps = TeacherSteps(teacher.model, ids, mask, teacher.vocab_size, teacher.start_id)
    return OracleCalls(threshold, model.student.tau_id, steps)


def oracle_baseline(model: "TrainedModel", budget: float, threshold: float) -> Method:
    """The trained student at ``budget``'s prompt, its own ``<τ>`` masked (as :func:`confidence_baseline`), calling
    where the oracle's gain exceeds ``threshold`` (a fresh rule per batch: it follows that batch's prefixes)."""
    return lambda examples: Outputs.from_decoded(model.decode(examples, budget,
                                                              rule=oracle_rule(model, examples, threshold)))


def base_confidence_baseline(model: "TrainedModel", threshold: float) -> Method:
    """The phase-0 student (no Training Wheels training, bare source) calling the teacher when its top-token
    probability is below ``threshold``: Big Little Decoder's fallback on the plain small model."""
    rule = confidence_fallback(threshold, model.base_as_student.tau_id)
    return lambda examples: Outputs.from_decoded(model.decode_base(examples, rule=rule))


def speculative(model: "TrainedModel", examples: Sequence[Example]) -> Outputs:
    """Lossless speculative decoding, one example at a time (assisted generation is batch-size-1 only)."""
    tokens, passes = [], []
    for e in examples:
        toks, n = speculative_generate(model.teacher.model, model.base_student, e.teacher_src, model.max_len,
                                       model.eos_id)
        tokens.append(toks)
        passes.append(n)
    return Outputs.all_teacher(tokens, passes)


def speculative_lenient(model: "TrainedModel", examples: Sequence[Example], lenience: float) -> Outputs:
    """Draft-and-verify speculative decoding (lossless at ``lenience = 1``), one example at a time; a token the
    target accepted without it being its own greedy choice counts as the draft's."""
    out = Outputs()
    for e in examples:
        s = speculative_greedy(model.teacher.model, model.base_student, e.teacher_src, model.max_len, model.eos_id,
                               model.start_id, model.cfg.eval.spec_draft_tokens, lenience)
        out.tokens.append(s.tokens)
        out.teacher_mask.append(np.array(s.from_teacher, dtype=bool))
        out.teacher_passes.append(s.teacher_passes)
    return out


def run(method: Method, examples: Sequence[Example], batch_size: int) -> Outputs:
    out = Outputs()
    for i in range(0, len(examples), batch_size):
        out.extend(method(examples[i:i + batch_size]))
    return out


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------
def _cold(model: "TrainedModel") -> None:
    """Forget the teacher's cached encoder and decoder states: a timed input must not profit from an earlier repeat."""
    clear = getattr(model.teacher, "clear_cache", None)
    if clear is not None:
        clear()


def timings(jobs: Sequence[Callable[[], Method]], model: "TrainedModel", examples: Sequence[Example],
            repeats: int, batch_size: int, sequential: Sequence[bool] | None = None
            ) -> list[tuple[float | None, float | None]]:
    """Latency (median ms per input at batch size 1) and throughput (sequences/s decoding ``batch_size`` inputs at
    once, the examples repeated to fill the batch; median of ``repeats``) of every job.

    Models are loaded before this is called and every method is warmed up by one untimed call. The measurement
    runs in rounds — each round times every job once on every input — so that a burst of load from elsewhere on
    the machine falls on all jobs alike instead of on one. A ``sequential`` job decodes a batch one input after
    another (speculative decoding): its throughput is ``1 / mean latency``, the same quantity without decoding the
    batch again.
    """
    if not examples:
        return [(None, None)] * len(jobs)
    sequential = list(sequential) if sequential is not None else [False] * len(jobs)
    methods = [make() for make in jobs]
    for method in methods:
        method(examples[:1])  # warm-up: lazy initialisation, allocator
    batch = [examples[i % len(examples)] for i in range(batch_size)]
    lat: list[list[float]] = [[] for _ in jobs]
    thr: list[list[float]] = [[] for _ in jobs]
    for _ in range(repeats):
        for k, method in enumerate(methods):
            for e in examples:
                lat[k].append(_timed(model, method, [e]))
            if not sequential[k]:
                thr[k].append(_timed(model, method, batch))
    return [(round(1000 * statistics.median(a), 3),
             round(1 / statistics.mean(a) if seq else batch_size / statistics.median(b), 2))
            for a, b, seq in zip(lat, thr, sequential)]


def _timed(model: "TrainedModel", method: Method, examples: Sequence[Example]) -> float:
    _cold(model)
    _sync(model)
    t0 = time.perf_counter()
    method(examples)
    _sync(model)
    return time.perf_counter() - t0


def _sync(model: "TrainedModel") -> None:
    """Wait for queued GPU work, so that a timing holds only its own (no-op on the CPU)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def latency_ms(make: Callable[[], Method], model: "TrainedModel", examples: Sequence[Example],
               repeats: int) -> float | None:
    """Median wall time (ms) of decoding one input at batch size 1 (see :func:`timings`)."""
    return timings([make], model, examples, repeats, 1)[0][0]


# ------------------------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _Evaluation:
    """Holds what every row needs: :meth:`row` decodes the test set with one method and scores it; :meth:`time`
    then measures latency and throughput of every row together (:func:`timings`)."""

    model: "TrainedModel"
    test: Sequence[Example]
    task: str
    records: list[dict] = field(default_factory=list)
    bar: Any = None
    jobs: list[tuple[dict, Callable[[], Method], bool]] = field(default_factory=list)
    hyps: dict[tuple[str, float | None], list[str]] = field(default_factory=dict)  # detokenized outputs per row
    rows: dict[tuple[str, float | None], dict] = field(default_factory=dict)

    def row(self, method: str, make: Callable[[], Method], budget: float | None = None,
            keep_outputs: bool = True, sequential: bool = False, loop: str = LOOP, timed: bool = True,
            **extra) -> tuple[dict, Outputs]:
        """``sequential``: the method decodes one input at a time whatever the batch (see :func:`timings`);
        ``loop``: the decoding loop the method runs (the row's ``loop``); ``timed=False``: no latency or
        throughput (they stay None)."""
        if self.bar is not None:
            self.bar.set_postfix_str(method + (f" b={budget:g}" if budget is not None else ""))
        outs = run(make(), self.test, self.model.cfg.eval.batch_size)
        hyps = detok(self.model.tokenizer, outs.tokens)
        row = {"method": method, **({"budget": budget} if budget is not None else {}),
               **score(outs, self.test, self.model.tokenizer, self.task, hyps), **extra, "loop": loop,
               "latency_ms": None, "throughput_seq_s": None}
        if timed:
            self.jobs.append((row, make, sequential))
        self.hyps[(method, budget)] = hyps
        self.rows[(method, budget)] = row
        if keep_outputs:
            self.records += records(method, budget, self.test, outs, self.model.tokenizer, hyps)
        if self.bar is not None:
            self.bar.update()
        return row, outs

    def time(self) -> None:
        """Fill in ``latency_ms`` and ``throughput_seq_s`` of every row."""
        ecfg = self.model.cfg.eval
        if self.bar is not None:
            self.bar.set_postfix_str("latency and throughput")
        measured = timings([make for _, make, _ in self.jobs], self.model, self.test[:ecfg.latency_examples],
                           ecfg.latency_repeats, ecfg.throughput_batch_size, [seq for _, _, seq in self.jobs])
        for (row, _, _), (lat, thr) in zip(self.jobs, measured):
            row["latency_ms"], row["throughput_seq_s"] = lat, thr
        if self.bar is not None:
            self.bar.update()


def usages(outs: Outputs) -> list[float]:
    """Teacher-produced tokens ÷ output tokens, per sequence."""
    return [float(m.sum()) / max(1, len(m)) for m in outs.teacher_mask]


def score(outs: Outputs, examples: Sequence[Example], tokenizer, task: str = "translation",
          hyps: list[str] | None = None) -> dict:
    """Quality, usage (mean, p95) and teacher calls per token of one method's outputs (``hyps``: their detokenized
    text, when the caller has it already)."""
    hyps = detok(tokenizer, outs.tokens) if hyps is None else hyps
    usage = usages(outs) or [0.0]
    n_tokens = sum(len(t) for t in outs.tokens)
    return {**quality(hyps, [e.reference for e in examples], task),
            "usage_mean": round(float(np.mean(usage)), 4), "usage_p95": round(float(np.percentile(usage, 95)), 4),
            "calls_per_token": round(sum(outs.teacher_passes) / max(1, n_tokens), 4),
            "length_mean": round(n_tokens / max(1, len(outs.tokens)), 2)}


def records(method: str, budget: float | None, examples: Sequence[Example], outs: Outputs, tokenizer,
            hyps: list[str] | None = None) -> list[dict]:
    """``outputs.jsonl`` rows: ``tokens`` are the tokenizer's pieces, ``teacher_tokens`` indices into them."""
    hyps = detok(tokenizer, outs.tokens) if hyps is None else hyps
    return [{"method": method, "budget": budget, "index": i, "source": e.text, "reference": e.reference,
             "output": h, "tokens": tokenizer.convert_ids_to_tokens(t),
             "teacher_tokens": [int(j) for j in np.flatnonzero(m)]}
            for i, (e, h, t, m) in enumerate(zip(examples, hyps, outs.tokens, outs.teacher_mask))]


def evaluate(model: "TrainedModel", test: Sequence[Example], validation: Sequence[Example] = (), *,
             budgets: Sequence[float] | None = None, phase1_student: Student | None = None, split: str = "test",
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Every row of the module docstring on ``test`` at ``budgets`` (default: the trained grid); the random-call
    rate, the confidence thresholds and the oracle's threshold are calibrated on ``validation`` to Training Wheels'
    usage there. Returns the report (``report.json``) and the ``outputs.jsonl`` records."""
    cfg = model.cfg
    budgets = [model.check_budget(b) for b in (cfg.budgets if budgets is None else budgets)]
    task = resolve_task(cfg)
    main = "rougeL" if task == "summarization" else "bleu"
    test = list(test)
    n_rows = 2 + 2 * len(budgets) + (len(budgets) if phase1_student is not None else 0) \
        + (len(budgets) if model.student.tau_bias else 0) \
        + (4 * len(budgets) + 1 + len(cfg.eval.spec_lenience) if cfg.eval.baselines else 0)
    with tqdm(total=n_rows + 1, desc="eval", unit="step", disable=not progress) as bar:
        ev = _Evaluation(model, test, task, bar=bar)
        student_row, _ = ev.row("student", lambda: partial(student_alone, model))
        teacher_row, teacher_outs = ev.row("teacher", lambda: partial(teacher_alone, model), loop=LOOP_TEACHER)
        tw = [ev.row("tw", lambda b=b: partial(training_wheels, model, budget=b), b)[0] for b in budgets]
        capped = [ev.row("tw_hard_cap", lambda b=b: partial(training_wheels, model, budget=b, hard_cap=True), b)[0]
                  for b in budgets]
        report: dict[str, Any] = {"n_examples": len(test), "split": split, "task": task, "student_only": student_row,
                                  "teacher_only": teacher_row, "tw": tw, "tw_hard_cap": capped}
        if model.student.tau_bias:  # calibrated: also the raw student (offset 0, no b = 0 mask), as it reads its prompt
            report["tw_uncalibrated"] = [
                ev.row("tw_uncalibrated", lambda b=b: partial(training_wheels, model, budget=b, tau_bias=0.0,
                                                              zero_guard=False), b,
                       keep_outputs=False, zero_guard=False)[0] for b in budgets]
        if phase1_student is not None:
            p1 = model.with_student(phase1_student)
            report["phase1_only"] = [ev.row("phase1", lambda b=b: partial(training_wheels, p1, budget=b), b,
                                            keep_outputs=False)[0] for b in budgets]
        if cfg.eval.baselines:
            bar.set_postfix_str("Training Wheels on validation")
            targets = {b: tw_validation_usage(model, validation, b) for b in budgets}
            report["baselines"] = baselines(ev, budgets, targets, validation, teacher_outs)
            report["oracle"] = oracle_rows(ev, budgets, targets, validation, (student_row[main], teacher_row[main]),
                                           main)
        else:
            report["baselines"] = {"random": [], "confidence": [], "speculative": None}
        if cfg.eval.bootstrap_samples > 0:
            compare_to_tw(ev, budgets, [e.reference for e in test], cfg.eval.bootstrap_samples)
        ev.time()
    report["gap_closed"] = gap_closed(tw, student_row[main], teacher_row[main], main)
    report["signatures"] = signatures(task)
    report["latency"] = {"batch_size": 1, "examples": min(len(test), cfg.eval.latency_examples),
                         "repeats": cfg.eval.latency_repeats, "throughput_batch_size": cfg.eval.throughput_batch_size,
                         "device": str(model.device), "torch_threads": torch.get_num_threads()}
    return report, ev.records


COMPARED = ("random", "confidence", "confidence_base", "oracle", "phase1")  # rows tested against Training Wheels


def paired_bootstrap(baseline: Sequence[str], systems: dict[str, Sequence[str]], references: Sequence[str],
                     n_samples: int) -> tuple[float, dict[str, dict]]:
    """sacrebleu's paired bootstrap resampling of corpus BLEU (Koehn 2004; seeded, so reproducible): for each of
    ``systems``, its BLEU minus ``baseline``'s and the two-sided p-value of that difference (the share of resamples
    whose centred |difference| exceeds the observed one). Returns the baseline's 95 % CI half-width and the
    comparisons."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    named = [("baseline", list(baseline))] + [(k, list(v)) for k, v in systems.items()]
    _, scores = PairedTest(named, {"BLEU": BLEU()}, [list(references)], test_type="bs", n_samples=n_samples)()
    base, *rest = scores["BLEU"]
    # outputs identical to the baseline's (e.g. phase 1 at b = 0 when phase 2 trained only <τ>): sacrebleu's strict
    # count would report the smallest p-value, 1/(n + 1); there is no difference to test
    return float(base.ci), {k: {"bleu_delta": round(float(r.score - base.score), 2),
                                "p_value": 1.0 if list(systems[k]) == list(baseline) else round(float(r.p_value), 4)}
                            for k, r in zip(systems, rest)}


def compare_to_tw(ev: _Evaluation, budgets: Sequence[float], references: Sequence[str], n_samples: int) -> None:
    """At every budget, each row of :data:`COMPARED` against the Training Wheels row: ``vs_tw`` (BLEU difference
    and paired-bootstrap p-value) on the row, ``bleu_ci95`` on the Training Wheels row."""
    for b in budgets:
        others = {m: ev.hyps[(m, b)] for m in COMPARED if (m, b) in ev.hyps}
        if ("tw", b) not in ev.hyps or not others:
            continue
        ci, vs = paired_bootstrap(ev.hyps[("tw", b)], others, references, n_samples)
        ev.rows[("tw", b)]["bleu_ci95"] = round(ci, 2)
        for m, result in vs.items():
            ev.rows[(m, b)]["vs_tw"] = result


def tw_validation_usage(model: "TrainedModel", validation: Sequence[Example], budget: float) -> float:
    """Training Wheels' mean usage on ``validation`` at ``budget`` (greedy, the ``tw`` row's settings: the
    calibrated ``<τ>`` offset, no hard cap): the usage every baseline is calibrated to, so that the test split
    chooses no baseline's knob."""
    if not validation:
        if budget == 0:
            return 0.0  # the student never calls at b = 0 (TrainedModel.decode)
        raise ValueError("calibrating a baseline to the Training Wheels usage needs validation examples "
                         "(data.validation_split); or set eval.baselines=false")
    outs = run(partial(training_wheels, model, budget=budget), validation, model.cfg.eval.batch_size)
    return round(float(np.mean(usages(outs))), 4)


def _target(target: float, cal: Calibration) -> dict:
    """The calibration fields every calibrated row carries."""
    return {"validation_usage": round(cal.usage, 4), "calibration_steps": cal.evaluations, "usage_target": target,
            "usage_target_split": "validation"}


def baselines(ev: _Evaluation, budgets: Sequence[float], targets: dict[float, float], validation: Sequence[Example],
              teacher_outs: Outputs) -> dict:
    """Random calls and confidence fallback at each budget, their rate and threshold calibrated on ``validation`` to
    ``targets[b]`` (Training Wheels' validation usage, :func:`tw_validation_usage`); speculative decoding."""
    model, cfg = ev.model, ev.model.cfg
    rand, conf, conf_base = [], [], []
    for k, b in enumerate(budgets):
        target, seed = targets[b], cfg.seed + 7919 * (k + 1)
        cal = calibrate(lambda rate, b=b, s=seed: random_baseline(model, b, rate, s), validation, target,
                        cfg.eval.batch_size)
        row, _ = ev.row("random", lambda b=b, rate=cal.threshold, s=seed: random_baseline(model, b, rate, s), b,
                        rate=round(cal.threshold, 6), **_target(target, cal))
        rand.append(row)
        cal = calibrate(lambda th, b=b: confidence_baseline(model, b, th), validation, target, cfg.eval.batch_size)
        row, _ = ev.row("confidence", lambda b=b, th=cal.threshold: confidence_baseline(model, b, th), b,
                        threshold=round(cal.threshold, 6), **_target(target, cal))
        conf.append(row)
        cal = calibrate(lambda th: base_confidence_baseline(model, th), validation, target, cfg.eval.batch_size)
        row, _ = ev.row("confidence_base", lambda th=cal.threshold: base_confidence_baseline(model, th), b,
                        threshold=round(cal.threshold, 6), **_target(target, cal), student="phase-0")
        conf_base.append(row)
    spec = []
    for lenience in [None, *cfg.eval.spec_lenience]:  # None: Hugging Face assisted generation
        if lenience is None:
            row, outs = ev.row("speculative", lambda: partial(speculative, model), sequential=True,
                               loop=LOOP_HF_ASSISTED, draft="phase-0 student", implementation="hf_assisted",
                               lossless=True)
        else:
            row, outs = ev.row("speculative_lenient", lambda l=lenience: partial(speculative_lenient, model,
                                                                                 lenience=l),
                               keep_outputs=False, sequential=True, loop=LOOP_DRAFT_VERIFY,
                               draft="phase-0 student", implementation="draft_verify",
                               lenience=lenience, draft_tokens=cfg.eval.spec_draft_tokens, lossless=lenience == 1.0)
        row["matches_teacher"] = round(float(np.mean([a == b for a, b in zip(outs.tokens, teacher_outs.tokens)]))
                                       if outs.tokens else 1.0, 4)
        spec.append(row)
    return {"random": rand, "confidence": conf, "confidence_base": conf_base, "speculative": spec}


def oracle_rows(ev: _Evaluation, budgets: Sequence[float], targets: dict[float, float],
                validation: Sequence[Example], student_teacher: tuple[float, float], metric: str = "bleu"
                ) -> list[dict]:
    """The oracle caller at each budget (:func:`oracle_baseline`), its gain threshold calibrated on ``validation``
    to ``targets[b]``; ``student_teacher`` = (Q_student, Q_teacher) for its ``gap_closed``. Not timed."""
    model, cfg = ev.model, ev.model.cfg
    rows = []
    for b in budgets:
        # the knob x ∈ [0, 1] is exp(−threshold): usage rises with x, as calibrate() expects
        cal = calibrate(lambda x, b=b: oracle_baseline(model, b, oracle_threshold(x)), validation, targets[b],
                        cfg.eval.batch_size)
        threshold = oracle_threshold(cal.threshold)
        row, _ = ev.row("oracle", lambda b=b, th=threshold: oracle_baseline(model, b, th), b, timed=False,
                        threshold=round(threshold, 6) if math.isfinite(threshold) else None,
                        threshold_ratio=round(cal.threshold, 8), **_target(targets[b], cal), deployable=False,
                        note="calls where the student's greedy token differs from the teacher's greedy token and "
                             "log π_T(w*) − log π_T(student's token) > threshold; the teacher's distribution is "
                             "read at every step and those look-ups are not counted as calls; not timed")
        row["gap_closed"] = gap_of(row[metric], *student_teacher)
        rows.append(row)
    return rows


def calibrate(make: Callable[[float], Method], validation: Sequence[Example], target: float, batch_size: int,
              tol: float = 0.01) -> Calibration:
    """The knob ``x ∈ [0, 1]`` (a random-call rate, a confidence threshold) at which the method ``make(x)`` has
    mean usage ``target ± tol`` on ``validation`` (bisection, :func:`tw_rl.baselines.calibrate_threshold`)."""
    if target > 0 and not validation:
        raise ValueError("calibrating a baseline to the Training Wheels usage needs validation examples "
                         "(data.validation_split); or set eval.baselines=false")

    def usage_at(x: float) -> float:
        return float(np.mean(usages(run(make(x), validation, batch_size))))

    return calibrate_threshold(usage_at, target, tol)


def calibrate_confidence(model: "TrainedModel", validation: Sequence[Example], budget: float, target: float,
                         tol: float = 0.01) -> Calibration:
    """The confidence threshold whose mean usage on ``validation`` is ``target ± tol``."""
    return calibrate(lambda th: confidence_baseline(model, budget, th), validation, target,
                     model.cfg.eval.batch_size, tol)


# ------------------------------------------------------------------------------------------------------------------
def gap_closed(tw_rows: list[dict], student_score: float, teacher_score: float, metric: str = "bleu"
               ) -> dict[str, float | None]:
    """``(Q_tw(b) − Q_student) / (Q_teacher − Q_student)`` for every budget, Q = ``metric`` (None when the teacher is
    not better than the student: there is no gap to close)."""
    return {f"{r['budget']:g}": gap_of(r[metric], student_score, teacher_score) for r in tw_rows}


def gap_of(score: float, student_score: float, teacher_score: float) -> float | None:
    """``(Q − Q_student) / (Q_teacher − Q_student)``; None without a gap."""
    gap = teacher_score - student_score
    return round((score - student_score) / gap, 4) if gap > 0 else None


# ------------------------------------------------------------------------------------------------------------------
# the report's schema and files
# ------------------------------------------------------------------------------------------------------------------
_METRICS = ("bleu", "chrf", "usage_mean", "usage_p95", "calls_per_token", "latency_ms", "throughput_seq_s")
_ROW = {"type": "object", "required": ["method", "loop", *_METRICS],
        "properties": {"method": {"type": "string"}, "loop": {"type": "string"},
                       "bleu": {"type": "number", "minimum": 0},
                       "chrf": {"type": "number", "minimum": 0},
                       **{k: {"type": "number", "minimum": 0, "maximum": 100} for k in ("rouge1", "rouge2", "rougeL")},
                       "usage_mean": {"type": "number", "minimum": 0, "maximum": 1},
                       "usage_p95": {"type": "number", "minimum": 0, "maximum": 1},
                       "calls_per_token": {"type": "number", "minimum": 0},
                       "latency_ms": {"type": ["number", "null"], "minimum": 0},
                       "throughput_seq_s": {"type": ["number", "null"], "minimum": 0},
                       "budget": {"type": "number", "minimum": 0, "maximum": 1},
                       "bleu_ci95": {"type": "number", "minimum": 0},
                       "vs_tw": {"type": "object", "required": ["bleu_delta", "p_value"],
                                 "properties": {"bleu_delta": {"type": "number"},
                                                "p_value": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}}}}
_BUDGET_ROWS = {"type": "array", "items": {"allOf": [_ROW, {"required": ["budget"]}]}}
_CALIBRATED = ["budget", "validation_usage", "usage_target", "usage_target_split", "calibration_steps"]
REPORT_SCHEMA = {
    "type": "object",
    "required": ["n_examples", "split", "task", "student_only", "teacher_only", "tw", "tw_hard_cap", "baselines",
                 "gap_closed", "signatures", "latency"],
    "properties": {
        "n_examples": {"type": "integer", "minimum": 0}, "split": {"type": "string"},
        "task": {"enum": ["translation", "summarization"]},
        "student_only": _ROW, "teacher_only": _ROW, "tw": _BUDGET_ROWS, "tw_hard_cap": _BUDGET_ROWS,
        "phase1_only": _BUDGET_ROWS, "tw_uncalibrated": _BUDGET_ROWS,
        "baselines": {"type": "object", "required": ["random", "confidence", "speculative"], "properties": {
            "random": {"type": "array", "items": {"allOf": [_ROW, {"required": ["rate", *_CALIBRATED]}]}},
            "confidence": {"type": "array", "items": {"allOf": [_ROW, {"required": ["threshold", *_CALIBRATED]}]}},
            "confidence_base": {"type": "array", "items": {"allOf": [_ROW, {"required": [
                "threshold", *_CALIBRATED]}]}},
            "speculative": {"anyOf": [{"type": "null"}, _ROW, {"type": "array", "items": _ROW}]}}},
        "oracle": {"type": "array", "items": {"allOf": [_ROW, {
            "required": ["threshold", "threshold_ratio", "deployable", "gap_closed", *_CALIBRATED],
            "properties": {"deployable": {"const": False}, "threshold": {"type": ["number", "null"], "minimum": 0},
                           "gap_closed": {"type": ["number", "null"]}}}]}},
        "gap_closed": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "signatures": {"type": "object", "required": ["bleu", "chrf"],
                       "additionalProperties": {"type": "string"}},
        "latency": {"type": "object", "required": ["batch_size", "examples", "repeats", "throughput_batch_size",
                                                   "device"]},
    },
}


def validate_report(report: dict) -> None:
    """Raise ``ValueError`` naming the first place where ``report`` does not follow :data:`REPORT_SCHEMA`."""
    import jsonschema

    try:
        jsonschema.validate(report, REPORT_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"report.json does not follow the schema at {where}: {e.message}") from None


def write_outputs(out_dir: Path, rows: Sequence[dict]) -> Path:
    from tw_rl.manifest import atomic_write

    return atomic_write(Path(out_dir) / "outputs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                 for r in rows))


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    """``report.json``, ``report.md`` and (when the report has the baselines' schema) ``quality_vs_cost.png``."""
    from tw_rl.manifest import atomic_file, atomic_write

    run_dir = Path(run_dir)
    md = markdown(report)  # everything rendered before the first file is replaced
    if "baselines" in report:
        with atomic_file(run_dir / "quality_vs_cost.png") as tmp:
            plot(report, tmp)
    atomic_write(run_dir / "report.md", md)
    atomic_write(run_dir / "report.json", json.dumps(report, indent=2))
    return run_dir / "report.json", run_dir / "report.md"


_NAMES = {"student": "student alone", "teacher": "teacher alone", "speculative": "speculative decoding",
          "speculative_lenient": "speculative decoding",
          "tw": "**Training Wheels**", "tw_hard_cap": "Training Wheels + hard cap",
          "tw_uncalibrated": "Training Wheels, <τ> offset 0", "random": "random calls",
          "confidence": "confidence fallback", "confidence_base": "confidence fallback, phase-0 student",
          "oracle": "oracle caller (not deployable)", "phase1": "phase 1 only (no RL)"}


def _calibrated(r: dict) -> str:
    """The note on a calibrated row: what it reached on validation, and the target."""
    target = r.get("usage_target")
    split = r.get("usage_target_split", "test")
    return f"validation usage {r['validation_usage']:g}" + (
        f", target {target:g} = Training Wheels' {split} usage" if target is not None else "")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    """One table: every method, and per budget Training Wheels and the baselines at the same usage."""
    rouge_cols = report.get("task") == "summarization"
    main = "rougeL" if rouge_cols else "bleu"
    cols = ["method", "budget", "BLEU", "chrF"] + (["R-1", "R-2", "R-L"] if rouge_cols else []) + [
        "usage mean", "usage p95", "calls/token", "latency ms (bs 1)", "seq/s (bs 32)", "notes"]
    keys = ["bleu", "chrf"] + (["rouge1", "rouge2", "rougeL"] if rouge_cols else []) + [
        "usage_mean", "usage_p95", "calls_per_token", "latency_ms", "throughput_seq_s"]
    lines = ["# tw-rl report", "",
             f"{report.get('n_examples')} examples of the `{report.get('split', 'test')}` split; greedy decoding. "
             f"Usage = teacher tokens / output tokens; calls/token = teacher forward passes / output tokens.", ""]
    if report.get("latency"):
        lat = report["latency"]
        cols[-2] = f"seq/s (bs {lat.get('throughput_batch_size', 32)})"
        lines += [f"Latency: median of {lat.get('examples')} inputs × {lat.get('repeats')} repeats at batch size 1 "
                  f"on {lat.get('device')}, models loaded beforehand.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 3) + "---|"]

    def line(r: dict, note: str = "") -> None:
        name = _NAMES.get(r.get("method", "tw"), r.get("method", ""))
        if "vs_tw" in r:  # paired bootstrap against Training Wheels at this budget
            vs = f"BLEU {r['vs_tw']['bleu_delta']:+.2f} vs Training Wheels (p = {r['vs_tw']['p_value']:.3g})"
            note = f"{note}; {vs}" if note else vs
        lines.append("| " + " | ".join([name, _fmt(r.get("budget"))] + [_fmt(r.get(k)) for k in keys] + [note])
                     + " |")

    line(report["student_only"])
    line(report["teacher_only"])
    bl = report.get("baselines", {})
    spec = bl.get("speculative")
    for s in ([spec] if isinstance(spec, dict) else spec or []):
        how = (f"draft-and-verify, lenience {s['lenience']:g}, {s.get('draft_tokens')} draft tokens"
               if "lenience" in s else "Hugging Face assisted generation")
        line(s, f"{how}; draft: {s.get('draft', '')}; same output as teacher: {s.get('matches_teacher', '–')}")
    by_budget = ({r["budget"]: r for r in bl.get("random", [])}, {r["budget"]: r for r in bl.get("confidence", [])},
                 {r["budget"]: r for r in bl.get("confidence_base", [])})
    oracle = {r["budget"]: r for r in report.get("oracle", [])}
    capped = {r["budget"]: r for r in report.get("tw_hard_cap", [])}
    p1 = {r["budget"]: r for r in report.get("phase1_only", [])}
    raw = {r["budget"]: r for r in report.get("tw_uncalibrated", [])}
    offsets = {c["budget"]: c for c in (report.get("calibration") or {}).get("final", [])}
    for r in report["tw"]:
        b = r["budget"]
        closed = report.get("gap_closed", {}).get(f"{b:g}")
        notes = [f"gap closed {closed:g}"] if closed is not None else []
        if "bleu_ci95" in r:
            notes.append(f"BLEU 95 % CI ±{r['bleu_ci95']:g}")
        if b in offsets and b > 0:
            notes.append(f"<τ> offset {offsets[b]['bias']:+.3g} (validation usage {offsets[b]['usage']:g})")
        line(r, "; ".join(notes))
        if b in capped:
            line(capped[b])
        if b in raw:
            line(raw[b])
        if b in by_budget[0]:
            rr = by_budget[0][b]
            line(rr, f"rate {rr['rate']:.4g} ({_calibrated(rr)})")
        if b in by_budget[1]:
            c = by_budget[1][b]
            line(c, f"threshold {c['threshold']:.4g} ({_calibrated(c)})")
        if b in by_budget[2]:
            c = by_budget[2][b]
            line(c, f"threshold {c['threshold']:.4g} ({_calibrated(c)})")
        if b in oracle:
            o = oracle[b]
            gain = "never calls" if o["threshold"] is None else f"gain threshold {o['threshold']:.4g} nats"
            closed = f"; gap closed {o['gap_closed']:g}" if o.get("gap_closed") is not None else ""
            line(o, f"calls where its token ≠ the teacher's, {gain} ({_calibrated(o)}); reads the teacher at every "
                    f"step (not counted), not timed{closed}")
        if b in p1:
            line(p1[b])
    lines.append("")
    sig = report.get("signatures", {})
    if sig:
        lines += ["Signatures: " + "; ".join(f"{k} `{v}`" for k, v in sig.items()), ""]
    if rouge_cols:
        lines += [f"Quality column of the plot: {main}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Quality against teacher calls per token (left) and against latency at batch size 1 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "rougeL" if report.get("task") == "summarization" else "bleu"
    label = "ROUGE-L" if metric == "rougeL" else "BLEU"
    bl = report.get("baselines", {})
    spec = bl.get("speculative")
    spec_rows = [spec] if isinstance(spec, dict) else list(spec or [])
    curves = [("Training Wheels", report["tw"], dict(color="C0", marker="o", lw=2.2)),
              ("Training Wheels + hard cap", report.get("tw_hard_cap", []), dict(color="C0", marker="o", ls="--",
                                                                                 mfc="white", alpha=0.7)),
              ("random calls (same usage)", bl.get("random", []), dict(color="C3", marker="x", ls=":")),
              ("confidence fallback (same usage)", bl.get("confidence", []), dict(color="C2", marker="^", ls="-.")),
              ("confidence fallback, phase-0 student", bl.get("confidence_base", []),
               dict(color="C4", marker="v", ls="-.")),
              ("oracle caller (not deployable)", report.get("oracle", []), dict(color="C5", marker="P", ls=":"))]
    points = [("student alone", report["student_only"], dict(color="k", marker="s")),
              ("teacher alone", report["teacher_only"], dict(color="k", marker="*", ms=14))]
    points += [("speculative decoding (HF assisted, lossless)", s, dict(color="C1", marker="D", ms=9))
               for s in spec_rows if "lenience" not in s]
    lenient = [s for s in spec_rows if "lenience" in s]
    curves.append(("speculative draft-and-verify (lenience)", lenient, dict(color="C1", marker="d", ls="--")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x, xlabel in ((axes[0], "calls_per_token", "teacher calls (forward passes) per output token"),
                          (axes[1], "latency_ms", "latency per sequence, batch size 1 (ms)")):
        for name, rows, style in curves:
            rows = [r for r in rows if r.get(x) is not None]
            if x == "latency_ms":  # latency need not be monotone in the budget: points (labelled) only
                style = dict(style, ls="none")
            if rows:
                ax.plot([r[x] for r in rows], [r[metric] for r in rows], label=name, **style)
        for key, rows, color in (("b", report["tw"], "C0"), ("l", lenient, "C1")):
            for i, r in enumerate(rows):
                if r.get(x) is not None:
                    v = r["budget" if key == "b" else "lenience"]
                    # the lenience points sit close together: stagger their labels above and below
                    dy = 5 if key == "b" else (5, -12, 15, -22)[i % 4]
                    ax.annotate(f"{key}={v:g}", (r[x], r[metric]), textcoords="offset points", xytext=(4, dy),
                                fontsize=8, color=color)
        for name, r, style in points:
            if r.get(x) is not None:
                ax.plot([r[x]], [r[metric]], ls="none", label=name, **style)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{label} vs teacher cost")
    axes[1].set_title(f"{label} vs latency")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"quality vs cost — {report.get('n_examples')} examples of the {report.get('split', 'test')} split")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
