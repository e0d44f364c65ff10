"""Speculative decoding rows (SPEC §7): teacher as target, phase-0 student as draft, batch size 1.

- ``baselines.speculative``: first Hugging Face assisted generation (:func:`speculative_generate`,
  ``generate(..., assistant_model=draft)``, greedy, lossless), then draft-and-verify decoding
  (:func:`speculative_greedy`) at each ``eval.spec_lenience`` (1: lossless, smaller: lossy). **[choice: the
  Training Wheels student's input carries a budget prompt and its output layer an extra ``<τ>`` row; the phase-0
  student is the same network before it learned to call, reads the bare source the teacher reads and shares the
  teacher's vocabulary]**. ``matches_teacher``: the fraction of outputs equal to the teacher's.
- Usage: lossless, every token is the teacher's (1.0); lossy, the tokens that are the teacher's own greedy choice.
  ``calls_per_token``: one teacher pass per verification round (counted with a forward hook,
  :class:`ForwardCounter`). Both decode a batch one sequence after another, so their throughput is
  ``1000 / mean latency_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from tw_rl.envs.token_mdp import Example
from tw_rl.evaluation.alone import TeacherAlone
from tw_rl.evaluation.outputs import Method, Outputs
from tw_rl.evaluation.rows import LOOP_DRAFT_VERIFY, LOOP_HF_ASSISTED, Context, Plot, Point, RowKind, Setting
from tw_rl.models.family import Stepper, is_causal

if TYPE_CHECKING:
    from tw_rl.api import TrainedModel


class ForwardCounter:
    """Counts forward passes of ``module`` (its own ``__call__``, not its submodules') while active.

    In ``generate`` an encoder–decoder's encoder runs once through ``get_encoder()`` (not counted) and every decoding
    step or verification round is one call of the model itself (counted).
    """

    def __init__(self, module: torch.nn.Module):
        self.module, self.count, self._handle = module, 0, None

    def _hook(self, module, args, output) -> None:
        self.count += 1

    def __enter__(self) -> "ForwardCounter":
        self.count = 0
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, src: Sequence[int], max_len: int,
                         eos_id: int) -> tuple[list[int], int]:
    """Lossless greedy speculative decoding of one source (Hugging Face assisted generation, batch size 1).

    Returns the output tokens (decoder start dropped, EOS included when produced — as :meth:`Teacher.generate`)
    and the number of ``target`` forward passes it took. The draft proposes up to ``num_assistant_tokens`` tokens
    per round (Hugging Face defaults: 20, stopping early when the draft's confidence is below 0.4); the target
    verifies them in one pass and keeps the longest prefix equal to its own greedy choice plus one token of its own,
    so the output equals the target's greedy output.
    """
    device = next(target.parameters()).device
    ids = torch.as_tensor([list(src)], dtype=torch.long, device=device)
    with ForwardCounter(target) as counter:
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=draft,
                              max_new_tokens=max_len, do_sample=False, num_beams=1)
    row = out[0, ids.shape[1] if is_causal(target) else 1:].tolist()  # drop the input (causal) / the decoder start
    return (row[:row.index(eos_id) + 1] if eos_id in row else row), counter.count


@dataclass
class Speculated:
    """One output of :func:`speculative_greedy`."""

    tokens: list[int]  # decoder start dropped, EOS included when produced
    from_teacher: list[bool]  # the token is the teacher's greedy choice (every token when lossless)
    teacher_passes: int


@torch.no_grad()
def speculative_greedy(target: torch.nn.Module, draft: torch.nn.Module, src: Sequence[int], max_len: int,
                       eos_id: int, start_id: int, draft_tokens: int = 5, lenience: float = 1.0) -> Speculated:
    """Greedy draft-and-verify decoding of one source, lossless at ``lenience = 1``, lossy below (DistillSpec).

    Each round the draft proposes ``draft_tokens`` greedy tokens (KV-cached); the target scores them in one
    forward pass (KV-cached) and keeps the longest prefix it accepts, then adds its own greedy token (the
    correction, or a bonus token when all were accepted). **[choice]** A draft token ``d`` is accepted when
    ``p_T(d) ≥ lenience · max_v p_T(v)`` — at ``lenience = 1`` only the target's greedy token, so the output equals
    the target's greedy output; smaller values accept more of the draft's tokens (fewer target passes per token,
    lower quality). Caches are cropped back to the accepted prefix after every round.
    """
    if not 0.0 < lenience <= 1.0:
        raise ValueError(f"speculative_greedy: lenience={lenience} must lie in (0, 1]")
    if draft_tokens < 1:
        raise ValueError(f"speculative_greedy: draft_tokens={draft_tokens} must be at least 1")
    device = next(target.parameters()).device
    ids = torch.as_tensor([list(src)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    st_t, st_d = Stepper(target, ids, mask), Stepper(draft, ids, mask)
    seq, from_teacher, passes = [start_id], [], 0  # seq: decoder inputs, start first

    def step(steps: Stepper, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` after the cached prefix; logits ``[len(tokens), |V|]``."""
        return steps.feed(ids=torch.as_tensor([tokens], dtype=torch.long, device=device))[0].float()

    while len(seq) - 1 < max_len and (len(seq) == 1 or seq[-1] != eos_id):
        n = len(seq)
        k = min(draft_tokens, max_len - (n - 1))
        proposal: list[int] = []
        logits = step(st_d, seq[st_d.fed:])
        for _ in range(k):
            proposal.append(int(logits[-1].argmax()))
            if proposal[-1] == eos_id or len(proposal) == k:
                break
            logits = step(st_d, proposal[-1:])
        # one target pass scores every proposal: row i predicts the token after seq + proposal[:i]
        p = torch.softmax(step(st_t, seq[st_t.fed:] + proposal)
                          [-(len(proposal) + 1):], dim=-1)
        passes += 1
        accepted = 0
        for i, d in enumerate(proposal):
            best = int(p[i].argmax())
            if d == best or (lenience < 1.0 and p[i, d] >= lenience * p[i, best]):
                accepted += 1
                from_teacher.append(d == best)
            else:
                break
        seq += proposal[:accepted]
        if seq[-1] != eos_id and len(seq) - 1 < max_len:
            seq.append(int(p[accepted].argmax()))  # the target's own token: a correction or a bonus
            from_teacher.append(True)
        for steps in (st_t, st_d):  # keep the states of seq[:-1]: the last token is fed next round
            if steps.fed > len(seq) - 1:
                steps.crop(len(seq) - 1)
    return Speculated(seq[1:], from_teacher, passes)


# ------------------------------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------------------------------
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


def _matches_teacher(ctx: Context, row: dict, outs: Outputs) -> None:
    teacher = ctx.outputs[(TeacherAlone.method, None)]
    row["matches_teacher"] = round(float(np.mean([a == b for a, b in zip(outs.tokens, teacher.tokens)]))
                                   if outs.tokens else 1.0, 4)


def _note(how: str, row: dict) -> str:
    return f"{how}; draft: {row.get('draft', '')}; same output as teacher: {row.get('matches_teacher', '–')}"


class AssistedGeneration(RowKind):
    method, key, title = "speculative", ("baselines", "speculative"), "speculative decoding"
    per_budget, baseline, sequential, loop, off = False, True, True, LOOP_HF_ASSISTED, None
    plot = Plot("speculative decoding (HF assisted, lossless)", dict(color="C1", marker="D", ms=9), curve=False)

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        return Setting(fields={"draft": "phase-0 student", "implementation": "hf_assisted", "lossless": True})

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(speculative, ctx.model)

    def finish(self, ctx: Context, row: dict, outs: Outputs) -> None:
        _matches_teacher(ctx, row, outs)

    def note(self, row: dict, report: dict) -> str:
        return _note("Hugging Face assisted generation", row)


class DraftVerify(RowKind):
    """One row per ``eval.spec_lenience`` value."""

    method, key, title = "speculative_lenient", ("baselines", "speculative"), "speculative decoding"
    per_budget, baseline, sequential, loop, off = False, True, True, LOOP_DRAFT_VERIFY, None
    keep_outputs = False
    plot = Plot("speculative draft-and-verify (lenience)", dict(color="C1", marker="d", ls="--"),
                annotate="lenience", tag="l", stagger=True)

    def points(self, ctx: Context) -> Sequence[float | None]:
        return ctx.cfg.eval.spec_lenience

    def calibrate(self, ctx: Context, at: Point) -> Setting:
        return Setting(fields={"draft": "phase-0 student", "implementation": "draft_verify", "lenience": at.value,
                               "draft_tokens": ctx.cfg.eval.spec_draft_tokens, "lossless": at.value == 1.0})

    def decoder(self, ctx: Context, at: Point, knob: float | None) -> Method:
        return partial(speculative_lenient, ctx.model, lenience=at.value)

    def finish(self, ctx: Context, row: dict, outs: Outputs) -> None:
        _matches_teacher(ctx, row, outs)

    def note(self, row: dict, report: dict) -> str:
        return _note(f"draft-and-verify, lenience {row['lenience']:g}, {row.get('draft_tokens')} draft tokens", row)
