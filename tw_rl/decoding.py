"""Batched, KV-cached decoding over ``V ∪ {<τ>}`` — shared by rollout workers, evaluation and ``generate``.

One student decoder position per step (the acting forward, :meth:`Student.step`); rows that choose ``<τ>`` are
answered by one batched ``teacher.next_tokens`` call and the teacher's token enters the student's cache with the
offset δ (SPEC §2). The transitions are those of :class:`tw_rl.envs.token_mdp.TokenMDPBatch` (tested equal).

:func:`decode_teacher` is the same loop for the teacher alone (one teacher decoder position per step,
:class:`TeacherSteps`), so that evaluation times the student alone, the teacher alone and Training Wheels with
one loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from tw_rl.envs.token_mdp import TeacherClient
from tw_rl.models.student import Student

# (step t, student logits [B, A], calls so far [B]) -> bool [B]: rows whose action is forced to <τ>
TauRule = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

TEACHER_ACTION = -1  # decode_teacher's action at every position it produced: every token is the teacher's


class PrefixRule(Protocol):
    """A :data:`TauRule` that also reads ``X_out`` so far: ``rule(t, logits, calls, prefix)``, ``prefix [B, t]``
    (int64, CPU) the tokens each row has written before step ``t`` (``pad_id`` after a row's EOS). :func:`decode`
    passes ``prefix`` to rules whose ``reads_prefix`` is true (the oracle caller, tw_rl/baselines.py, keeps the
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


@torch.no_grad()
def decode(student: Student, src_ids: torch.Tensor, src_mask: torch.Tensor, *, max_len: int, eos_id: int,
           teacher: TeacherClient | None = None, teacher_src: Sequence[Sequence[int]] | None = None,
           start_id: int = 0, pad_id: int = 0, temperature: float | torch.Tensor = 0.0, allow_tau: bool = True,
           call_cap: torch.Tensor | None = None, tau_rule: TauRule | PrefixRule | None = None,
           tau_bias: torch.Tensor | None = None, generator: torch.Generator | None = None,
           flip_at: torch.Tensor | None = None,
           replay: tuple[torch.Tensor, torch.Tensor] | None = None) -> Decoded:
    """Decode ``B`` rows at once.

    ``temperature == 0`` is greedy; otherwise actions are sampled from ``softmax(logits / temperature)``; a
    tensor ``[B]`` gives each row its own temperature (0: that row is greedy).
    ``allow_tau=False`` masks ``<τ>`` (the student alone). ``call_cap [B]``: ``<τ>`` is forbidden once a row's
    calls reach it (the inference-time hard cap of SPEC §5). ``tau_bias [B]`` is added to each row's ``<τ>`` logit
    (the calibrated per-budget offset, tw_rl/calibration.py). ``tau_rule`` forces ``<τ>`` on chosen rows
    (baselines: random positions, confidence fallback; a :class:`PrefixRule` also reads the prefix ``X_out``);
    forced rows always call, whatever the student prefers.
    ``flip_at [B]``: at step ``flip_at[i]`` row ``i`` takes the other side of its ``<τ>`` decision (it calls where
    the policy would not, or takes its own most likely token where the policy would call); −1: never. The Monte-
    Carlo advantage of a call (tw_rl/refit.py) compares such a path with the unflipped one. ``replay = (tokens
    [B, T0], teacher_mask [B, T0])``, with ``flip_at``: the path before the flip is known (the unflipped path's), so
    row ``i`` repeats it at steps ``t < flip_at[i]`` (the student still reads every token) without asking the
    teacher again for the tokens it gave there.
    """
    B, tau = src_ids.shape[0], student.tau_id
    if flip_at is not None:
        flip_at = flip_at.to(src_ids.device)
    if replay is not None:
        if flip_at is None:
            raise ValueError("replay needs flip_at (the step up to which each row repeats the given path)")
        replay_tokens, replay_teacher = (r.to(src_ids.device) for r in replay)
    if (allow_tau or tau_rule is not None) and (teacher is None or teacher_src is None):
        raise ValueError("decoding with <τ> needs a teacher and teacher_src")
    enc = student.encode(src_ids, src_mask)
    cache = student.new_cache()
    inp = torch.full((B,), start_id, dtype=torch.long, device=src_ids.device)
    inp_teacher = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    calls = torch.zeros(B, dtype=torch.long, device=src_ids.device)
    actions = torch.full((B, max_len), pad_id, dtype=torch.long)
    tokens = torch.full((B, max_len), pad_id, dtype=torch.long)
    blp = torch.zeros((B, max_len), dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.long)
    for t in range(max_len):
        logits = student.step(enc, src_mask, inp, inp_teacher, cache).float()
        if tau_bias is not None:
            logits[:, tau] += tau_bias
        if not allow_tau:
            logits[:, tau] = float("-inf")
        if call_cap is not None:
            logits[calls >= call_cap, tau] = float("-inf")
        if isinstance(temperature, torch.Tensor):  # per row: Gumbel noise only on rows with temperature > 0
            sampled = temperature > 0
            logp = torch.log_softmax(logits / torch.where(sampled, temperature, 1.0)[:, None], dim=-1)
            u = torch.rand(logp.shape, generator=generator, device=logp.device)
            a = (logp - torch.log(-torch.log(u)) * sampled[:, None]).argmax(dim=-1)
        elif temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            # Gumbel-max: argmax(log p + G), G ~ Gumbel(0, 1), is an exact sample of p and ~3x cheaper than
            # torch.multinomial on CPU (bench/rollout.py; docs/benchmarks.md)
            u = torch.rand(logp.shape, generator=generator, device=logp.device)
            a = (logp - torch.log(-torch.log(u))).argmax(dim=-1)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            a = logits.argmax(dim=-1)
        if tau_rule is not None:
            forced = (tau_rule(t, logits, calls.clone(), tokens[:, :t]) if getattr(tau_rule, "reads_prefix", False)
                      else tau_rule(t, logits, calls.clone()))
            a = torch.where(forced.to(a.device), torch.full_like(a, tau), a)
        if flip_at is not None:
            here = flip_at == t
            if bool(here.any()):
                a = torch.where(here, torch.where(a == tau, logits[:, :tau].argmax(dim=-1), torch.full_like(a, tau)), a)
        replaying = None
        if replay is not None and t < replay_tokens.shape[1]:
            replaying = t < flip_at
            a = torch.where(replaying, torch.where(replay_teacher[:, t], torch.full_like(a, tau),
                                                   replay_tokens[:, t]), a)
        live = ~done
        is_tau = live & (a == tau)
        y = torch.where(live, a, torch.full_like(a, pad_id))
        if replaying is not None:  # the teacher's tokens on the repeated path are known: no request
            y = torch.where(live & replaying, replay_tokens[:, t], y)
            rows = (is_tau & ~replaying).nonzero().flatten().tolist()
        else:
            rows = is_tau.nonzero().flatten().tolist()
        if rows:
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

    ``model`` is the teacher's Hugging Face seq2seq model, ``src_ids`` / ``src_mask`` ``[B, S]`` its padded input
    (the bare source). :meth:`step` feeds each row's last token (the decoder start at the first step) and returns
    ``log π_T(· | x, prefix)`` ``[B, |V|]``, normalised over the model's whole output layer and restricted to the
    first ``vocab_size`` ids, as :class:`tw_rl.teacher.Teacher` does. Used by :func:`decode_teacher` (the teacher
    alone) and by the oracle caller (tw_rl/baselines.py), whose look-ups are not teacher calls: this is not a
    :class:`tw_rl.envs.token_mdp.TeacherClient` and counts nothing.
    """

    def __init__(self, model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor, vocab_size: int,
                 start_id: int = 0):
        self.model, self.vocab_size, self.start_id = model, int(vocab_size), int(start_id)
        self.mask = src_mask.long()
        self.enc = model.get_encoder()(input_ids=src_ids, attention_mask=self.mask)
        self.cache = Student.new_cache()
        self.steps = 0  # positions fed so far

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens [B]`` (None: the decoder start, which must be the first step); ``[B, |V|]`` log-probs."""
        if (tokens is None) != (self.steps == 0):
            raise ValueError("TeacherSteps.step: the first step feeds the decoder start (tokens=None), later steps "
                             "feed each row's last token")
        B = self.mask.shape[0]
        if tokens is None:
            tokens = torch.full((B,), self.start_id, dtype=torch.long)
        logits = self.model(encoder_outputs=self.enc, attention_mask=self.mask,
                            decoder_input_ids=tokens.to(self.mask.device)[:, None], cache=self.cache,
                            use_cache=True).logits[:, -1]
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
