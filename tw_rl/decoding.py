"""Batched, KV-cached decoding over ``V ∪ {<τ>}`` — shared by rollout workers, evaluation and ``generate``.

One loop, :func:`decode_with`: one student decoder position per step (the acting forward, :meth:`Student.step`),
then small per-step pieces in a fixed order, in the spirit of Hugging Face's ``LogitsProcessorList``:

1. **logit pieces** edit the step's logits in place (no copy): :class:`TauBias` (the calibrated ``<τ>`` offset),
   :class:`MaskTau` (the student alone), :class:`HardCap` (SPEC §5's inference-time cap);
2. **the sampler** picks the actions and their log-probs: :class:`Greedy`, :class:`Sample` (one temperature),
   :class:`RowSample` (one per row; 0: that row is greedy);
3. **action pieces** override the chosen actions: :class:`ForcedCalls` (a :data:`TauRule`: baselines),
   :class:`Flip` (the other side of one ``<τ>`` decision, tw_rl/refit.py), :class:`Replay` (repeat a known path
   without asking the teacher again).

Then the transition: rows that chose ``<τ>`` are answered by one batched ``teacher.next_tokens`` call and the
teacher's token enters the student's cache with the offset δ (SPEC §2). The transition is also written, in
numpy with rewards, as :class:`tw_rl.envs.token_mdp.TokenMDPBatch`; the two are tested equal step by step
(tests/test_env.py). :func:`decode` is the keyword front that turns its options into the pieces
(:func:`pieces`), as ``generate``'s flags become logits processors.

:func:`decode_teacher` is the same loop for the teacher alone (one teacher decoder position per step,
:class:`TeacherSteps`), so that evaluation times the student alone, the teacher alone and Training Wheels with
one loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from tw_rl.envs.token_mdp import TeacherClient
from tw_rl.models.family import Stepper
from tw_rl.models.student import Student

# (step t, student logits [B, A], calls so far [B]) -> bool [B]: rows whose action is forced to <τ>
TauRule = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

TEACHER_ACTION = -1  # decode_teacher's action at every position it produced: every token is the teacher's
_NEEDS_TEACHER = "decoding with <τ> needs a teacher and teacher_src"


class PrefixRule(Protocol):
    """A :data:`TauRule` that also reads ``X_out`` so far: ``rule(t, logits, calls, prefix)``, ``prefix [B, t]``
    (int64, CPU) the tokens each row has written before step ``t`` (``pad_id`` after a row's EOS). :func:`decode`
    passes ``prefix`` to rules whose ``reads_prefix`` is true (the oracle caller, tw_rl/evaluation/fallback.py, keeps the
    teacher in step with the decoded prefix); plain :data:`TauRule` callables are called as before."""

    reads_prefix: bool

    def __call__(self, t: int, logits: torch.Tensor, calls: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        ...


@dataclass
class Decoded:
    """Per-row results, padded to the longest row ``T`` (``pad_id`` beyond ``lengths``)."""

    actions: np.ndarray  # [B, T] int64
    tokens: np.ndarray  # [B, T] int64
    behavior_logprobs: np.ndarray  # [B, T] float32: log μ(a_t|s_t) of the acting distribution
    lengths: np.ndarray  # [B] int64
    terminated: np.ndarray  # [B] bool

    @property
    def teacher_mask(self) -> np.ndarray:
        return self.actions != self.tokens

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.lengths[i]
        return self.actions[i, :n], self.tokens[i, :n]


# ------------------------------------------------------------------------------------------------------------
# The pieces of one step


@dataclass
class Step:
    """What the pieces of step ``t`` see. ``logits [B, A]`` (float32, the student's; logit pieces edit them in
    place), ``calls [B]`` the ``<τ>`` taken so far, ``prefix [B, t]`` (int64, CPU) ``X_out`` so far (``pad_id``
    after a row's EOS). An action piece may set ``given = (rows [B] bool, tokens [B])``: the tokens of those rows
    are known (their ``<τ>`` asks the teacher nothing)."""

    t: int
    tau: int
    logits: torch.Tensor
    calls: torch.Tensor
    prefix: torch.Tensor
    given: tuple[torch.Tensor, torch.Tensor] | None = None


class LogitPiece(Protocol):
    def __call__(self, step: Step) -> None:
        """Edit ``step.logits`` in place."""
        ...


class ActionPiece(Protocol):
    def __call__(self, step: Step, a: torch.Tensor) -> torch.Tensor:
        """The actions ``[B]`` after this piece (``a`` itself where it changes nothing)."""
        ...


class Sampler(Protocol):
    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log μ(·|s) [B, A], actions [B])`` of the acting distribution μ."""
        ...


@dataclass
class TauBias:
    """``bias [B]`` added to each row's ``<τ>`` logit (the calibrated per-budget offset, tw_rl/evaluation/calibration.py):
    ``π(<τ>) = σ(logit_τ + b − logsumexp(logits_V))``."""

    bias: torch.Tensor

    def __call__(self, step: Step) -> None:
        step.logits[:, step.tau] += self.bias


class MaskTau:
    """``<τ>`` is never chosen (the student alone)."""

    def __call__(self, step: Step) -> None:
        step.logits[:, step.tau] = float("-inf")


@dataclass
class HardCap:
    """``<τ>`` is forbidden once a row's calls reach ``cap [B]`` (the inference-time hard cap of SPEC §5)."""

    cap: torch.Tensor

    def __call__(self, step: Step) -> None:
        step.logits[step.calls >= self.cap, step.tau] = float("-inf")


class Greedy:
    """The argmax; μ is ``softmax(logits)``."""

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1)


@dataclass
class Sample:
    """An exact sample of ``softmax(logits / temperature)`` by Gumbel-max: ``argmax(log p + G)``,
    ``G ~ Gumbel(0, 1)`` from one ``torch.rand([B, A], generator=)`` per step — ~3x cheaper than
    ``torch.multinomial`` on CPU (bench/rollout.py; docs/benchmarks.md)."""

    temperature: float
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits / self.temperature, dim=-1)
        u = torch.rand(logp.shape, generator=self.generator, device=logp.device)
        return logp, (logp - torch.log(-torch.log(u))).argmax(dim=-1)


@dataclass
class RowSample:
    """:class:`Sample` with a temperature per row ``[B]``; rows at 0 are greedy (their Gumbel noise is zeroed, the
    draw still made for every row)."""

    temperature: torch.Tensor
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sampled = self.temperature > 0
        logp = torch.log_softmax(logits / torch.where(sampled, self.temperature, 1.0)[:, None], dim=-1)
        u = torch.rand(logp.shape, generator=self.generator, device=logp.device)
        return logp, (logp - torch.log(-torch.log(u)) * sampled[:, None]).argmax(dim=-1)


@dataclass
class ForcedCalls:
    """``<τ>`` on the rows ``rule`` picks, whatever the student prefers (baselines: random positions, confidence
    fallback, the oracle). The rule reads the step's (edited) logits and a copy of the calls; a
    :class:`PrefixRule` also reads the prefix."""

    rule: TauRule | PrefixRule

    def __call__(self, step: Step, a: torch.Tensor) -> torch.Tensor:
        forced = (self.rule(step.t, step.logits, step.calls.clone(), step.prefix)
                  if getattr(self.rule, "reads_prefix", False) else self.rule(step.t, step.logits, step.calls.clone()))
        return torch.where(forced.to(a.device), torch.full_like(a, step.tau), a)


@dataclass
class Flip:
    """At step ``flip_at[i]`` row ``i`` takes the other side of its ``<τ>`` decision: it calls where the policy
    would not, or takes its own most likely token of ``V`` where the policy would call; −1: never."""

    flip_at: torch.Tensor  # [B] int64

    def __call__(self, step: Step, a: torch.Tensor) -> torch.Tensor:
        here = self.flip_at == step.t
        if not bool(here.any()):
            return a
        other = torch.where(a == step.tau, step.logits[:, :step.tau].argmax(dim=-1), torch.full_like(a, step.tau))
        return torch.where(here, other, a)


@dataclass
class Replay:
    """Row ``i`` repeats a known path ``(tokens [B, T0], teacher_mask [B, T0])`` at steps ``t < until[i]`` (the
    student still reads every token); the teacher's tokens there are given, not asked for again."""

    tokens: torch.Tensor
    teacher_mask: torch.Tensor
    until: torch.Tensor  # [B] int64

    def __call__(self, step: Step, a: torch.Tensor) -> torch.Tensor:
        t = step.t
        if t >= self.tokens.shape[1]:
            return a
        replaying = t < self.until
        step.given = (replaying, self.tokens[:, t])
        return torch.where(replaying, torch.where(self.teacher_mask[:, t], torch.full_like(a, step.tau),
                                                  self.tokens[:, t]), a)


@dataclass
class Pieces:
    """One step's pieces, applied in this order: ``logits``, then ``sampler``, then ``actions``."""

    logits: list[LogitPiece] = field(default_factory=list)
    sampler: Sampler = field(default_factory=Greedy)
    actions: list[ActionPiece] = field(default_factory=list)


def pieces(*, temperature: float | torch.Tensor = 0.0, generator: torch.Generator | None = None,
           allow_tau: bool = True, call_cap: torch.Tensor | None = None, tau_bias: torch.Tensor | None = None,
           tau_rule: TauRule | PrefixRule | None = None, flip_at: torch.Tensor | None = None,
           replay: tuple[torch.Tensor, torch.Tensor] | None = None,
           device: torch.device | str = "cpu") -> Pieces:
    """:func:`decode`'s options as :class:`Pieces` (tensors moved to ``device``, where the student decodes)."""
    logits: list[LogitPiece] = []
    if tau_bias is not None:
        logits.append(TauBias(tau_bias))
    if not allow_tau:
        logits.append(MaskTau())
    if call_cap is not None:
        logits.append(HardCap(call_cap))
    if isinstance(temperature, torch.Tensor):
        sampler: Sampler = RowSample(temperature, generator)
    elif temperature > 0:
        sampler = Sample(temperature, generator)
    else:
        sampler = Greedy()
    actions: list[ActionPiece] = []
    if tau_rule is not None:
        actions.append(ForcedCalls(tau_rule))
    if flip_at is not None:
        flip_at = flip_at.to(device)
        actions.append(Flip(flip_at))
    if replay is not None:
        if flip_at is None:
            raise ValueError("replay needs flip_at (the step up to which each row repeats the given path)")
        tokens, teacher_mask = (r.to(device) for r in replay)
        actions.append(Replay(tokens, teacher_mask, until=flip_at))
    return Pieces(logits, sampler, actions)


@torch.no_grad()
def decode(student: Student, src_ids: torch.Tensor, src_mask: torch.Tensor, *, max_len: int, eos_id: int,
           teacher: TeacherClient | None = None, teacher_src: Sequence[Sequence[int]] | None = None,
           start_id: int = 0, pad_id: int = 0, temperature: float | torch.Tensor = 0.0, allow_tau: bool = True,
           call_cap: torch.Tensor | None = None, tau_rule: TauRule | PrefixRule | None = None,
           tau_bias: torch.Tensor | None = None, generator: torch.Generator | None = None,
           flip_at: torch.Tensor | None = None,
           replay: tuple[torch.Tensor, torch.Tensor] | None = None) -> Decoded:
    """Decode ``B`` rows at once (:func:`decode_with` with the :class:`Pieces` these options name).

    ``temperature == 0`` is greedy; otherwise actions are sampled from ``softmax(logits / temperature)``; a
    tensor ``[B]`` gives each row its own temperature (0: that row is greedy).
    ``allow_tau=False`` masks ``<τ>`` (the student alone). ``call_cap [B]``: ``<τ>`` is forbidden once a row's
    calls reach it (the inference-time hard cap of SPEC §5). ``tau_bias [B]`` is added to each row's ``<τ>`` logit
    (the calibrated per-budget offset, tw_rl/evaluation/calibration.py). ``tau_rule`` forces ``<τ>`` on chosen rows
    (baselines: random positions, confidence fallback; a :class:`PrefixRule` also reads the prefix ``X_out``);
    forced rows always call, whatever the student prefers.
    ``flip_at [B]``: at step ``flip_at[i]`` row ``i`` takes the other side of its ``<τ>`` decision (it calls where
    the policy would not, or takes its own most likely token where the policy would call); −1: never. The Monte-
    Carlo advantage of a call (tw_rl/refit.py) compares such a path with the unflipped one. ``replay = (tokens
    [B, T0], teacher_mask [B, T0])``, with ``flip_at``: the path before the flip is known (the unflipped path's), so
    row ``i`` repeats it at steps ``t < flip_at[i]`` (the student still reads every token) without asking the
    teacher again for the tokens it gave there.
    """
    steps = pieces(temperature=temperature, generator=generator, allow_tau=allow_tau, call_cap=call_cap,
                   tau_bias=tau_bias, tau_rule=tau_rule, flip_at=flip_at, replay=replay, device=src_ids.device)
    if (allow_tau or tau_rule is not None) and (teacher is None or teacher_src is None):
        raise ValueError(_NEEDS_TEACHER)
    return decode_with(student, src_ids, src_mask, steps, max_len=max_len, eos_id=eos_id, teacher=teacher,
                       teacher_src=teacher_src, start_id=start_id, pad_id=pad_id)


@torch.no_grad()
def decode_with(student: Student, src_ids: torch.Tensor, src_mask: torch.Tensor, steps: Pieces, *, max_len: int,
                eos_id: int, teacher: TeacherClient | None = None,
                teacher_src: Sequence[Sequence[int]] | None = None, start_id: int = 0, pad_id: int = 0) -> Decoded:
    """The decoding loop: at each step the student's logits over ``V ∪ {<τ>}``, ``steps`` (logit pieces, sampler,
    action pieces), then the transition of SPEC §2 for every live row. ``behavior_logprobs`` is the sampler's
    log μ of the action finally taken. Stops when every row has ended (EOS in ``X_out``) or after ``max_len``."""
    B, tau = src_ids.shape[0], student.tau_id
    acting = student.start(src_ids, src_mask)  # encoder states (or a causal LM's input) and the KV cache
    inp = torch.full((B,), start_id, dtype=torch.long, device=src_ids.device)
    inp_teacher = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    calls = torch.zeros(B, dtype=torch.long, device=src_ids.device)
    actions = torch.full((B, max_len), pad_id, dtype=torch.long)
    tokens = torch.full((B, max_len), pad_id, dtype=torch.long)
    blp = torch.zeros((B, max_len), dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.long)
    for t in range(max_len):
        step = Step(t, tau, student.step(acting, inp, inp_teacher).float(), calls, tokens[:, :t])
        for edit in steps.logits:
            edit(step)
        logp, a = steps.sampler(step.logits)
        for act in steps.actions:
            a = act(step, a)
        # the transition (SPEC §2; TokenMDPBatch.step, tested equal): <τ> appends the teacher's greedy token
        live = ~done
        is_tau = live & (a == tau)
        y = torch.where(live, a, torch.full_like(a, pad_id))
        if step.given is not None:  # known tokens (a repeated path): no request
            known, given = step.given
            y = torch.where(live & known, given, y)
            rows = (is_tau & ~known).nonzero().flatten().tolist()
        else:
            rows = is_tau.nonzero().flatten().tolist()
        if rows:
            if teacher is None or teacher_src is None:
                raise ValueError(_NEEDS_TEACHER)
            w, _ = teacher.next_tokens([teacher_src[i] for i in rows], [tokens[i, :t].tolist() for i in rows])
            y[rows] = torch.as_tensor(w, dtype=torch.long, device=y.device)
        actions[:, t] = torch.where(live, a, torch.full_like(a, pad_id)).cpu()
        tokens[:, t] = y.cpu()
        blp[:, t] = torch.where(live, logp.gather(1, a[:, None]).squeeze(1), torch.zeros_like(logp[:, 0])).cpu()
        lengths += live.cpu().long()
        calls += is_tau.long()
        done |= live & (y == eos_id)
        if bool(done.all()):
            break
        inp, inp_teacher = y, is_tau
    T = max(1, int(lengths.max()))
    terminated = (tokens == eos_id).any(dim=1)
    return Decoded(actions[:, :T].numpy(), tokens[:, :T].numpy(), blp[:, :T].numpy(), lengths.numpy(),
                   terminated.numpy())


class TeacherSteps:
    """The teacher's next-token distributions along ``B`` prefixes decoded in lockstep: one decoder position per
    row per step with a KV cache, as the student's in :func:`decode`.

    ``model`` is the teacher's Hugging Face model (either family, :class:`tw_rl.models.family.Stepper`), ``src_ids`` /
    ``src_mask`` ``[B, S]`` its right-padded input (the bare source). :meth:`step` feeds each row's last token (the decoder start at the first step) and returns
    ``log π_T(· | x, prefix)`` ``[B, |V|]``, normalised over the model's whole output layer and restricted to the
    first ``vocab_size`` ids, as :class:`tw_rl.teacher.Teacher` does. Used by :func:`decode_teacher` (the teacher
    alone) and by the oracle caller (tw_rl/evaluation/fallback.py), whose look-ups are not teacher calls: this is not a
    :class:`tw_rl.envs.token_mdp.TeacherClient` and counts nothing.
    """

    def __init__(self, model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor, vocab_size: int,
                 start_id: int = 0):
        self.model, self.vocab_size, self.start_id = model, int(vocab_size), int(start_id)
        self.stepper = Stepper(model, src_ids, src_mask)
        self.rows = src_ids.shape[0]
        self.steps = 0  # positions fed so far

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens [B]`` (None: the decoder start, which must be the first step); ``[B, |V|]`` log-probs."""
        if (tokens is None) != (self.steps == 0):
            raise ValueError("TeacherSteps.step: the first step feeds the decoder start (tokens=None), later steps "
                             "feed each row's last token")
        if tokens is None:
            tokens = torch.full((self.rows,), self.start_id, dtype=torch.long)
        logits = self.stepper.feed(ids=tokens.to(self.stepper.mask.device)[:, None])[:, -1]
        self.steps += 1
        return torch.log_softmax(logits.float(), dim=-1)[:, :self.vocab_size]


@torch.no_grad()
def decode_teacher(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor, *, max_len: int,
                   eos_id: int, vocab_size: int, start_id: int = 0, pad_id: int = 0) -> Decoded:
    """The teacher alone, greedy over ``V`` (``vocab_size`` ids), in the loop of :func:`decode`: one KV-cached
    decoder position per step for all ``B`` rows (:class:`TeacherSteps`), rows padded after their EOS, stopping
    when every row has ended or after ``max_len`` tokens.

    Returns :class:`Decoded` with ``actions`` = :data:`TEACHER_ACTION` at every produced position (so
    ``teacher_mask`` is true there: every token is the teacher's) and ``behavior_logprobs`` the teacher's
    log-prob of its token. Equals Hugging Face greedy ``generate`` token for token (tested) as long as the argmax
    lies in ``V``.
    """
    B = src_ids.shape[0]
    steps = TeacherSteps(model, src_ids, src_mask, vocab_size, start_id)
    done = torch.zeros(B, dtype=torch.bool)
    tokens = torch.full((B, max_len), pad_id, dtype=torch.long)
    blp = torch.zeros((B, max_len), dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.long)
    inp = None
    for t in range(max_len):
        best, w = steps.step(inp).max(dim=-1)
        live = ~done
        y = torch.where(live, w.cpu(), torch.full((B,), pad_id, dtype=torch.long))
        tokens[:, t] = y
        blp[:, t] = torch.where(live, best.cpu(), torch.zeros(B))
        lengths += live.long()
        done |= live & (y == eos_id)
        if bool(done.all()):
            break
        inp = y
    T = max(1, int(lengths.max()))
    produced = torch.arange(T)[None, :] < lengths[:, None]
    actions = torch.where(produced, torch.full((B, T), TEACHER_ACTION, dtype=torch.long),
                          torch.full((B, T), pad_id, dtype=torch.long))
    return Decoded(actions.numpy(), tokens[:, :T].numpy(), blp[:, :T].numpy(), lengths.numpy(),
                   (tokens == eos_id).any(dim=1).numpy())
