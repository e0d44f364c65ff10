"""Evaluation of a run: quality and teacher usage per budget (greedy decoding of the held-out split).

Writes ``report.json`` and ``report.md`` (schema in the training issue; ``docs/design.md``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import sacrebleu
import torch

from envs.token_mdp import Example
from tw_rl.decoding import decode
from tw_rl.examples import pad_batch
from tw_rl.models.student import Student


def quality(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults)."""
    return {"bleu": round(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score, 2)}


def detok(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)]


@torch.no_grad()
def evaluate_plain(model, examples: Sequence[Example], tokenizer, max_len: int, batch_size: int = 128
                   ) -> dict[str, float]:
    """A plain seq2seq model alone (student alone, teacher alone): greedy ``generate`` on the bare source."""
    hyps: list[str] = []
    for i in range(0, len(examples), batch_size):
        ids, mask = pad_batch([e.teacher_src for e in examples[i:i + batch_size]])
        out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_len, do_sample=False,
                             num_beams=1)
        hyps += detok(tokenizer, out[:, 1:].tolist())
    return quality(hyps, [e.reference for e in examples])


@torch.no_grad()
def evaluate_budget(student: Student, teacher, examples: Sequence[Example], budget: float, tokenizer,
                    max_len: int, eos_id: int, batch_size: int = 128, hard_cap: bool = False
                    ) -> tuple[dict, list[dict]]:
    """The Training Wheels student deciding its own calls at budget ``b``. Returns the row and per-example
    outputs (text and which tokens the teacher produced)."""
    hyps, usage, calls, lengths, outputs = [], [], 0, 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = pad_batch([e.student_src[budget] for e in chunk])
        cap = torch.full((len(chunk),), math.ceil(budget * max_len)) if hard_cap else None
        out = decode(student, ids, mask, max_len=max_len, eos_id=eos_id, teacher=teacher,
                     teacher_src=[e.teacher_src for e in chunk], allow_tau=budget > 0, call_cap=cap)
        for k, e in enumerate(chunk):
            n = int(out.lengths[k])
            toks, tm = out.tokens[k, :n].tolist(), out.teacher_mask[k, :n]
            text = detok(tokenizer, [toks])[0]
            hyps.append(text)
            usage.append(float(tm.sum()) / max(1, n))
            calls, lengths = calls + int(tm.sum()), lengths + n
            outputs.append({"source": e.text, "reference": e.reference, "output": text, "budget": budget,
                            "teacher_tokens": [int(j) for j in np.flatnonzero(tm)]})
    row = {"budget": budget, **quality(hyps, [e.reference for e in examples]),
           "usage_mean": round(float(np.mean(usage)), 4), "usage_p95": round(float(np.percentile(usage, 95)), 4),
           "calls_per_token": round(calls / max(1, lengths), 4)}
    return row, outputs


def sweep(student: Student, teacher, examples, budgets, tokenizer, max_len, eos_id, batch_size=128,
          hard_cap=False) -> list[dict]:
    student.eval()
    return [evaluate_budget(student, teacher, examples, b, tokenizer, max_len, eos_id, batch_size, hard_cap)[0]
            for b in budgets]


def gap_closed(tw_rows: list[dict], student_bleu: float, teacher_bleu: float) -> dict[str, float]:
    """``(BLEU_tw(b) − BLEU_student) / (BLEU_teacher − BLEU_student)`` for every budget (None when the teacher
    is not better than the student: there is no gap to close)."""
    gap = teacher_bleu - student_bleu
    return {f"{r['budget']:g}": round((r["bleu"] - student_bleu) / gap, 4) if gap > 0 else None for r in tw_rows}


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# tw-rl report", "", f"Held-out examples: {report.get('n_examples')}; wall time "
             f"{report.get('wall_time_s', 0):.0f} s.", "",
             f"Student alone: BLEU {report['student_only']['bleu']}, chrF {report['student_only']['chrf']}. "
             f"Teacher alone: BLEU {report['teacher_only']['bleu']}, chrF {report['teacher_only']['chrf']}.", "",
             "| budget | BLEU | chrF | usage mean | usage p95 | calls/token | gap closed | phase-1 BLEU | phase-1 usage |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    p1 = {r["budget"]: r for r in report.get("phase1_only", [])}
    for r in report["tw"]:
        q = p1.get(r["budget"], {})
        closed = report["gap_closed"].get(f"{r['budget']:g}", "")
        lines.append(f"| {r['budget']:g} | {r['bleu']} | {r['chrf']} | {r['usage_mean']} | {r['usage_p95']} | "
                     f"{r['calls_per_token']} | {closed} | "
                     f"{q.get('bleu', '')} | {q.get('usage_mean', '')} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return run_dir / "report.json", run_dir / "report.md"
