"""The teacher: answers ``<τ>`` calls (greedy next token) and scores outputs (log-probs per token).

:class:`Teacher` is a plain class that implements :class:`envs.token_mdp.TeacherClient` on a Hugging Face
seq2seq model. It batches the rows of one request and caches encoder states per source, so a ``<τ>`` call costs
one decoder pass over the (short) prefix, not a full encoder–decoder pass. Dynamic batching of concurrent
requests from many rollout workers lives in :mod:`tw_rl.distributed` (the Ray actor wraps this class).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from tw_rl.examples import pad_batch


class Teacher:
    """``vocab_size`` is ``|V|`` (the student's vocabulary without ``<τ>``); greedy tokens are drawn from it."""

    def __init__(self, model: PreTrainedModel, vocab_size: int, pad_id: int = 0, start_id: int = 0,
                 encoder_cache_size: int = 8192, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.vocab_size, self.pad_id, self.start_id, self.device = vocab_size, pad_id, start_id, torch.device(device)
        self._enc_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._enc_cache_size = encoder_cache_size
        self.stats = {"calls": 0, "rows": 0, "seconds": 0.0, "encoder_hits": 0, "encoder_misses": 0}

    # ----------------------------------------------------------------------------------------------------------
    def _encode(self, src: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``[B, S, d]`` and mask ``[B, S]``, computing only sources not in the LRU cache."""
        keys = [tuple(int(x) for x in s) for s in src]
        missing = list(dict.fromkeys(k for k in keys if k not in self._enc_cache))
        self.stats["encoder_hits"] += len(keys) - len(missing)
        self.stats["encoder_misses"] += len(missing)
        if missing:
            ids, mask = _pad(missing, self.pad_id, self.device)
            hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            for i, k in enumerate(missing):
                self._enc_cache[k] = hidden[i, :len(k)]
        for k in keys:
            self._enc_cache.move_to_end(k)
        states = [self._enc_cache[k] for k in keys]
        while len(self._enc_cache) > self._enc_cache_size:
            self._enc_cache.popitem(last=False)
        S = max(s.shape[0] for s in states)
        out = states[0].new_zeros(len(states), S, states[0].shape[1])
        mask = torch.zeros(len(states), S, dtype=torch.bool, device=self.device)
        for i, s in enumerate(states):
            out[i, :s.shape[0]], mask[i, :s.shape[0]] = s, True
        return out, mask

    def _logprobs(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-forced ``log π_T(· | x, prefix[<t])`` for t = 0..len(prefix): ``[B, L+1, |V|]``."""
        hidden, mask = self._encode(src)
        dec, _ = _pad([[self.start_id] + list(p) for p in prefixes], self.pad_id, self.device)
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask.long(),
                            decoder_input_ids=dec, use_cache=False).logits
        # normalise over the model's full output layer (hub models may pad it), then keep V
        return torch.log_softmax(logits.float(), dim=-1)[..., :self.vocab_size]

    @torch.no_grad()
    def next_tokens(self, src: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]
                    ) -> tuple[list[int], list[float]]:
        """Greedy ``w = argmax π_T(· | x, prefix)`` and its log-prob, one per row (SPEC §2)."""
        t0 = time.perf_counter()
        lp = self._logprobs(src, prefixes)
        last = lp[torch.arange(len(prefixes)), torch.tensor([len(p) for p in prefixes])]
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
        ids, mask = _pad(src, self.pad_id, self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_len,
                                  do_sample=False, num_beams=1)
        res = []
        for row in out[:, 1:].tolist():  # drop the decoder start
            res.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
        return res

    def _account(self, rows: int, t0: float) -> None:
        self.stats["calls"] += 1
        self.stats["rows"] += rows
        self.stats["seconds"] += time.perf_counter() - t0


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch(seqs, pad_id)
    return ids.to(device), mask.to(device)
