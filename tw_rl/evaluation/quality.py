"""Quality of a row's outputs (SPEC §7): corpus BLEU and chrF (sacrebleu), ROUGE-1/2/L for summarization, exact
match of the final answer for math word problems (GSM8K), answer accuracy for short-answer questions (a reference
answer found in the output), the signatures of those scores, the paired bootstrap test of a row against Training
Wheels, and the gap closed."""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import numpy as np
import sacrebleu


def quality(hyps: Sequence[str], refs: Sequence[str], task: str = "translation") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults); plus ROUGE-1/2/L (mean F1 × 100) for summarization, and the exact
    match of the final answer (% of outputs, :func:`final_answer`) for math, the answer accuracy (% of outputs,
    :func:`answer_found`) for qa."""
    q = {"bleu": round(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, 2),
         "chrf": round(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score, 2)}
    if task == "summarization":
        q.update(rouge(hyps, refs))
    if task in MATCH_METRIC:
        q[MATCH_METRIC[task]] = match_rate(task, hyps, refs)
    return q


# the per-output score of a task, in % of outputs: its key in the report
MATCH_METRIC = {"math": "exact_match", "qa": "answer_accuracy"}
MATCH_LABEL = {"exact_match": "exact match of the final answer (%)",
               "answer_accuracy": "answer accuracy (% of outputs containing a reference answer)"}


def main_metric(task: str) -> str:
    """The score ``gap_closed`` and the plot read: ROUGE-L for summarization, exact match for math, answer accuracy
    for qa, BLEU otherwise."""
    return {"summarization": "rougeL", **MATCH_METRIC}.get(task, "bleu")


def match_rate(task: str, hyps: Sequence[str], refs: Sequence[str]) -> float:
    """``task``'s per-output metric over the outputs, in % (0 without outputs), rounded to 2 decimals."""
    return round(100 * float(np.mean(matches(task, hyps, refs))) if len(refs) else 0.0, 2)


def matches(task: str, hyps: Sequence[str], refs: Sequence[str]) -> list[bool]:
    """Per output, whether it scores under ``task``'s per-output metric (:data:`MATCH_METRIC`)."""
    if task == "math":
        return answer_matches(hyps, refs)
    if task == "qa":
        return [answer_found(h, r) for h, r in zip(hyps, refs)]
    raise ValueError(f"task {task!r} has no per-output metric (those that do: {sorted(MATCH_METRIC)})")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution, GSM8K's convention: the number after the last ``####``, else the last
    number in the text; commas and a trailing ``.0`` dropped (``"1,000"`` = ``"1000"``, ``"5.0"`` = ``"5"``);
    None when there is no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail) or _NUMBER.findall(text)
    if not found:
        return None
    n = found[0 if "####" in text else -1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def answer_matches(hyps: Sequence[str], refs: Sequence[str]) -> list[bool]:
    """Per output: its final answer equals the reference's (an output without a number never matches)."""
    return [final_answer(h) is not None and final_answer(h) == final_answer(r) for h, r in zip(hyps, refs)]


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lower case; punctuation, the articles a/an/the and extra spaces dropped), with
    accents dropped too (``"Brasília"`` = ``"Brasilia"``)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_found(hyp: str, ref: str) -> bool:
    """A short answer is right when one of the reference's answers (alternatives separated by ``|``: ``"Sucre|La
    Paz"``) occurs in the output as whole words, both normalised (:func:`normalize_answer`): the accuracy of the
    open-domain QA evaluations of generative models, which answer in a sentence ("The capital of France is
    Paris.")."""
    out = f" {normalize_answer(hyp)} "
    return any(a and f" {a} " in out for a in (normalize_answer(x) for x in ref.split("|")))


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
    if task == "math":
        sig["exact_match"] = "final answer (after the last ####, else the last number; commas and .0 dropped)|%"
    if task == "qa":
        sig["answer_accuracy"] = ("a reference answer (alternatives split at |) occurs in the output as whole words, "
                                  "both SQuAD-normalised, accents dropped|%")
    return sig


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


def paired_bootstrap_matches(baseline: Sequence[bool], systems: dict[str, Sequence[bool]], n_samples: int,
                             seed: int = 12345, key: str = "exact_match") -> tuple[float, dict[str, dict]]:
    """The paired bootstrap of :func:`paired_bootstrap` for a per-output score (exact match, answer accuracy; in %;
    ``key`` names it in the result: ``{key}_delta``, ``{key}_p_value``): the same
    resamples of the inputs for every system (seeded), the baseline's 95 % CI half-width, and for each system its
    difference and the two-sided p-value (the share of resamples whose centred |difference| reaches the observed
    one, ``(count + 1) / (n + 1)`` as sacrebleu counts)."""
    base = np.asarray(baseline, dtype=float) * 100
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_samples, len(base))) if len(base) else np.zeros((n_samples, 0), int)
    b_means = base[idx].mean(1) if len(base) else np.zeros(n_samples)
    ci = float(1.96 * b_means.std())
    out = {}
    for k, v in systems.items():
        s = np.asarray(v, dtype=float) * 100
        observed = float(s.mean() - base.mean()) if len(base) else 0.0
        diffs = (s[idx].mean(1) - b_means) if len(base) else np.zeros(n_samples)
        count = int((np.abs(diffs - diffs.mean()) >= abs(observed)).sum())
        same = list(v) == list(baseline)
        out[k] = {f"{key}_delta": round(observed, 2),
                  f"{key}_p_value": 1.0 if same else round((count + 1) / (n_samples + 1), 4)}
    return ci, out


def gap_closed(tw_rows: list[dict], student_score: float, teacher_score: float, metric: str = "bleu"
               ) -> dict[str, float | None]:
    """``(Q_tw(b) − Q_student) / (Q_teacher − Q_student)`` for every budget, Q = ``metric`` (None when the teacher is
    not better than the student: there is no gap to close)."""
    return {f"{r['budget']:g}": gap_of(r[metric], student_score, teacher_score) for r in tw_rows}


def gap_of(score: float, student_score: float, teacher_score: float) -> float | None:
    """``(Q − Q_student) / (Q_teacher − Q_student)``; None without a gap."""
    gap = teacher_score - student_score
    return round((score - student_score) / gap, 4) if gap > 0 else None
