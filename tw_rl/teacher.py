"""The teacher: answers ``<τ>`` calls (greedy next token) and scores outputs (log-probs per token).

:class:`Teacher` is a plain class that implements :class:`tw_rl.envs.token_mdp.TeacherClient` on a Hugging Face
seq2seq model or causal LM (:mod:`tw_rl.models.family`). It caches encoder states per source (seq2seq) and, for small
requests, a KV cache per decoded sequence (a causal LM's covers its input too), so a ``<τ>`` call feeds the decoder only the tokens produced since that sequence's previous call. Large
requests are batched over their full prefixes. Dynamic batching of concurrent requests from many rollout workers
lives in :mod:`tw_rl.teacher_server` (``DynamicBatcher``), which the Ray wing's actor serves
(:mod:`tw_rl.distributed.teacher`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from tw_rl.examples import pad_batch
from tw_rl.models.family import Stepper, feed_rows, forced, is_causal, left_align


@dataclass(eq=False)
class _DecoderState:
    """One decoded sequence's teacher state: its KV cache after feeding ``fed`` (start token included; for a causal
    LM the start stands for the source) and the log-probs over ``V`` at the last fed position
    (``log π_T(· | x, fed[1:])``)."""

    steps: Stepper  # one row
    fed: tuple[int, ...] = ()
    logprobs: torch.Tensor | None = None  # [|V|]


class Teacher:
    """``vocab_size`` is ``|V|`` (the student's vocabulary without ``<τ>``); greedy tokens are drawn from it.

    Two ways to answer :meth:`next_tokens`, chosen per request by its number of rows:

    - *incremental* (at most ``incremental_max_rows`` rows): every row is served by a decoder KV cache kept for its
      sequence (:class:`_DecoderState`, up to ``states_per_source`` per source — episodes decoded at the same time
      on the same source — and ``decoder_cache_size`` in all, least recently used evicted first). A state whose
      fed tokens are a prefix of ``[start] + prefix`` is extended by one decoder forward over the new tokens only;
      asking again for the same prefix costs nothing. Otherwise (a new episode, an evicted state) the row's
      sequence is fed from the start into a fresh state. A sequence that calls ``k`` times costs ``len(prefix) + 1``
      decoder positions in all instead of about ``k · t / 2``: what a ``<τ>`` costs at batch size 1 no longer
      grows with the step. Rows are fed one after another (their caches have different lengths), so each row pays
      one model call.
    - *batched* (more rows): one forward over all rows' full prefixes, padded, without a KV cache; the fixed cost
      of a model call is shared by the rows. The teacher server (:mod:`tw_rl.teacher_server`) merges the requests
      of many workers into such batches. It neither reads nor updates the decoder states.

    - *stacked* (more rows, ``stack_caches=True``, causal LMs): the rows' own KV caches (the incremental path's
      states) are stacked, left-padded to the longest, into one forward over the tokens each row's cache lacks
      (right-aligned in a block as wide as the longest such span; a fresh row feeds its input too, in a forward of
      its own with the other fresh rows). One or two model calls for the request, over the new tokens only; the
      padding positions stay in the rows' caches, masked. It pays where a teacher's per-position cost dominates a forward (SmolLM2-135M on CPU:
      ``docs/benchmarks.md``, "Stacked teacher caches"). Models whose layers differ in cache kind (sliding-window
      layers) are not supported on this path.

    With ``reuse_prefixes``, a sequence whose prefix extends none of its source's kept states takes the kept state
    sharing the longest start with it (beyond the input), cropped back to that start (:meth:`Stepper.crop`), instead
    of a fresh state that reads the input again; the answer to a first call (the input alone) is kept per source.
    It pays where the same inputs are decoded again and again (calibration's bisection, the evaluation's baselines).

    The default ``incremental_max_rows = 1`` is the measured crossover (one CPU thread, ``docs/benchmarks.md``,
    "Teacher call cost"): on CPU a decoder forward of these small teachers costs a fixed ~2 ms (d 128) to ~5 ms
    (d 256, 3+3 layers) of Python and kernel-launch overhead whatever it feeds, so with every row adding 5 tokens
    between calls and prefixes up to 48 tokens the incremental path wins at 1 row (0.7–0.8× the batched cost),
    ties or loses at 2 and costs 1.6–2.2× at 8. Single-row requests are what latency (batch size 1) sees; raise it
    for long outputs or teachers whose per-position cost dominates a forward (a GPU, a large model). Both paths
    give the same tokens; log-probs agree to float rounding (``tests/test_teacher.py``: 1e-5). A sequence whose
    calls go through both paths stays correct: its state simply feeds what it missed at its next incremental call.

    ``stats`` counts ``incremental_rows`` / ``batched_rows``, the decoder positions fed on each path
    (``incremental_positions``; ``batched_positions`` counts the padded ``B × (L + 1)``), decoder-state hits and
    misses (``state_hits``: extended a kept state; ``state_misses``: fed from the start) and evictions.
    :meth:`clear_cache` forgets encoder states and decoder states (timed cold runs).
    """

    def __init__(self, model: PreTrainedModel, vocab_size: int, pad_id: int = 0, start_id: int = 0,
                 encoder_cache_size: int = 8192, device: str | torch.device = "cpu", *,
                 incremental_max_rows: int = 1, decoder_cache_size: int = 256, states_per_source: int = 4,
                 stack_caches: bool = False, reuse_prefixes: bool = False):
        if decoder_cache_size < 1 or states_per_source < 1 or incremental_max_rows < 0:
            raise ValueError("decoder_cache_size and states_per_source must be >= 1, incremental_max_rows >= 0")
        if stack_caches and not is_causal(model):
            raise ValueError(f"stack_caches (teacher.stack_caches) needs a causal LM teacher; "
                             f"{type(model).__name__} is a seq2seq model: set teacher.stack_caches=false")
        self.model = model.to(device).eval()
        self.stack_caches, self.reuse_prefixes = stack_caches, reuse_prefixes
        self.vocab_size, self.pad_id, self.start_id, self.device = vocab_size, pad_id, start_id, torch.device(device)
        self._enc_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._enc_cache_size = encoder_cache_size
        self.incremental_max_rows = incremental_max_rows
        self._dec_cache_size, self._states_per_source = decoder_cache_size, states_per_source
        # source -> its decoder states, least recently used first (in both levels)
        self._states: OrderedDict[tuple[int, ...], list[_DecoderState]] = OrderedDict()
        self._n_states = 0
        # reuse_prefixes: source -> log π_T(· | x), the answer to a first call (kept for decoder_cache_size sources)
        self._first: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.stats = {"calls": 0, "rows": 0, "seconds": 0.0, "encoder_hits": 0, "encoder_misses": 0,
                      "incremental_rows": 0, "batched_rows": 0, "incremental_positions": 0, "batched_positions": 0,
                      "stacked_rows": 0, "stacked_positions": 0, "state_crops": 0,
                      "state_hits": 0, "state_misses": 0, "state_evictions": 0}

    def clear_cache(self) -> None:
        """Forget all cached encoder states and decoder states (the next call for any source starts cold)."""
        self._enc_cache.clear()
        self._states.clear()
        self._first.clear()
        self._n_states = 0

    @property
    def num_decoder_states(self) -> int:
        return self._n_states

    def __getstate__(self) -> dict:  # pickled (Ray) without its caches
        state = self.__dict__.copy()
        state["_enc_cache"], state["_states"], state["_n_states"] = OrderedDict(), OrderedDict(), 0
        state["_first"] = OrderedDict()
        return state

    # ----------------------------------------------------------------------------------------------------------
    def _encoder_states(self, keys: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Encoder states ``[S_i, d]`` per source, computing only sources not in the LRU cache."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._enc_cache))
        self.stats["encoder_hits"] += len(keys) - len(missing)
        self.stats["encoder_misses"] += len(missing)
        if missing:
            ids, mask = pad_batch(missing, self.pad_id, self.device)
            hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            for i, k in enumerate(missing):
                self._enc_cache[k] = hidden[i, :len(k)]
        for k in keys:
            self._enc_cache.move_to_end(k)
        states = [self._enc_cache[k] for k in keys]
        while len(self._enc_cache) > self._enc_cache_size:
            self._enc_cache.popitem(last=False)
        return states

    def _encode(self, src: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``[B, S, d]`` and mask ``[B, S]`` (padded)."""
        states = self._encoder_states([_key(s) for s in src])
        S = max(s.shape[0] for s in states)
        out = states[0].new_zeros(len(states), S, states[0].shape[1])
        mask = torch.zeros(len(states), S, dtype=torch.bool, device=self.device)
        for i, s in enumerate(states):
            out[i, :s.shape[0]], mask[i, :s.shape[0]] = s, True
        return out, mask

    def _logits(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-forced logits over the model's output layer for t = 0..len(prefix): ``[B, L+1, V_out]``."""
        dec, _ = pad_batch([[self.start_id] + list(p) for p in prefixes], self.pad_id, self.device)
        if is_causal(self.model):
            ids, mask = pad_batch(src, self.pad_id, self.device)
            return forced(self.model, ids, mask, dec_ids=dec).logits
        hidden, mask = self._encode(src)
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask.long(),
                          decoder_input_ids=dec, use_cache=False).logits

    def _logprobs(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-forced ``log π_T(· | x, prefix[<t])`` for t = 0..len(prefix): ``[B, L+1, |V|]``."""
        # normalise over the model's full output layer (hub models may pad it), then keep V
        return torch.log_softmax(self._logits(src, prefixes).float(), dim=-1)[..., :self.vocab_size]

    def _last_logprobs_batched(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                               ) -> torch.Tensor:
        """``log π_T(· | x, prefix)`` ``[B, |V|]``: one padded forward over the full prefixes, no KV cache."""
        logits = self._logits(src, prefixes)
        self.stats["batched_rows"] += len(prefixes)
        self.stats["batched_positions"] += logits.shape[0] * logits.shape[1]
        last = logits[torch.arange(len(prefixes)), torch.tensor([len(p) for p in prefixes])]
        return torch.log_softmax(last.float(), dim=-1)[:, :self.vocab_size]

    def _claim_state(self, key: tuple[int, ...], seq: tuple[int, ...], claimed: Sequence[_DecoderState] = ()
                     ) -> _DecoderState:
        """The kept state of source ``key`` that ``seq`` extends the furthest (none of ``claimed``: the states other
        rows of the same request are using), made the most recently used. With ``reuse_prefixes``, else the kept
        state sharing the longest start with ``seq`` (beyond the input), cropped back to it. Else a fresh state."""
        group = self._states.get(key)
        if group is None:
            group = self._states[key] = []
        self._states.move_to_end(key)
        free = [s for s in group if s not in claimed]  # (states compare by identity: eq=False)
        state = None
        for s in free:  # the longest kept sequence that seq extends
            n = len(s.fed)
            if n <= len(seq) and seq[:n] == s.fed and (state is None or n > len(state.fed)):
                state = s
        if state is not None:
            self.stats["state_hits"] += 1
        elif self.reuse_prefixes:
            first = self._first.get(key) if len(seq) == 1 else None  # a first call whose answer is known
            m = 0
            for s in free:  # at most all but seq's last (its log-probs are not kept), or the known first call
                c = _common(s.fed, seq, 1 if first is not None else len(seq) - 1)
                if c > m:
                    state, m = s, c
            if state is not None:
                state.steps.crop(m)
                state.fed, state.logprobs = seq[:m], first
                self.stats["state_crops"] += 1
        if state is None:
            self.stats["state_misses"] += 1
            while len(group) >= self._states_per_source and free:
                group.remove(free.pop(0))
                self._n_states -= 1
                self.stats["state_evictions"] += 1
            state = _DecoderState(self._stepper(key))
            self._n_states += 1
        else:
            group.remove(state)
        group.append(state)
        return state

    def _remember(self, key: tuple[int, ...], seq: tuple[int, ...], logprobs: torch.Tensor) -> None:
        """Keep the answer to a first call (``seq`` the start alone) for ``reuse_prefixes``."""
        if self.reuse_prefixes and len(seq) == 1:
            self._first[key] = logprobs
            self._first.move_to_end(key)
            while len(self._first) > self._dec_cache_size:
                self._first.popitem(last=False)

    def _forget(self, key: tuple[int, ...], state: _DecoderState) -> None:
        group = self._states.get(key, [])
        if state in group:
            group.remove(state)
            self._n_states -= 1

    def _last_logprobs_incremental(self, src: Sequence[int], prefix: Sequence[int]) -> torch.Tensor:
        """``log π_T(· | x, prefix)`` ``[|V|]`` from the sequence's decoder state, feeding only new tokens."""
        key = _key(src)
        seq = (self.start_id,) + _key(prefix)
        state = self._claim_state(key, seq)
        new = seq[len(state.fed):]
        if new:
            try:
                logits = state.steps.feed(ids=torch.tensor([new], device=self.device))
            except BaseException:  # the cache may hold part of the new tokens: forget the state
                self._forget(key, state)
                raise
            state.logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)[:self.vocab_size]
            state.fed = seq
            self._remember(key, seq, state.logprobs)
            self.stats["incremental_positions"] += len(new)
        self.stats["incremental_rows"] += 1
        lp = state.logprobs
        self._evict()
        return lp

    def _last_logprobs_stacked(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                               ) -> torch.Tensor:
        """``log π_T(· | x, prefix)`` ``[B, |V|]``: the rows' own KV caches stacked into one forward over the tokens
        each lacks (causal LMs; the *stacked* path of the class docstring). Rows asking the same (source, prefix)
        share one state."""
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        order = [unique.setdefault((_key(s), (self.start_id,) + _key(p)), len(unique))
                 for s, p in zip(src, prefixes)]
        states: list[_DecoderState] = []
        for key, seq in unique:
            states.append(self._claim_state(key, seq, states))
        todo = [(state, key, seq) for state, (key, seq) in zip(states, unique) if state.fed != seq]
        if todo:
            try:  # rows that read their input first, then the kept ones: a short span is not padded to an input
                for part in ([t for t in todo if not t[0].fed], [t for t in todo if t[0].fed]):
                    if part:
                        self._feed_stacked(part)
            except BaseException:  # a cache may be half replaced: forget every state of the request
                for state, key, _ in todo:
                    self._forget(key, state)
                raise
        self.stats["stacked_rows"] += len(prefixes)
        lp = torch.stack([states[i].logprobs for i in order])
        self._evict()
        return lp

    def _feed_stacked(self, todo: Sequence[tuple[_DecoderState, tuple[int, ...], tuple[int, ...]]]) -> None:
        """One forward for the states of ``todo`` ``(state, source, seq)``: each is fed ``seq`` beyond what it holds."""
        steps = [state.steps for state, _, _ in todo]
        new = [list(seq[len(state.fed):]) for state, _, seq in todo]
        logits, width = feed_rows(steps, new, self.pad_id)
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:, :self.vocab_size]
        for i, (state, key, seq) in enumerate(todo):
            state.fed, state.logprobs = seq, logprobs[i]
            self._remember(key, seq, state.logprobs)
        self.stats["stacked_positions"] += len(todo) * width

    def _stepper(self, key: tuple[int, ...]) -> Stepper:
        """A fresh one-row :class:`Stepper` on the source ``key`` (a seq2seq model's encoder states from the cache)."""
        ids = torch.tensor([key], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        if is_causal(self.model):
            return Stepper(self.model, ids, mask)
        return Stepper(self.model, ids, mask,
                       encoder_outputs=BaseModelOutput(last_hidden_state=self._encoder_states([key])[0][None]))

    def _evict(self) -> None:
        while self._n_states > self._dec_cache_size:
            key, group = next(iter(self._states.items()))
            if group:
                group.pop(0)
                self._n_states -= 1
                self.stats["state_evictions"] += 1
            if not group:
                del self._states[key]

    @torch.no_grad()
    def next_tokens(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                    ) -> tuple[list[int], list[float]]:
        """Greedy ``w = argmax π_T(· | x, prefix)`` and its log-prob, one per row (SPEC §2)."""
        t0 = time.perf_counter()
        if len(prefixes) <= self.incremental_max_rows:
            last = torch.stack([self._last_logprobs_incremental(s, p) for s, p in zip(src, prefixes)])
        elif self.stack_caches:
            last = self._last_logprobs_stacked(src, prefixes)
        else:
            last = self._last_logprobs_batched(src, prefixes)
        val, idx = last.max(dim=-1)
        self._account(len(prefixes), t0)
        return idx.tolist(), val.tolist()

    @torch.no_grad()
    def score(self, src: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """``log π_T(y_t | x, y_<t)`` for every token of every output (the reward, SPEC §3)."""
        t0 = time.perf_counter()
        lp = self._logprobs(src, [o[:-1] for o in outputs])  # positions 0..T-1 predict y_1..y_T
        out = []
        for i, o in enumerate(outputs):
            y = torch.as_tensor(list(o), dtype=torch.long, device=self.device)
            out.append(lp[i, torch.arange(len(o)), y].cpu().numpy().astype(np.float32))
        self._account(len(outputs), t0)
        return out

    @torch.no_grad()
    def distributions(self, src: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-forced ``log π_T(· | x, y_<t)``, ``[B, T, |V|]`` (T = longest output; rows beyond an output's
        length are padding) — what the Phase-1 oracle and its distillation term need."""
        return self._logprobs(src, [list(o[:-1]) for o in outputs]).cpu()

    @torch.no_grad()
    def generate(self, src: Sequence[Sequence[int]], max_len: int, eos_id: int) -> list[list[int]]:
        """Teacher-alone greedy decoding (KV-cached, through ``generate``), EOS included when produced."""
        ids, mask = pad_batch(src, self.pad_id, self.device)
        causal = is_causal(self.model)
        if causal:  # generate continues a causal LM's input: left padding
            ids, mask = left_align(ids, mask)
        out = self.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_len,
                                  do_sample=False, num_beams=1, pad_token_id=self.pad_id)
        res = []
        for row in out[:, ids.shape[1] if causal else 1:].tolist():  # drop the input / the decoder start
            res.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
        return res

    def _account(self, rows: int, t0: float) -> None:
        self.stats["calls"] += 1
        self.stats["rows"] += rows
        self.stats["seconds"] += time.perf_counter() - t0


def _common(a: Sequence[int], b: Sequence[int], most: int) -> int:
    """The length of the longest common start of ``a`` and ``b``, at most ``most``."""
    n = 0
    for x, y in zip(a, b):
        if n >= most or x != y:
            break
        n += 1
    return n


def _key(seq: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(x) for x in seq)
