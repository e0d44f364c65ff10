"""Two model families behind one interface: encoder–decoders (T5) and decoder-only causal LMs (Llama, Qwen2, GPT-2,
SmolLM …), chosen by the model's own config (``is_encoder_decoder``).

Everything in tw-rl speaks in the encoder–decoder's terms: an input ``x`` (``src_ids``/``src_mask``, right-padded)
and an output read position by position, whose first position is fed the decoder start token; position ``t``'s
logits predict ``y_t``. A causal LM reads the same thing as one sequence ``x ⧺ y``: the input is left-aligned (left
padding, position ids counted from each row's first real token), and "feeding the decoder start" means reading the
input, whose last position predicts ``y_0``. Three pieces carry this, so the student, the teacher, the decoding loop
and phase 0 never branch on the family:

- :class:`Stepper`: one batch of sequences extended a few positions at a time with a KV cache (acting, the
  teacher's incremental calls, the teacher alone, speculative verification);
- :func:`forced`: every position at once, teacher-forced (training, scoring);
- :class:`InputTemplate`: how a text becomes the input ids — the tokenizer's own special tokens for a seq2seq model;
  for a causal LM the user message of the tokenizer's chat template (with the generation prompt) when it has one,
  else ``x`` then EOS as the separator (the "source → target" plain template).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

SEQ2SEQ, CAUSAL = "seq2seq", "causal"
FAMILIES = (SEQ2SEQ, CAUSAL)


def family_of(model_or_config) -> str:
    """``"seq2seq"`` for an encoder–decoder (its config's ``is_encoder_decoder``), else ``"causal"``."""
    config = getattr(model_or_config, "config", model_or_config)
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def is_causal(model_or_config) -> bool:
    return family_of(model_or_config) == CAUSAL


def auto_model_class(config):
    """``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM``, by the config's family."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if is_causal(config) else AutoModelForSeq2SeqLM


def start_token_id(model_or_config, pad_id: int) -> int:
    """The decoder start token: a seq2seq model's own; for a causal LM, whose start position is its input's last, any
    id stands in (``pad_id``: it is never read)."""
    config = getattr(model_or_config, "config", model_or_config)
    if is_causal(config):
        return int(pad_id)
    start = getattr(config, "decoder_start_token_id", None)
    return int(pad_id if start is None else start)


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens (``mask`` true) to the right end, keeping their order: right padding → left
    padding (a row already left-padded is unchanged)."""
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # pads first, then the tokens, in order
    return ids.gather(1, order), mask.gather(1, order)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class _Capture:
    """The output layer's input (the final decoder state ``h``) of the next forward, through a forward hook."""

    def __init__(self, model, on: bool):
        self.model, self.on, self.value = model, on, None

    def __enter__(self):
        self.hook = (self.model.get_output_embeddings().register_forward_hook(self._grab) if self.on else None)
        return self

    def _grab(self, mod, args, out):
        self.value = args[0]

    def __exit__(self, *exc):
        if self.hook is not None:
            self.hook.remove()


@dataclass
class Forced:
    """What :func:`forced` returns: ``logits [B, L, V_out]`` (position t predicts y_t), the final decoder state
    ``hidden [B, L, d]`` when asked, and the input's states ``prompt [B, S, d]`` with their mask (the encoder's output;
    a causal LM's final states over the input, left-aligned) — what the ``prompt_gate`` head reads."""

    logits: torch.Tensor
    hidden: torch.Tensor | None
    prompt: torch.Tensor | None
    prompt_mask: torch.Tensor


def forced(model, src_ids: torch.Tensor, src_mask: torch.Tensor, dec_ids: torch.Tensor | None = None,
           dec_embeds: torch.Tensor | None = None, *, hidden: bool = False, prompt: bool = False,
           encoder_outputs=None) -> Forced:
    """Teacher-forced logits at every output position. ``dec_ids [B, L]`` (or ``dec_embeds [B, L, d]``) are the
    decoder inputs: the start token, then ``y_0 … y_{L-2}``. A causal LM reads ``x ⧺ y_{<L-1}`` (the start position is
    the input's last) and, unless ``prompt`` asks for the input's final states (the ``prompt_gate`` head's), its
    output layer runs on the ``L`` output positions only (``logits_to_keep``). ``encoder_outputs``: a seq2seq model's
    encoder states, computed already (a seq2seq model always returns its encoder's states)."""
    if (dec_ids is None) == (dec_embeds is None):
        raise ValueError("forced: give dec_ids or dec_embeds")
    if not is_causal(model):
        with _Capture(model, hidden) as cap:
            out = model(input_ids=None if encoder_outputs is not None else src_ids, attention_mask=src_mask.long(),
                        encoder_outputs=encoder_outputs, decoder_input_ids=dec_ids, decoder_inputs_embeds=dec_embeds,
                        use_cache=False)
        return Forced(out.logits, cap.value, out.encoder_last_hidden_state, src_mask)
    ids, mask = left_align(src_ids, src_mask)
    S = ids.shape[1]
    embed = model.get_input_embeddings()
    rest = embed(dec_ids[:, 1:]) if dec_embeds is None else dec_embeds[:, 1:]
    inputs = torch.cat([embed(ids).to(rest.dtype), rest], dim=1)
    full_mask = torch.cat([mask.long(), torch.ones(rest.shape[:2], dtype=torch.long, device=mask.device)], dim=1)
    L = dec_ids.shape[1] if dec_ids is not None else dec_embeds.shape[1]
    kw = {"logits_to_keep": L} if not prompt and _keeps_logits(model) else {}
    with _Capture(model, hidden or prompt) as cap:
        out = model(inputs_embeds=inputs, attention_mask=full_mask, position_ids=_positions(full_mask),
                    use_cache=False, **kw)
    h = cap.value
    return Forced(out.logits[:, -L:], None if h is None or not hidden else h[:, -L:],
                  h[:, :S] if prompt else None, mask)


class Stepper:
    """``B`` sequences read a few positions at a time with a KV cache. :meth:`feed` takes the next decoder inputs
    ``[B, k]`` (ids or embeddings) and returns the logits ``[B, k, V_out]`` at those positions; the first feed starts
    with the decoder start token. For a causal LM the start token stands for the input: the first feed reads the
    left-aligned input and then the other ``k − 1`` positions. :attr:`prompt` / :attr:`prompt_mask` are the input's
    states (for the ``prompt_gate`` head) once the first feed has been made (at once for a seq2seq model)."""

    def __init__(self, model, src_ids: torch.Tensor, src_mask: torch.Tensor, encoder_outputs=None):
        self.model, self.causal = model, is_causal(model)
        self.fed = 0
        if self.causal:
            self.ids, self.prompt_mask = left_align(src_ids, src_mask)
            self.mask = self.prompt_mask.long()
            self.cache = DynamicCache()
            self.prompt = None
            self._keep = _keeps_logits(model)
        else:
            self.prompt_mask = src_mask
            self.mask = src_mask.long()
            self.enc = (encoder_outputs if encoder_outputs is not None
                        else model.get_encoder()(input_ids=src_ids, attention_mask=self.mask))
            self.prompt = getattr(self.enc, "last_hidden_state", None)
            if self.prompt is None:
                self.prompt = self.enc[0]
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    def feed(self, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None, *, read_prompt: bool = False
             ) -> torch.Tensor:
        """Logits ``[B, k, V_out]`` at the ``k`` positions fed. ``read_prompt`` (causal, first feed): keep the
        input's final states in :attr:`prompt`."""
        if (ids is None) == (embeds is None):
            raise ValueError("Stepper.feed: give ids or embeds")
        k = (ids if ids is not None else embeds).shape[1]
        if not self.causal:
            out = self.model(encoder_outputs=self.enc, attention_mask=self.mask, decoder_input_ids=ids,
                             decoder_inputs_embeds=embeds, cache=self.cache, use_cache=True)
            self.fed += k
            return out.logits
        B = self.mask.shape[0]
        if self.fed == 0:  # the start position is the input's last: read the input, then the rest of this feed
            embed = self.model.get_input_embeddings()
            rest = (embed(ids[:, 1:]) if ids is not None else embeds[:, 1:])
            inputs = torch.cat([embed(self.ids).to(rest.dtype), rest], dim=1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(B, k - 1)], dim=1)
            positions = _positions(self.mask)
            kw = {"logits_to_keep": k} if self._keep and not read_prompt else {}
            with _Capture(self.model, read_prompt) as cap:
                out = self.model(inputs_embeds=inputs, attention_mask=self.mask, position_ids=positions,
                                 cache=self.cache, use_cache=True, **kw)
            if read_prompt:
                self.prompt = cap.value[:, :self.ids.shape[1]]
            self.fed += k
            return out.logits[:, -k:]
        start = _positions(self.mask)[:, -1:] + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, k)], dim=1)
        positions = start + torch.arange(k, device=start.device)[None]
        out = self.model(input_ids=ids, inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                         cache=self.cache, use_cache=True)
        self.fed += k
        return out.logits

    def crop(self, n: int) -> None:
        """Forget every position fed after the first ``n`` (``1 ≤ n``; speculative decoding's rejected drafts)."""
        if not 1 <= n <= self.fed:
            raise ValueError(f"Stepper.crop: keep 1..{self.fed} positions, not {n}")
        if n == self.fed:
            return
        drop = self.fed - n
        if self.causal and self.mask.shape[0] == 1:  # one row (the teacher's): its cache may hold masked padding
            # (feed_rows), so keep up to its (input + n − 1)-th real position rather than counting columns
            real = self.mask[0].long().cumsum(0)
            keep = int((real < int(self.prompt_mask.sum()) + n - 1).sum()) + 1
            drop = self.mask.shape[1] - keep
        self.cache.crop(-drop)  # (transformers 5: a negative count of positions to drop from the end)
        if self.causal:
            self.mask = self.mask[:, :-drop]
        self.fed = n


def feed_rows(steppers: Sequence[Stepper], new: Sequence[Sequence[int]], pad_id: int = 0
              ) -> tuple[torch.Tensor, int]:
    """Feed one-row causal :class:`Stepper` s their next ids in **one** forward: the logits ``[B, V_out]`` at each
    row's last new position, and the block's width. Row ``i`` reads ``new[i]`` (≥ 1 id; a stepper that has fed
    nothing reads its input first, the first id standing for the start as in :meth:`Stepper.feed`). The rows' KV
    caches, of different lengths, are stacked left-padded to the longest; the new ids are right-aligned in a block
    as wide as the longest, so every row's last new position is the block's last column. Each stepper keeps its own
    positions afterwards — its cache, then the block, in-block padding included (masked; positions come from the
    mask, so padding never shifts a position). Only caches whose layers are all plain (no sliding window)."""
    if not steppers or not all(st.causal and st.mask.shape[0] == 1 for st in steppers):
        raise ValueError("feed_rows: give one-row steppers of a causal LM")
    if any(len(n) < 1 for n in new) or len(new) != len(steppers):
        raise ValueError("feed_rows: give every stepper at least one new id")
    model = steppers[0].model
    device = steppers[0].mask.device
    rows = [(st.ids[0][st.prompt_mask[0]].tolist() + list(n[1:])) if st.fed == 0 else list(n)
            for st, n in zip(steppers, new)]
    held = [st.mask.shape[1] if st.fed else 0 for st in steppers]  # cache positions, padding included
    B, L, N = len(steppers), max(held), max(len(r) for r in rows)
    ids = torch.full((B, N), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L + N, dtype=torch.long)
    for i, (st, r) in enumerate(zip(steppers, rows)):
        ids[i, N - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, L + N - len(r):] = 1
        if held[i]:
            mask[i, L - held[i]:L] = st.mask[0].cpu()
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache()
    if L:
        full = [st.cache for st, h in zip(steppers, held) if h]
        layers = []
        for layer in range(len(full[0].layers)):
            kv = []
            for part in ("keys", "values"):
                ref = getattr(full[0].layers[layer], part)
                kv.append(torch.cat([torch.nn.functional.pad(
                    getattr(st.cache.layers[layer], part) if h else ref[:, :, :0], (0, 0, L - h, 0))
                    for st, h in zip(steppers, held)]))
            layers.append(tuple(kv))
        cache = DynamicCache(ddp_cache_data=layers)
    kw = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)[:, L:], cache=cache,
                use_cache=True, **kw)
    for i, (st, n) in enumerate(zip(steppers, new)):
        start = L - held[i]  # the row's own positions: its cache, then the block
        st.cache = DynamicCache(ddp_cache_data=[(layer.keys[i:i + 1, :, start:].clone(),
                                                 layer.values[i:i + 1, :, start:].clone()) for layer in cache.layers])
        st.mask = mask[i:i + 1, start:].clone()
        st.fed += len(n)
    return out.logits[:, -1], N


# ----------------------------------------------------------------------------------------------------------------
# inputs as text


@dataclass
class InputTemplate:
    """How a text becomes a model's input ids. ``seq2seq``: the tokenizer with its special tokens (T5 appends EOS).
    ``causal``: with a chat template, ``x`` as the user message and the assistant's generation prompt after it;
    without one, the tokenizer's own tokens of ``x`` then EOS (the separator before the output). A causal LM's outputs
    end with EOS too (:meth:`targets`)."""

    tokenizer: PreTrainedTokenizerBase
    family: str = SEQ2SEQ
    use_chat_template: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is unknown; known: {FAMILIES}")

    @property
    def chat(self) -> bool:
        return self.family == CAUSAL and self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def inputs(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        if self.family == SEQ2SEQ:
            return tok(list(texts), add_special_tokens=True)["input_ids"]
        if self.chat:
            return [list(_ids(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True,
                                                      add_generation_prompt=True))) for t in texts]
        eos = tok.eos_token_id
        out = tok(list(texts), add_special_tokens=True)["input_ids"]
        return [ids if ids and ids[-1] == eos else list(ids) + [eos] for ids in out]

    def targets(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        if self.family == SEQ2SEQ:
            return tok(list(texts), add_special_tokens=True)["input_ids"]
        eos = tok.eos_token_id
        out = tok(list(texts), add_special_tokens=False)["input_ids"]
        return [ids if ids and ids[-1] == eos else list(ids) + [eos] for ids in out]

    def overhead(self) -> int:
        """Input tokens the template adds around a text (what a source-length limit must leave room for)."""
        return len(self.inputs([""])[0])

    def check_keeps(self, text: str) -> None:
        """A chat template that drops or rewrites the user's message (e.g. the budget prompt) is an error naming the
        tokenizer, before any training."""
        if not self.chat:
            return
        decoded = self.tokenizer.decode(self.inputs([text])[0])
        if text.strip() not in decoded:
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise ValueError(f"the chat template of the tokenizer {name!r} does not keep the user message "
                             f"{text!r} (it decodes to {decoded!r}): the student could not read its budget prompt. "
                             f"Fix the template or set the model's `chat_template: false` to use the plain "
                             f"'input, EOS, output' template")


def _ids(x) -> list[int]:
    """``apply_chat_template(tokenize=True)``'s ids: a list, or (transformers ≥ 5) a ``BatchEncoding``."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return list(x["input_ids"])
