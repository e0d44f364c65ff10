"""The per-output metrics of the evaluation (tw_rl/evaluation/quality.py): the exact match of a math problem's final
answer (GSM8K's '#### N'), the answer accuracy of a short-answer question (a reference answer, alternatives split at
'|', found in the output as whole words), their paired bootstrap against Training Wheels, and how they reach the
report (its column, its comparison notes, its schema)."""

from __future__ import annotations

import numpy as np
import pytest

from tw_rl.config import ConfigError, load_config
from tw_rl.evaluation.quality import MATCH_METRIC, answer_found, final_answer, main_metric, matches, \
    normalize_answer, paired_bootstrap_matches, quality


def test_final_answer_follows_gsm8k():
    assert final_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert final_answer("#### 1,000") == final_answer("it is 1000.0") == "1000"
    assert final_answer("first 12 then 15 apples") == "15"          # no ####: the last number
    assert final_answer("no number here") is None
    assert matches("math", ["#### 7", "#### 8", "none"], ["x #### 7", "#### 7", "#### 7"]) == [True, False, False]


def test_normalisation_is_squads_with_accents_dropped():
    assert normalize_answer("The  Brasília!") == "brasilia"
    assert normalize_answer("Nuku'alofa, Tonga.") == "nuku alofa tonga"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize("hyp, ref, ok", [
    ("The capital of France is Paris.", "Paris", True),
    ("Paris", "paris", True),
    ("The capital of France is Parisian.", "Paris", False),            # whole words only
    ("The capital of Bolivia is La Paz.", "Sucre|La Paz", True),        # any alternative
    ("The capital of Bolivia is Sucre.", "Sucre|La Paz", True),
    ("The capital of Bolivia is Santa Cruz.", "Sucre|La Paz", False),
    ("It is Bogotá, the largest city.", "Bogota", True),               # accents
    ("The capital is Salt Lake.", "Salt Lake City", False),             # every word of the answer
    ("The capital of Tonga is Nuku'alofa.", "Nuku'alofa", True),
    ("", "Paris", False),
    ("anything", "", False),                                           # an empty reference never matches
])
def test_answer_found(hyp, ref, ok):
    assert answer_found(hyp, ref) is ok


def test_quality_reports_the_tasks_metric_and_the_plot_reads_it():
    refs = ["Paris", "Sucre|La Paz", "Berlin", "Rome"]
    hyps = ["The capital is Paris.", "It is La Paz.", "It is Munich.", "Rome!"]
    q = quality(hyps, refs, task="qa")
    assert q["answer_accuracy"] == 75.0 and "exact_match" not in q and "bleu" in q and "chrf" in q
    assert main_metric("qa") == "answer_accuracy" and main_metric("math") == "exact_match"
    assert main_metric("translation") == "bleu" and main_metric("summarization") == "rougeL"
    assert set(MATCH_METRIC) == {"math", "qa"}
    with pytest.raises(ValueError, match="task 'translation' has no per-output metric"):
        matches("translation", hyps, refs)


def test_paired_bootstrap_of_a_per_output_metric():
    rng = np.random.default_rng(0)
    base = list(rng.random(200) < 0.3)
    better = [True] * 120 + list(rng.random(80) < 0.3)
    same_rate = list(np.roll(base, 1))
    ci, out = paired_bootstrap_matches(base, {"better": better, "same": base, "shuffled": same_rate}, 500,
                                       key="answer_accuracy")
    assert set(out["better"]) == {"answer_accuracy_delta", "answer_accuracy_p_value"}
    assert out["better"]["answer_accuracy_delta"] == pytest.approx(100 * (np.mean(better) - np.mean(base)), abs=0.01)
    assert out["better"]["answer_accuracy_p_value"] < 0.01
    assert out["same"] == {"answer_accuracy_delta": 0.0, "answer_accuracy_p_value": 1.0}
    assert out["shuffled"]["answer_accuracy_p_value"] > 0.05  # the same rate, different outputs: no difference
    # the half-width of the baseline's 95 % interval: ~1.96 · sqrt(p(1-p)/n) in percent
    p = np.mean(base)
    assert ci == pytest.approx(196 * np.sqrt(p * (1 - p) / len(base)), rel=0.2)


def test_eval_task_qa_is_a_config_choice():
    assert load_config(None, ["eval.task=qa"]).eval.task == "qa"
    with pytest.raises(ConfigError, match="eval.task"):
        load_config(None, ["eval.task=trivia"])


def test_the_report_shows_answer_accuracy_and_its_comparison():
    from tw_rl.evaluation.report import markdown

    row = {"method": "tw", "loop": "x", "budget": 0.2, "bleu": 1.0, "chrf": 2.0, "answer_accuracy": 41.67,
           "usage_mean": 0.2, "usage_p95": 0.3, "calls_per_token": 0.2, "latency_ms": None, "throughput_seq_s": None}
    other = dict(row, method="confidence", answer_accuracy=30.0, threshold=0.5, validation_usage=0.21,
                 vs_tw={"bleu_delta": -1.0, "p_value": 0.2, "answer_accuracy_delta": -11.67,
                        "answer_accuracy_p_value": 0.03})
    report = {"task": "qa", "n_examples": 60, "split": "test", "tw": [row], "baselines": {"confidence": [other]}}
    text = markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "| chrF | answer accuracy % | usage mean |" in header
    assert "41.67" in text and "answer accuracy -11.67 vs Training Wheels (p = 0.03)" in text
    assert "Quality column of the plot: answer_accuracy." in text


@pytest.mark.parametrize("task, key, want", [("qa", "answer_accuracy", 50.0), ("math", "exact_match", 50.0),
                                             ("translation", None, None)])
def test_phase_0s_evaluation_reports_the_tasks_metric(monkeypatch, task, key, want):
    """Phase 0's check of a model scores its greedy outputs with the task's per-output metric as the evaluation does
    (for math it replaces the plain string equality, which shares its name)."""
    import tw_rl.pretrain as pretrain
    from tw_rl.data import Pair

    pairs = {"qa": [Pair("What is the capital of France?", "Paris"), Pair("… of Chile?", "Santiago")],
             "math": [Pair("2 + 2?", "4 #### 4"), Pair("3 + 3?", "#### 6")],
             "translation": [Pair("ein Hund", "a dog"), Pair("eine Katze", "a cat")]}[task]
    outputs = {"qa": ["The capital of France is Paris.", "It is Lima."], "math": ["so #### 4", "#### 7"],
               "translation": ["a dog", "the cat"]}[task]
    monkeypatch.setattr(pretrain, "greedy_translate", lambda *a, **k: outputs)
    got = pretrain.evaluate_pair_bleu(None, None, pairs, load_config(None, [f"eval.task={task}"]))
    if key is None:
        assert got["exact_match"] == 0.5 and "answer_accuracy" not in got  # plain string equality
    else:
        assert got[key] == want
        assert task != "qa" or got["exact_match"] == 0.0  # qa keeps the string equality beside it
