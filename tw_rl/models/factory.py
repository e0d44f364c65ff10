"""Build, load and save the T5-style teacher and student.

``build_t5`` makes a model from an :class:`~tw_rl.config.ArchConfig` and a tokenizer (trained from scratch in
phase 0); ``load_seq2seq`` loads a model and its tokenizer from a local directory or the Hugging Face hub;
``save_seq2seq`` writes both in Hugging Face format (safetensors). Teacher and student must share one vocabulary
(``check_shared_vocab``): the student's actions are token ids the teacher scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase, T5Config, \
    T5ForConditionalGeneration


class ModelNotAvailableError(OSError):
    """A model (or its tokenizer) could not be loaded; the message says why and what to do."""


def build_t5(arch, tokenizer: PreTrainedTokenizerBase, seed: int) -> T5ForConditionalGeneration:
    """A freshly initialised T5 of size ``arch`` (:class:`~tw_rl.config.ArchConfig`) for ``tokenizer``.

    ``vocab_size = len(tokenizer)``; pad id (= decoder start) and eos id come from the tokenizer. Input and output
    embeddings are tied (T5 v1.0 style, decoder output scaled by ``d_model^-0.5``); ReLU feed-forward.
    The initialisation depends only on ``seed`` (the global torch RNG state is left unchanged).
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("build_t5: the tokenizer needs a pad token (also the decoder start) and an eos token")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=arch.d_model,
        d_ff=arch.d_ff,
        d_kv=arch.d_kv,
        num_heads=arch.num_heads,
        num_layers=arch.num_layers,
        num_decoder_layers=arch.num_decoder_layers,
        dropout_rate=arch.dropout_rate,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    return model


_QUIET_BARS = ("Loading weights", "Writing model shards")  # transformers' per-model bars: ~10 per run


def quiet_weight_loading() -> None:
    """Hide transformers' weight-loading and -saving progress bars in this process (the CLI and Ray's workers call
    it); download bars of the Hugging Face hub stay (``transformers.utils.logging.disable_progress_bar`` would hide
    them too)."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in _QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _not_available(name_or_path: str, e: Exception) -> ModelNotAvailableError:
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return ModelNotAvailableError(
            f"could not load a seq2seq model and tokenizer from the directory {local}: {e}. It must hold a "
            f"Hugging Face model (config.json, model.safetensors) and its tokenizer files, as written by "
            f"save_pretrained")
    where = ("HF_HUB_OFFLINE=1 is set" if _offline()
             else "it is not in the local Hugging Face cache and the hub could not be reached")
    first_line = str(e).splitlines()[0] if str(e) else ""
    return ModelNotAvailableError(
        f"model {name_or_path!r} is not available offline ({where}). Download it on a machine with network access "
        f"(e.g. `hf download {name_or_path} --local-dir DIR`), copy DIR here and point at that local directory "
        f"(teacher.name_or_path=DIR, student.name_or_path=DIR or tokenizer.path=DIR); or leave name_or_path unset to "
        f"train a model from scratch in phase 0. Cause: {type(e).__name__}: {first_line}")


def _resolve(name_or_path: str) -> str:
    local = Path(name_or_path).expanduser()
    return str(local) if local.is_dir() else name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with the same clear error as :func:`load_seq2seq`."""
    try:
        return AutoTokenizer.from_pretrained(_resolve(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e


def load_seq2seq(name_or_path: str, trust_remote_code: bool = False
                 ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local directory or a hub name (safetensors weights only), model in eval
    mode.

    Raises :class:`ModelNotAvailableError` naming the model and the way out (a local directory) when it cannot be
    loaded, e.g. a hub name on a machine without network or with ``HF_HUB_OFFLINE=1`` (which fails at once).
    """
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    check_encoder_decoder(name_or_path, trust_remote_code)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(_resolve(name_or_path), use_safetensors=True,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e
    model.eval()
    return model, tokenizer


def check_encoder_decoder(name_or_path: str, trust_remote_code: bool = False) -> None:
    """A decoder-only model (its config not ``is_encoder_decoder``) is refused with what it is, before its weights
    load: the trainer's students and teachers are encoder-decoders (T5-style) today; decoder-only models load only
    as GGUF causal LMs (:mod:`tw_rl.models.gguf`), not yet into training."""
    try:
        config = AutoConfig.from_pretrained(_resolve(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e
    if not getattr(config, "is_encoder_decoder", False):
        kind = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ModelNotAvailableError(
            f"{name_or_path} is a decoder-only model ({kind}); tw-rl trains encoder-decoder (T5-style) students and "
            f"teachers, e.g. google/flan-t5-small: point teacher.name_or_path / student.name_or_path at one, or leave "
            f"them unset to train T5s from scratch in phase 0")


def save_seq2seq(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write model (safetensors) and tokenizer to ``directory`` in Hugging Face format; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def check_shared_vocab(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Raise ``ValueError`` unless both tokenizers map the same tokens to the same ids.

    The message gives both sizes and the first id whose token differs.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    t_by_id = {i: t for t, i in tv.items()}
    s_by_id = {i: t for t, i in sv.items()}
    first = None
    for i in range(max(len(t_by_id), len(s_by_id), max(t_by_id, default=-1) + 1, max(s_by_id, default=-1) + 1)):
        if t_by_id.get(i) != s_by_id.get(i):
            first = i
            break
    raise ValueError(
        f"teacher and student vocabularies differ: teacher has {len(tv)} tokens, student has {len(sv)}; first "
        f"difference at id {first}: teacher {t_by_id.get(first)!r} vs student {s_by_id.get(first)!r}. The "
        f"student's actions are token ids scored by the teacher, so both must use the same tokenizer")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
