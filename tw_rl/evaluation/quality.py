"""Quality of a row's outputs (SPEC §7): corpus BLEU and chrF (sacrebleu), ROUGE-1/2/L for summarization, the
signatures of those scores, the paired bootstrap test of a row against Training Wheels, and the gap closed."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import sacrebleu


def quality(hyps: Sequence[str], refs: Sequence[str], task: str = "translation") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults); plus ROUGE-1/2/L (mean F1 × 100) for summarization."""
    q = {"bleu": round(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, 2),
         "chrf": round(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score, 2)}
    if task == "summarization":
        q.update(rouge(hyps, refs))
    return q


def main_metric(task: str) -> str:
    """The score ``gap_closed`` and the plot read: ROUGE-L for summarization, BLEU otherwise."""
    return "rougeL" if task == "summarization" else "bleu"


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


def gap_closed(tw_rows: list[dict], student_score: float, teacher_score: float, metric: str = "bleu"
               ) -> dict[str, float | None]:
    """``(Q_tw(b) − Q_student) / (Q_teacher − Q_student)`` for every budget, Q = ``metric`` (None when the teacher is
    not better than the student: there is no gap to close)."""
    return {f"{r['budget']:g}": gap_of(r[metric], student_score, teacher_score) for r in tw_rows}


def gap_of(score: float, student_score: float, teacher_score: float) -> float | None:
    """``(Q − Q_student) / (Q_teacher − Q_student)``; None without a gap."""
    gap = teacher_score - student_score
    return round((score - student_score) / gap, 4) if gap > 0 else None
