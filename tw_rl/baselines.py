"""Ways to spend teacher tokens without a learned call policy — the baselines of SPEC §7.

- **Random calls** (:func:`random_calls`): the student's own tokens, with ``<τ>`` forced at random positions.
  **[choice]** Each live row calls at each step with probability ``rate``, independently (Bernoulli per step,
  from a seeded ``torch.Generator``): a fixed number of positions per row would need the length before it is
  decoded. Calls change where outputs end, so the rate that matches a usage is calibrated like the threshold.
- **Confidence fallback** (:func:`confidence_fallback`, as in Big Little Decoder): call when the student's top
  probability over ``V`` (``<τ>`` excluded, renormalised) is below a threshold; :func:`calibrate_threshold` finds
  the threshold that gives a target usage on validation data, by bisection.
- **Oracle caller** (:class:`OracleCalls`; not deployable: it reads the teacher's distribution at every step):
  call where the student's greedy token differs from the teacher's greedy token ``w*`` for the same prefix and the
  teacher's log-prob gain ``log π_T(w*) − log π_T(student's token)`` exceeds a threshold, calibrated like the
  others. Its look-ups (:class:`tw_rl.decoding.TeacherSteps`) are not teacher calls; only its ``<τ>`` are.
- **Speculative decoding** (:func:`speculative_generate`): Hugging Face assisted generation
  (``generate(..., assistant_model=draft)``, greedy, lossless) with the teacher as target and the phase-0 student
  as draft **[choice: the Training Wheels student's input carries a budget prompt and its output layer an extra
  ``<τ>`` row; the phase-0 student is the same network before it learned to call, reads the bare source the
  teacher reads and shares the teacher's vocabulary]**. Its cost is the teacher's forward passes, counted with a
  forward hook (:class:`ForwardCounter`).

Rules are :data:`tw_rl.decoding.TauRule` callables (the oracle: a :class:`tw_rl.decoding.PrefixRule`) for
``decode(..., tau_rule=...)``; decode with ``allow_tau=False`` so that only the rule decides when the teacher is
called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import math

import torch

from tw_rl.decoding import TauRule, TeacherSteps


# ------------------------------------------------------------------------------------------------------------------
# random calls and confidence fallback
# ------------------------------------------------------------------------------------------------------------------
def random_calls(rate: float, generator: torch.Generator) -> TauRule:
    """Force ``<τ>`` on each row at each step with probability ``rate`` (drawn from ``generator``, on the CPU)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"random_calls: rate={rate} must lie in [0, 1]")

    def rule(t: int, logits: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
        return (torch.rand(logits.shape[0], generator=generator) < rate).to(logits.device)

    return rule


def confidence_fallback(threshold: float, tau_id: int) -> TauRule:
    """Force ``<τ>`` where ``max_{v ∈ V} softmax(logits[:, :tau_id])_v < threshold`` (``<τ>`` excluded)."""

    def rule(t: int, logits: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[:, :tau_id].float(), dim=-1).amax(dim=-1) < threshold

    return rule


class OracleCalls:
    """Not deployable: force ``<τ>`` where the student's greedy token ``v = argmax_{V} logits`` differs from the
    teacher's greedy token ``w* = argmax π_T(· | x, X_out)`` and ``gain = log π_T(w*) − log π_T(v) > threshold``.

    A :class:`tw_rl.decoding.PrefixRule` for one batch: ``steps`` (a fresh :class:`tw_rl.decoding.TeacherSteps` on
    the batch's bare sources, rows in the batch's order) follows the decoded prefix one token per step, so every
    step costs one KV-cached teacher position per row on top of the student's; those look-ups count nothing. At
    ``threshold = −inf`` the rule calls at every disagreement, so the output is the teacher's greedy output; at
    ``+inf`` it never calls. Lowering the threshold calls where the teacher gains most first. ``gains`` keeps, per
    step, ``(student token [B], teacher token [B], gain [B])`` for inspection.
    """

    reads_prefix = True

    def __init__(self, threshold: float, tau_id: int, steps: TeacherSteps, keep_gains: bool = False):
        self.threshold, self.tau_id, self.steps = float(threshold), int(tau_id), steps
        self.gains: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if keep_gains else None

    def __call__(self, t: int, logits: torch.Tensor, calls: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if t != self.steps.steps:
            raise ValueError(f"OracleCalls: step {t}, but the teacher has been fed {self.steps.steps} positions: "
                             "use one rule per decode")
        logp = self.steps.step(None if t == 0 else prefix[:, -1])  # [B, |V|]
        own = logits[:, :self.tau_id].argmax(dim=-1).to(logp.device)
        best, w = logp.max(dim=-1)
        gain = best - logp.gather(1, own[:, None]).squeeze(1)
        if self.gains is not None:
            self.gains.append((own.cpu(), w.cpu(), gain.cpu()))
        return ((own != w) & (gain > self.threshold)).to(logits.device)


def oracle_threshold(x: float) -> float:
    """The gain threshold ``−log x`` for the calibration knob ``x ∈ [0, 1]`` (:func:`calibrate_threshold`
    searches ``[0, 1]`` with usage non-decreasing in ``x``): the oracle calls where ``π_T(v) / π_T(w*) < x``; 0:
    never (``+inf``); 1: at every disagreement with a positive gain."""
    return math.inf if x <= 0.0 else -math.log(x)


@dataclass
class Calibration:
    """The result of :func:`calibrate_threshold`: the threshold, the usage it gave, and the usages tried."""

    threshold: float
    usage: float
    trace: list[tuple[float, float]]  # (threshold, usage) per evaluation, in order

    @property
    def evaluations(self) -> int:
        return len(self.trace)


_SATURATION_CHECK = 0.9  # calibrate_threshold decodes x = 1 once bisection, always short, passes this


def calibrate_threshold(usage_at: Callable[[float], float], target: float, tol: float = 0.01,
                        max_iter: int = 20) -> Calibration:
    """Bisection on ``[0, 1]`` for the confidence threshold (or random-call rate) whose usage is ``target ± tol``.

    ``usage_at(x)`` decodes the validation data with :func:`confidence_fallback` at threshold ``x`` (or
    :func:`random_calls` at rate ``x``, same seed every time) and returns the mean usage (calls / output length per
    sequence, averaged). Usage is non-decreasing in ``x`` up to the feedback of calls on later steps, so bisection
    converges in practice; if ``tol`` is not reached in ``max_iter`` evaluations the closest value seen is returned
    (check :attr:`Calibration.usage`). ``target = 0`` gives 0 (never call) without decoding.

    A method that cannot reach the target (the oracle caller calls only where the student is wrong) is found
    out early: once every step so far fell short and bisection nears ``x = 1``, ``x = 1`` itself is decoded, and
    if even it falls short the search stops there (the closest reachable usage) instead of halving toward it.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"calibrate_threshold: target usage {target} must lie in [0, 1]")
    if target == 0.0:
        return Calibration(0.0, 0.0, [])
    lo, hi, trace, top_checked = 0.0, 1.0, [], False
    while len(trace) < max_iter:
        mid = (lo + hi) / 2
        u = float(usage_at(mid))
        trace.append((mid, u))
        if abs(u - target) <= tol + 1e-12:  # rounding of u must not cost the answer
            break
        lo, hi = (mid, hi) if u < target else (lo, mid)
        if hi == 1.0 and lo >= _SATURATION_CHECK and not top_checked and len(trace) < max_iter:
            top_checked = True
            top = float(usage_at(1.0))
            trace.append((1.0, top))
            if top <= target + tol + 1e-12:  # x = 1 reaches the target, or nothing does: stop at x = 1
                break
    best = min(trace, key=lambda tu: abs(tu[1] - target))
    return Calibration(best[0], best[1], trace)


# ------------------------------------------------------------------------------------------------------------------
# speculative decoding
# ------------------------------------------------------------------------------------------------------------------
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
    row = out[0, 1:].tolist()
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
    from tw_rl.models.student import Student  # new_cache: the cache type both models use

    device = next(target.parameters()).device
    ids = torch.as_tensor([list(src)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    enc_t = target.get_encoder()(input_ids=ids, attention_mask=mask)
    enc_d = draft.get_encoder()(input_ids=ids, attention_mask=mask)
    cache_t, cache_d = Student.new_cache(), Student.new_cache()
    seq, from_teacher, passes = [start_id], [], 0  # seq: decoder inputs, start first

    def step(model, enc, cache, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` after the cached prefix; logits ``[len(tokens), |V|]``."""
        inp = torch.as_tensor([tokens], dtype=torch.long, device=device)
        return model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=inp, cache=cache,
                     use_cache=True).logits[0].float()

    while len(seq) - 1 < max_len and (len(seq) == 1 or seq[-1] != eos_id):
        n = len(seq)
        k = min(draft_tokens, max_len - (n - 1))
        proposal: list[int] = []
        logits = step(draft, enc_d, cache_d, seq[cache_d.get_seq_length():])
        for _ in range(k):
            proposal.append(int(logits[-1].argmax()))
            if proposal[-1] == eos_id or len(proposal) == k:
                break
            logits = step(draft, enc_d, cache_d, proposal[-1:])
        # one target pass scores every proposal: row i predicts the token after seq + proposal[:i]
        p = torch.softmax(step(target, enc_t, cache_t, seq[cache_t.get_seq_length():] + proposal)
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
        for cache in (cache_t, cache_d):  # keep the states of seq[:-1]: the last token is fed next round
            extra = cache.get_seq_length() - (len(seq) - 1)
            if extra > 0:
                cache.crop(-extra)
    return Speculated(seq[1:], from_teacher, passes)
