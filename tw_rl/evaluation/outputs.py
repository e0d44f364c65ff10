"""What a row decoded, and its accounting: :class:`Outputs` (tokens, which of them the teacher produced, teacher
forward passes), :func:`run` over a split in batches, and the row's scores (:func:`score`: quality, usage and calls
per token) and ``outputs.jsonl`` records (:func:`records`).

- ``usage_mean`` / ``usage_p95``: teacher-produced tokens / output tokens per sequence (EOS counted), mean and 95th
  percentile over sequences.
- ``calls_per_token``: teacher forward passes / output tokens over the corpus, a pass over ``k`` rows counting
  ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tw_rl.decoding import Decoded
from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.quality import quality


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


Method = Callable[[Sequence[Example]], Outputs]  # decodes one batch of examples


def run(method: Method, examples: Sequence[Example], batch_size: int) -> Outputs:
    out = Outputs()
    for i in range(0, len(examples), batch_size):
        out.extend(method(examples[i:i + batch_size]))
    return out


def detok(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)]


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
