"""Build, load and save teachers and students of either model family (:mod:`tw_rl.models.family`).

``build_model`` makes a model from an :class:`~tw_rl.config.ArchConfig` and a tokenizer (trained from scratch in
phase 0): a T5 (``build_t5``) or a decoder-only Llama, Qwen2 or GPT-2 (``build_causal``), by ``arch.model_type``.
``load_model`` loads a model and its tokenizer from a local directory, the Hugging Face hub or a GGUF file
(:mod:`tw_rl.models.gguf`), as a seq2seq model or a causal LM by the model's own config; ``save_model`` writes both
in Hugging Face format (safetensors). Teacher and student must share one vocabulary (``check_shared_vocab``): the
student's actions are token ids the teacher scores. A causal LM's tokenizer must have a pad token
(``check_pad_token``): tw-rl never pads with EOS unasked.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, \
    PreTrainedConfig, PreTrainedTokenizerBase, Qwen2Config, T5Config, T5ForConditionalGeneration

from tw_rl.config import ConfigError
from tw_rl.models.errors import ModelNotAvailableError
from tw_rl.models.family import CAUSAL, SEQ2SEQ, InputTemplate, auto_model_class, family_of, is_causal
from tw_rl.models.location import local_path

CAUSAL_TYPES = ("llama", "qwen2", "gpt2")  # ArchConfig.model_type values that build a decoder-only LM




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


def causal_config(arch, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> PreTrainedConfig:
    """The Hugging Face config of a decoder-only LM of kind ``arch.model_type`` (``llama``, ``qwen2`` or ``gpt2``) and
    size ``arch`` for ``tokenizer`` — what :func:`build_causal` builds; a size the kind cannot take is a
    :class:`~tw_rl.config.ConfigError` naming the key to change.

    ``d_model`` → hidden size, ``d_ff`` → feed-forward size, ``num_heads`` → attention heads (as many key/value
    heads: no grouped-query attention), ``d_kv`` → head size (Llama and Qwen2 take any; GPT-2's is
    ``d_model / num_heads``, so ``d_kv`` must equal it), ``num_layers`` → layers (``num_decoder_layers`` is not
    used), ``dropout_rate`` → the attention dropout (GPT-2: also residual and embedding dropout).
    ``vocab_size = len(tokenizer)``; pad, eos and bos ids from the tokenizer (bos: its eos when it has none, as
    GPT-2's; tw-rl never feeds one). Input and output embeddings are tied, as the T5s'. ``max_positions``: the
    longest input plus output the model will read (GPT-2 learns one embedding per position; Llama and Qwen2 use
    rotary positions).

    Weights are drawn with standard deviation ``d_model^-0.5`` (LeCun), not Hugging Face's fixed 0.02 (LeCun's for
    d ≈ 2500): phase 0's optimizer scales every step by its tensor's RMS (``AdamWScale``), so tiny initial weights
    grow slowly — on the tiny test run (d 32, 40 steps) the held-out loss fell 5.30 → 4.86 with 0.02 and to 3.99
    with ``d_model^-0.5``, as a T5 of the same size does (4.02) from its own initialisation."""
    kind = arch.model_type
    if kind not in CAUSAL_TYPES:
        raise ConfigError(f"model_type={kind!r} is not a decoder-only kind; known: {', '.join(CAUSAL_TYPES)}")
    pad, eos = check_pad_token(tokenizer, f"building a {kind} model")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos,
               bos_token_id=eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
               tie_word_embeddings=True, initializer_range=arch.d_model ** -0.5)
    if kind in ("llama", "gpt2") and arch.d_model % arch.num_heads:
        raise ConfigError(f"arch.model_type={kind}: d_model={arch.d_model} is not a multiple of "
                          f"num_heads={arch.num_heads}; change arch.d_model or arch.num_heads")
    if kind == "gpt2":
        if arch.d_kv * arch.num_heads != arch.d_model:
            raise ConfigError(f"arch.model_type=gpt2: a GPT-2 head has d_model / num_heads = "
                              f"{arch.d_model // arch.num_heads} dimensions, not d_kv={arch.d_kv}; set "
                              f"arch.d_kv={arch.d_model // arch.num_heads} (or use llama or qwen2, whose head size "
                              f"is free)")
        p = arch.dropout_rate
        return GPT2Config(n_embd=arch.d_model, n_inner=arch.d_ff, n_head=arch.num_heads, n_layer=arch.num_layers,
                          n_positions=max_positions, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **ids)
    config_cls = LlamaConfig if kind == "llama" else Qwen2Config
    return config_cls(hidden_size=arch.d_model, intermediate_size=arch.d_ff, num_attention_heads=arch.num_heads,
                      num_key_value_heads=arch.num_heads, head_dim=arch.d_kv, num_hidden_layers=arch.num_layers,
                      max_position_embeddings=max_positions, attention_dropout=arch.dropout_rate, **ids)


def build_causal(arch, tokenizer: PreTrainedTokenizerBase, seed: int, max_positions: int) -> torch.nn.Module:
    """A freshly initialised decoder-only LM (``arch.model_type``: Llama, Qwen2 or GPT-2) of size ``arch`` for
    ``tokenizer``, as :func:`causal_config` maps the sizes. The initialisation depends only on ``seed`` (the global
    torch RNG state is left unchanged), as :func:`build_t5`'s."""
    config = causal_config(arch, tokenizer, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


def build_model(arch, tokenizer: PreTrainedTokenizerBase, seed: int, max_positions: int) -> torch.nn.Module:
    """A freshly initialised model of kind ``arch.model_type``: a T5 (:func:`build_t5`; its relative positions need
    no ``max_positions``) or a decoder-only LM (:func:`build_causal`)."""
    if arch.model_type == "t5":
        return build_t5(arch, tokenizer, seed)
    return build_causal(arch, tokenizer, seed, max_positions)


def check_buildable(arch, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> None:
    """Raise what :func:`build_model` would raise for ``arch`` and ``tokenizer``, without building anything (phase 0
    checks every model it is to build before it trains any)."""
    if arch.model_type == "t5":
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer {_name(tokenizer)!r} has no pad or no eos token: a T5 built in phase 0 "
                              f"needs both (pad is also its decoder start); point tokenizer.path at one that has them "
                              f"or leave it unset to train one on the data")
        return
    causal_config(arch, tokenizer, max_positions)


def _layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """``(prefix, layers)``: the state-dict prefix of a decoder-only LM's decoder layers and the layers themselves —
    ``model.layers`` (Llama, Qwen2) or ``transformer.h`` (GPT-2)."""
    if model.config.model_type == "gpt2":
        return "transformer.h.", model.transformer.h
    return "model.layers.", model.model.layers


def check_init_layers(layers, teacher_config, teacher: str) -> None:
    """Raise :class:`~tw_rl.config.ConfigError` unless :func:`init_from_layers` can keep ``layers`` of a teacher of
    ``teacher_config`` (named ``teacher`` in the message): a decoder-only Llama, Qwen2 or GPT-2 with every index
    below its layer count, listed once and in order (phase 0 checks this before it trains anything)."""
    key = f"student.init_layers={list(layers)}"
    kind = getattr(teacher_config, "model_type", None)
    if not is_causal(teacher_config):
        raise ConfigError(f"{key} needs a decoder-only teacher (Llama, Qwen2 or GPT-2 kind); the teacher {teacher} is "
                          f"an encoder-decoder ({kind}): give a causal teacher or leave student.init_layers unset")
    if kind not in CAUSAL_TYPES:
        raise ConfigError(f"{key}: the teacher {teacher} is a {kind!r} model; tw-rl drops layers of "
                          f"{', '.join(CAUSAL_TYPES)} models only: leave student.init_layers unset (build "
                          f"student.arch) for this teacher")
    if kind == "gpt2" and getattr(teacher_config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(f"{key}: the GPT-2 teacher {teacher} scales attention by 1/(layer index + 1) "
                          f"(scale_attn_by_inverse_layer_idx), which renumbered layers would change: leave "
                          f"student.init_layers unset for this teacher")
    n = int(teacher_config.num_hidden_layers)
    if not layers:
        raise ConfigError(f"{key} is empty: list the teacher's decoder layers to keep (0..{n - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"{key} must list each teacher layer once, in increasing order, e.g. {sorted(set(layers))}")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{key}: the teacher {teacher} has {n} decoder layer{'s' if n != 1 else ''} (0..{n - 1}); {bad} "
                          f"{'is' if len(bad) == 1 else 'are'} out of range")


def pruned_config(teacher_config, layers) -> PreTrainedConfig:
    """The teacher's config with only ``layers`` kept: the layer count (``num_hidden_layers``, GPT-2's ``n_layer``)
    and every per-layer list (Qwen2's ``layer_types``) sliced; Qwen2's ``max_window_layers`` counts the kept layers
    below it (``layer_types`` is what its model reads). A GGUF teacher's ``quantization_config`` is dropped: the
    student's weights are plain float tensors (the teacher's were dequantized on load), and a config that kept it
    would reload as a GGUF-quantized model that transformers refuses to save."""
    config = copy.deepcopy(teacher_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    n = int(teacher_config.num_hidden_layers)
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, type(value)(value[i] for i in layers))
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(i < teacher_config.max_window_layers for i in layers)
    config.num_hidden_layers = len(layers)
    return config


def init_from_layers(teacher: torch.nn.Module, layers) -> torch.nn.Module:
    """A student made from ``teacher`` (a decoder-only Llama, Qwen2 or GPT-2) by dropping layers, as DistilBERT was
    made from BERT (Sanh et al. 2019): the teacher's embeddings (GPT-2's position table too), final norm and output
    layer, and its decoder layers ``layers`` (0-based, increasing) as layers ``0 … k−1``.

    The student is a fresh model of the smaller config (:func:`pruned_config`) loaded with those weights (copies:
    training it leaves the teacher as it was), so every attention module's ``layer_idx`` — the KV cache's slot — is
    its new position and the saved model reloads as it is. Raises :class:`~tw_rl.config.ConfigError` for a teacher
    or a layer list it cannot take (:func:`check_init_layers`)."""
    check_init_layers(layers, teacher.config, getattr(teacher.config, "name_or_path", "") or type(teacher).__name__)
    config = pruned_config(teacher.config, layers)
    with torch.random.fork_rng(devices=[]):  # the fresh weights are overwritten below: leave the RNG as it was
        student = type(teacher)(config)
    prefix, _ = _layer_stack(student)
    source = teacher.state_dict()
    weights = {}
    for key in student.state_dict():
        old = key
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            old = f"{prefix}{layers[int(j)]}.{rest}"
        weights[key] = source[old].detach().clone()
    student.load_state_dict(weights, strict=True)
    student.to(next(teacher.parameters()).dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


def check_pad_token(tokenizer: PreTrainedTokenizerBase, what: str) -> tuple[int, int]:
    """``(pad_id, eos_id)`` of a causal LM's tokenizer; a tokenizer without a pad token (or an eos token) is a
    :class:`ModelNotAvailableError` naming ``what`` (the model, or the model being built) and the way out. tw-rl pads
    every batch (a causal LM's inputs on the left) and never pads with EOS unasked: a tokenizer whose pad token *is*
    its EOS (as SmolLM2's) says so itself and is taken as it is."""
    if tokenizer.eos_token_id is None:
        raise ModelNotAvailableError(f"{what}: the tokenizer {_name(tokenizer)!r} has no eos token; a causal LM's "
                                     f"outputs end with it. Give the tokenizer one (tok.eos_token = ...), save it and "
                                     f"point the model (or tokenizer.path) at the saved directory")
    if tokenizer.pad_token_id is None:
        raise ModelNotAvailableError(
            f"{what}: the tokenizer {_name(tokenizer)!r} has no pad token; tw-rl pads batches of a causal LM (its "
            f"inputs on the left, under the attention mask) and does not pick a pad token for you. Give the tokenizer "
            f"one and save it with the model: tok.pad_token = tok.eos_token (EOS doubles as padding) or "
            f"tok.add_special_tokens({{'pad_token': '<pad>'}}) with model.resize_token_embeddings(len(tok)); then "
            f"tok.save_pretrained(DIR), model.save_pretrained(DIR) and point teacher.name_or_path / "
            f"student.name_or_path (or tokenizer.path) at DIR")
    return int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


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
            f"could not load a model (seq2seq or causal LM) and its tokenizer from the directory {local}: {e}. It "
            f"must hold a Hugging Face model (config.json, model.safetensors) and its tokenizer files, as written by "
            f"save_pretrained (or a GGUF file: name it, or set gguf_file)")
    where = ("HF_HUB_OFFLINE=1 is set" if _offline()
             else "it is not in the local Hugging Face cache and the hub could not be reached")
    first_line = str(e).splitlines()[0] if str(e) else ""
    return ModelNotAvailableError(
        f"model {name_or_path!r} is not available offline ({where}). Download it on a machine with network access "
        f"(e.g. `hf download {name_or_path} --local-dir DIR`), copy DIR here and point at that local directory "
        f"(teacher.name_or_path=DIR, student.name_or_path=DIR or tokenizer.path=DIR); or leave name_or_path unset to "
        f"train a model from scratch in phase 0. Cause: {type(e).__name__}: {first_line}")


def _resolve(name_or_path: str) -> str:
    local = local_path(name_or_path)  # package:NAME is an installed package's directory
    return str(local) if local.is_dir() else name_or_path


def is_gguf(name_or_path: str | Path, gguf_file: str | None = None) -> bool:
    """Whether a model source is a GGUF file: a path ending ``.gguf``, or a directory with ``gguf_file``."""
    return gguf_file is not None or str(name_or_path).endswith(".gguf")


def source_name(name_or_path: str | Path, gguf_file: str | None = None) -> str:
    """How a model source is named in messages and records: the path, or ``directory/gguf_file``."""
    return str(Path(name_or_path) / gguf_file) if gguf_file is not None else str(name_or_path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` (of a GGUF file too: :func:`is_gguf`) with the same clear error as
    :func:`load_model`."""
    if is_gguf(name_or_path, gguf_file):
        from tw_rl.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(name_or_path, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(_resolve(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The model's own ``config.json`` (which decides its family), with the clear error of :func:`load_model`."""
    try:
        return AutoConfig.from_pretrained(_resolve(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e


def load_weights(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None
                 ) -> torch.nn.Module:
    """The model alone, eval mode: a GGUF causal LM (:mod:`tw_rl.models.gguf`), else ``AutoModelForSeq2SeqLM`` or
    ``AutoModelForCausalLM`` by the model's config (:func:`tw_rl.models.family.auto_model_class`), safetensors
    weights only. What :func:`load_model` and the teacher server (which needs no tokenizer) load."""
    if is_gguf(name_or_path, gguf_file):
        from tw_rl.models.gguf import load_gguf_model

        return load_gguf_model(name_or_path, gguf_file)
    config = load_model_config(name_or_path, trust_remote_code)
    try:
        model = auto_model_class(config).from_pretrained(_resolve(name_or_path), use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_available(name_or_path, e) from e
    return model.eval()


def load_model(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None
               ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``, model in eval mode, from a local directory, a hub name or a GGUF file (a path
    ending ``.gguf``, or the directory ``name_or_path`` with ``gguf_file``): a seq2seq model or a causal LM, as the
    model's own config says (:func:`load_weights`).

    Raises :class:`ModelNotAvailableError` naming the model and the way out when it cannot be loaded — e.g. a hub
    name on a machine without network or with ``HF_HUB_OFFLINE=1`` (which fails at once), a GGUF file that is
    missing or truncated — or when it is a causal LM whose tokenizer has no pad token (:func:`check_pad_token`,
    before its weights load).
    """
    name = source_name(name_or_path, gguf_file)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code, gguf_file)
    if is_gguf(name_or_path, gguf_file) or family_of(load_model_config(name_or_path, trust_remote_code)) == CAUSAL:
        check_pad_token(tokenizer, name)
    return load_weights(name_or_path, trust_remote_code, gguf_file), tokenizer


def load_seq2seq(name_or_path: str, trust_remote_code: bool = False
                 ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The name earlier callers use for :func:`load_model` (it loads either family now)."""
    return load_model(name_or_path, trust_remote_code)


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write model (safetensors) and tokenizer to ``directory`` in Hugging Face format; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def check_shared_vocab(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                       names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise :class:`~tw_rl.config.ConfigError` (a ``ValueError``) unless both tokenizers map the same tokens to the
    same ids, whatever the two models' families.

    The message names both (``names``), gives both sizes and the first id whose token differs.
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
    a, b = names
    raise ConfigError(
        f"vocabularies differ between {a} and {b}: {a} has {len(tv)} tokens, {b} has {len(sv)}; first "
        f"difference at id {first}: {t_by_id.get(first)!r} vs {s_by_id.get(first)!r}. The "
        f"student's actions are token ids scored by the teacher, so both must use the same tokenizer: give a "
        f"teacher and a student of one tokenizer (or train the other one in phase 0 on it)")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def role_family(cfg, role: str) -> str:
    """The model family (:mod:`tw_rl.models.family`) of ``role`` (``"teacher"`` or ``"student"``): a given model's
    own config decides (a GGUF file is a causal LM); a model built in phase 0 is ``arch.model_type``'s, a student
    made of the teacher's layers (``student.init_layers``) a causal LM."""
    mcfg = getattr(cfg, role)
    if getattr(mcfg, "init_layers", None) is not None:  # a student made of the (decoder-only) teacher's layers
        return CAUSAL
    if not mcfg.name_or_path:
        return SEQ2SEQ if mcfg.arch.model_type == "t5" else CAUSAL
    if is_gguf(mcfg.name_or_path, mcfg.gguf_file):
        return CAUSAL
    return family_of(load_model_config(mcfg.name_or_path, mcfg.trust_remote_code))


def input_template(cfg, role: str, tokenizer: PreTrainedTokenizerBase, family: str | None = None) -> InputTemplate:
    """How ``role``'s inputs are written (:class:`~tw_rl.models.family.InputTemplate`): its family's, with the chat
    template when the model is a causal LM, ``{role}.chat_template`` is on and the tokenizer has one."""
    return InputTemplate(tokenizer, family or role_family(cfg, role), getattr(cfg, role).chat_template)
