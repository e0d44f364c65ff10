"""Phase 0: supervised training of teacher and student from scratch (SPEC §6), cached in the run directory.

``pretrain(cfg, run_dir)``

1. loads the training and held-out splits (``tw_rl.data.load_split``);
2. trains the shared tokenizer on the training split (or loads ``tokenizer.path``, or a given model's tokenizer)
   and saves it under ``run_dir/tokenizer``;
3. builds the teacher and the student (those without ``name_or_path``) of kind ``arch.model_type`` — a T5, or a
   decoder-only Llama, Qwen2 or GPT-2 (:func:`tw_rl.models.factory.build_model`); the two may differ, sharing the
   tokenizer — and trains them by cross-entropy on the target tokens of the plain sources — no budget prompt, no
   ``<τ>``; later phases add those. Each role's sources are written by its input template
   (:class:`tw_rl.models.family.InputTemplate`); a causal LM reads ``x ⧺ y`` and is trained on the ``y`` positions
   only (:func:`tw_rl.models.family.forced`). Given models are loaded (:func:`tw_rl.models.factory.load_model`, GGUF
   files too) and every model is checked (shared vocabulary, pad token, buildable size) before any is trained.
   Two options make the student's phase 0 distillation from the (given or trained) teacher: ``student.init_layers``
   builds it from the teacher's own layers (:func:`tw_rl.models.factory.init_from_layers`, layer-dropped as
   DistilBERT), and ``pretrain.student_targets=teacher`` trains it on the teacher's greedy outputs for the training
   sources instead of the references (sequence-level distillation, :func:`teacher_targets`, cached as
   ``models/teacher_targets.json``);
4. saves each under ``run_dir/models/{teacher,student}`` (Hugging Face format, safetensors) with a ``done.json``
   marker holding the training statistics and a fingerprint of the settings that produced it, so a second call
   with the same settings reuses the models;
5. evaluates both on the held-out split (greedy decoding, sacrebleu corpus BLEU: Hugging Face ``generate`` for a
   seq2seq model, tw-rl's KV-cached loop :func:`tw_rl.decoding.decode_teacher` for a causal LM) and, on the
   embedded task, where the errors sit (teacher-forced token accuracy on rare-word pieces vs the other tokens);
6. writes the summary to ``run_dir/pretrain.json`` and returns it.

Training is tuned for a few CPU cores: pairs are pre-tokenized once, batches are bucketed by length, the output
projection and the cross-entropy are computed only at non-padding target positions, and the optimizer is AdamW
with per-tensor scaled steps ("AdamWScale" of nanoT5), which learns far faster than plain AdamW from T5's
initialisation; with ``pretrain.bf16`` the forward and backward passes run under bfloat16 autocast (matrix
products ~2x faster on CPUs with AVX512-BF16/AMX; weights, optimizer state and the loss stay float32). Phase 0 runs
with ``pretrain.num_threads`` torch threads (see its help) and restores ``num_threads`` afterwards.
``tokens_per_s`` in the summary counts non-padding source and target tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tw_rl.config import ArchConfig, Config, ConfigError, given_tokenizer, prompt_tokens, source_room
from tw_rl.data import Pair, load_split
from tw_rl.data.validate import check_token_lengths
from tw_rl.decoding import decode_teacher
from tw_rl.evaluation.quality import MATCH_METRIC, match_rate
from tw_rl.evaluation.task import resolve_task
from tw_rl.examples import pad_batch
from tw_rl.manifest import Manifest, pairs_digest, say_recomputing
from tw_rl.models.factory import build_model, causal_config, check_buildable, check_init_layers, check_shared_vocab, \
    count_parameters, init_from_layers, input_template, load_model, load_tokenizer, save_model, source_name
from tw_rl.models.family import CAUSAL, SEQ2SEQ, InputTemplate, family_of, forced, is_causal, start_token_id
from tw_rl.models.tokenizer import budget_prompt_texts, train_tokenizer
from tw_rl.rundir import RunDir, atomic_dir, atomic_write

ROLES = ("teacher", "student")
_SEED_OFFSET = {"teacher": 1, "student": 2}  # teacher and student get different initialisations and data orders


# ----------------------------------------------------------------------------------------------------------------
# optimizer
# ----------------------------------------------------------------------------------------------------------------
class AdamWScale(torch.optim.Optimizer):
    """AdamW whose step for each tensor is scaled by that tensor's RMS (at least 1e-3), as in Adafactor.

    From nanoT5 (Nawrot 2023). Weight decay is decoupled and not scaled.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                t = state["step"]
                step = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                step *= max(1e-3, float(p.pow(2).mean().sqrt()))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step)
                if group["weight_decay"] > 0.0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
        return None


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``final_frac · peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Encoded:
    """Tokenized pairs (each list ends with eos)."""

    src: list[list[int]]
    tgt: list[list[int]]
    origins: list[str]


def encode_pairs(pairs: list[Pair], tok: PreTrainedTokenizerBase, max_src: int, max_tgt: int,
                 on_error: str = "raise", template: InputTemplate | None = None, prefix: str = "") -> Encoded:
    """Tokenize ``pairs`` (eos included) within ``max_src``/``max_tgt`` tokens, by the length rule of every phase
    (:func:`tw_rl.data.validate.check_token_lengths`: an over-long pair raises a :class:`DataError` naming its
    origin, or with ``on_error="skip"`` is left out). ``template``: how the model reads them (default: a seq2seq
    model's, the tokenizer with its special tokens on both sides). ``prefix`` (``task_prompt``) is written before
    every source after the length check (``max_src`` leaves room for it, :func:`tw_rl.config.source_room`)."""
    template = template or InputTemplate(tok)
    kept = check_token_lengths(pairs, tok, max_src, max_tgt, on_error)
    src = template.inputs([prefix + p.source for p in kept]) if kept else []
    tgt = template.targets([p.target for p in kept]) if kept else []
    return Encoded(list(src), list(tgt), [p.origin for p in kept])


def length_bucketed_batches(enc: Encoded, batch_size: int, rng: random.Random, bucket: int = 50
                            ) -> list[list[int]]:
    """One epoch of index batches: shuffle, sort windows of ``bucket`` batches by length, shuffle the batches.

    The sort key is the longer side first (then the total): both the encoder (source) and the decoder (target) pay
    for padding, and on Multi30K (batch 128, windows of 50 batches) this pads 9 % of the positions, where sorting
    by target length first padded 15 % (24 % of the source positions)."""
    idx = list(range(len(enc.src)))
    rng.shuffle(idx)
    batches: list[list[int]] = []
    window = batch_size * bucket
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: (max(len(enc.src[i]), len(enc.tgt[i])),
                                                         len(enc.src[i]) + len(enc.tgt[i])))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(enc: Encoded, batch: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, decoder_input_ids, labels, label_mask)``, right-padded; decoder input = labels
    shifted right behind the decoder start (= pad) token (a causal LM reads its input's last position there). The
    masks come from the lengths: a tokenizer whose pad token is also a real one (SmolLM2 pads with its EOS) keeps
    it."""
    src, src_mask = pad_batch([enc.src[i] for i in batch], pad_id)
    labels = pad_batch([enc.tgt[i] for i in batch], pad_id)[0]
    label_mask = torch.zeros_like(labels, dtype=torch.bool)
    for row, i in enumerate(batch):
        label_mask[row, :len(enc.tgt[i])] = True
    dec_in = torch.full_like(labels, pad_id)
    dec_in[:, 1:] = labels[:, :-1]
    return src, src_mask, dec_in, labels, label_mask


def masked_logits(model, input_ids, attention_mask, decoder_input_ids, label_mask) -> torch.Tensor:
    """``[N, V]`` logits at the ``N`` True positions of ``label_mask`` only (the output projection is the costliest
    part of a small model; padding positions are skipped). Same numbers as ``model(...).logits[label_mask]``."""
    enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    dec = model.decoder(input_ids=decoder_input_ids, encoder_hidden_states=enc,
                        encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = dec[label_mask]
    if getattr(model.config, "scale_decoder_outputs", True):
        h = h * (model.config.d_model ** -0.5)
    return model.lm_head(h)


def target_logits(model, input_ids, attention_mask, decoder_input_ids, label_mask) -> torch.Tensor:
    """``[N, V]`` logits at the ``N`` True positions of ``label_mask``, either family: :func:`masked_logits` for a
    seq2seq model; a causal LM reads ``x ⧺ y`` (:func:`tw_rl.models.family.forced`), position ``t`` of the output
    predicting ``y_t``, and only the target positions are kept (the loss never sees the input's)."""
    if not is_causal(model):
        return masked_logits(model, input_ids, attention_mask, decoder_input_ids, label_mask)
    return forced(model, input_ids, attention_mask, dec_ids=decoder_input_ids).logits[label_mask]


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
def train_model(model, enc: Encoded, epochs: float, cfg: Config, seed: int, desc: str) -> dict[str, Any]:
    """Cross-entropy training of ``model`` (either family, :func:`target_logits`) on ``enc`` for ``epochs`` passes
    (or until ``pretrain.time_limit_s``)."""
    p = cfg.pretrain
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(enc.src) / p.batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = AdamWScale(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    model.train()
    pad = model.config.pad_token_id
    n_tokens = n_tgt_tokens = 0
    ema_loss: Optional[float] = None
    batches: list[list[int]] = []
    t0 = time.perf_counter()
    step = 0
    stopped_by_time = False
    with tqdm(total=total, desc=f"phase 0: {desc}", unit="step", dynamic_ncols=True, mininterval=1.0) as bar:
        while step < total:
            if not batches:
                batches = length_bucketed_batches(enc, p.batch_size, rng)
            src, src_mask, dec_in, labels, label_mask = collate(enc, batches.pop(), pad)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, p.lr, p.warmup_steps, p.final_lr_fraction)
            with torch.autocast(device_type=src.device.type, dtype=torch.bfloat16, enabled=p.bf16):
                logits = target_logits(model, src, src_mask, dec_in, label_mask)
            loss = F.cross_entropy(logits.float(), labels[label_mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            opt.step()
            step += 1
            n_tgt_tokens += int(label_mask.sum())
            n_tokens += int(src_mask.sum()) + int(label_mask.sum())
            lv = loss.item()
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            bar.update(1)
            if step % 20 == 0 or step == total:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{ema_loss:.3f}", tok_s=f"{n_tokens / el:.0f}")
            if p.time_limit_s is not None and time.perf_counter() - t0 > p.time_limit_s:
                stopped_by_time = True
                break
    elapsed = time.perf_counter() - t0
    model.eval()
    return {"steps": step, "planned_steps": total, "epochs": step / steps_per_epoch, "train_time_s": elapsed,
            "tokens_per_s": n_tokens / elapsed, "target_tokens_per_s": n_tgt_tokens / elapsed,
            "final_loss": ema_loss, "stopped_by_time_limit": stopped_by_time}


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_translate(model, tok: PreTrainedTokenizerBase, sources: list[str], max_new_tokens: int,
                     batch_size: int, template: InputTemplate | None = None) -> list[str]:
    """Greedy decoding with the KV cache, batched by source length; outputs in input order. A seq2seq model runs
    Hugging Face ``generate``; a causal LM runs tw-rl's loop (:func:`tw_rl.decoding.decode_teacher`, equal to greedy
    ``generate``) on its inputs written by ``template`` (default: its family's, the chat template when the tokenizer
    has one)."""
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    causal = is_causal(model)
    template = template or InputTemplate(tok, CAUSAL if causal else SEQ2SEQ)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        if causal:
            ids, mask = pad_batch(template.inputs([sources[i] for i in idx]), tok.pad_token_id)
            d = decode_teacher(model, ids, mask, max_len=max_new_tokens, eos_id=tok.eos_token_id,
                               vocab_size=len(tok), pad_id=tok.pad_token_id)
            gen = [d.tokens[k, :d.lengths[k]].tolist() for k in range(len(idx))]
        else:
            batch = tok([sources[i] for i in idx], return_tensors="pt", padding=True)
            gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


@torch.no_grad()
def token_accuracy_by_class(model, tok: PreTrainedTokenizerBase, pairs: list[Pair], rare_targets: set[str],
                            batch_size: int, template: InputTemplate | None = None) -> dict[str, float]:
    """Teacher-forced argmax accuracy on target tokens, split into rare-word pieces and all other tokens (eos too).

    Also the share of rare target words whose every piece is right, and the share of target tokens that are
    rare-word pieces. ``template``: how the model reads sources and targets (default: its family's, as in
    :func:`greedy_translate`).
    """
    model.eval()
    pad = tok.pad_token_id
    template = template or InputTemplate(tok, family_of(model))
    seq2seq = template.family == SEQ2SEQ
    hits = {"rare": 0, "other": 0}
    counts = {"rare": 0, "other": 0}
    words_ok = words = 0
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        sources = [p.source for p in chunk]
        src_rows = tok(sources)["input_ids"] if seq2seq else template.inputs(sources)
        tgt_enc = tok([p.target for p in chunk], add_special_tokens=seq2seq)
        tgt_rows = tgt_enc["input_ids"] if seq2seq else template.targets([p.target for p in chunk])
        labels_rows, rare_rows, word_rows = [], [], []
        for row, p in enumerate(chunk):
            ids = tgt_rows[row]
            wids = list(tgt_enc.word_ids(row))
            wids += [None] * (len(ids) - len(wids))  # the EOS a causal LM's template appends
            words_of = p.target.split()
            rare_rows.append([w is not None and words_of[w] in rare_targets for w in wids])
            word_rows.append(wids)
            labels_rows.append(ids)
        src, src_mask = pad_batch(src_rows, pad)
        labels = pad_batch(labels_rows, pad)[0]
        label_mask = torch.zeros_like(labels, dtype=torch.bool)
        for row, ids in enumerate(labels_rows):
            label_mask[row, :len(ids)] = True
        dec_in = torch.full_like(labels, pad)
        dec_in[:, 1:] = labels[:, :-1]
        if seq2seq:
            logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec_in, use_cache=False).logits
        else:
            logits = forced(model, src, src_mask, dec_ids=dec_in).logits
        correct = (logits.argmax(-1) == labels).tolist()
        for row, ids in enumerate(labels_rows):
            word_ok: dict[int, bool] = {}
            for t in range(len(ids)):
                cls = "rare" if rare_rows[row][t] else "other"
                counts[cls] += 1
                hits[cls] += correct[row][t]
                if cls == "rare":
                    w = word_rows[row][t]
                    word_ok[w] = word_ok.get(w, True) and bool(correct[row][t])
            words += len(word_ok)
            words_ok += sum(word_ok.values())
    total = counts["rare"] + counts["other"]
    return {"rare_piece_accuracy": hits["rare"] / max(1, counts["rare"]),
            "other_token_accuracy": hits["other"] / max(1, counts["other"]),
            "rare_word_accuracy": words_ok / max(1, words),
            "rare_piece_share": counts["rare"] / max(1, total)}


def evaluate_pair_bleu(model, tok, pairs: list[Pair], cfg: Config, template: InputTemplate | None = None
                       ) -> dict[str, Any]:
    """Greedy outputs scored against the references: sacrebleu corpus BLEU and chrF, exact matches (the fraction of
    outputs equal to their reference; for math, whose per-output metric is also called exact_match, that metric
    instead: the final answer's, in %), for math and qa the task's own per-output metric (``eval.task``), 3
    samples."""
    t0 = time.perf_counter()
    hyps = greedy_translate(model, tok, [p.source for p in pairs], cfg.data.max_tgt_tokens, cfg.eval.batch_size,
                            template)
    elapsed = time.perf_counter() - t0
    refs = [p.target for p in pairs]
    task = resolve_task(cfg)  # math and qa: also their per-output metric (% of outputs), as the evaluation reports it
    per_output = {MATCH_METRIC[task]: match_rate(task, hyps, refs)} if task in MATCH_METRIC else {}
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "exact_match": sum(h == r for h, r in zip(hyps, refs)) / max(1, len(refs)), **per_output,
            "eval_time_s": elapsed,
            "examples": len(pairs), "sample": [{"source": p.source, "reference": p.target, "output": h}
                                               for p, h in zip(pairs[:3], hyps[:3])]}


def evaluate_model(model, tok: PreTrainedTokenizerBase, test: list[Pair], cfg: Config,
                   template: InputTemplate | None = None) -> dict[str, Any]:
    """``{"eval": BLEU etc.}`` and, on the embedded task, ``{"error_locations": ...}`` (teacher-forced accuracy on
    rare-word pieces vs the other tokens); the model reads its inputs as ``template`` writes them."""
    out: dict[str, Any] = {"eval": evaluate_pair_bleu(model, tok, test, cfg, template)}
    rare = _rare_targets(cfg)
    if rare is not None:
        out["error_locations"] = token_accuracy_by_class(model, tok, test, rare, cfg.eval.batch_size, template)
    return out


def _rare_targets(cfg: Config) -> Optional[set[str]]:
    if cfg.data.kind != "embedded":
        return None
    from tw_rl.data.embedded import EmbeddedTask

    return {w.target for ws in EmbeddedTask(cfg.data.embedded).lexicon.values() for w in ws if w.rare}


# ----------------------------------------------------------------------------------------------------------------
# caching
# ----------------------------------------------------------------------------------------------------------------
def _fingerprint(*parts: Any) -> str:
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def _train_data_settings(cfg: Config) -> dict:
    """The data settings that decide which training pairs there are (not the token limits)."""
    d = dataclasses.asdict(cfg.data)
    for k in ("test_split", "validation_split", "max_src_tokens", "max_tgt_tokens", "on_error"):
        d.pop(k)
    return d


def _given_gguf_file(cfg: Config) -> Optional[str]:
    """The ``gguf_file`` of the model whose tokenizer the run is given (:func:`tw_rl.config.given_tokenizer`)."""
    if cfg.tokenizer.path:
        return None
    return cfg.teacher.gguf_file if cfg.teacher.name_or_path else cfg.student.gguf_file


def _tokenizer(cfg: Config, train: list[Pair], run_dir: Path) -> tuple[PreTrainedTokenizerBase, str]:
    """The shared tokenizer: ``tokenizer.path``, else a given model's tokenizer (a GGUF file's too), else one trained
    on ``train``. Saved under ``run_dir/tokenizer`` and reused when its fingerprint matches."""
    given = given_tokenizer(cfg)
    gguf_file = _given_gguf_file(cfg)
    extra = [gguf_file] if gguf_file else []  # (added with GGUF sources: other runs keep their fingerprints)
    fp = _fingerprint("tokenizer", cfg.tokenizer, given, _train_data_settings(cfg), cfg.budget_prompt, *extra)
    tdir = RunDir(run_dir).tokenizer
    manifest = Manifest(run_dir)
    settings = {"tokenizer": cfg.tokenizer, "given": given, "data": _train_data_settings(cfg),
                "budget_prompt": cfg.budget_prompt, **({"given_gguf_file": gguf_file} if gguf_file else {})}
    inputs = {"data/train": pairs_digest(train)}
    marker = _read_json(tdir / "done.json")
    reuse, why = manifest.reuse("tokenizer", tdir, settings, inputs)
    if reuse and marker is not None and marker.get("fingerprint") == fp:
        return load_tokenizer(str(tdir)), manifest.id("tokenizer")
    say_recomputing("tokenizer", why)
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    elif cfg.teacher.name_or_path:
        tok = load_tokenizer(cfg.teacher.name_or_path, trust_remote_code=cfg.teacher.trust_remote_code,
                             gguf_file=cfg.teacher.gguf_file)
    elif cfg.student.name_or_path:
        tok = load_tokenizer(cfg.student.name_or_path, trust_remote_code=cfg.student.trust_remote_code,
                             gguf_file=cfg.student.gguf_file)
    else:
        texts = [p.source for p in train] + [p.target for p in train]
        tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, extra_texts=budget_prompt_texts(cfg.budget_prompt))
    with atomic_dir(tdir) as tmp:
        tok.save_pretrained(str(tmp))
        _write_json(tmp / "done.json", {"fingerprint": fp, "vocab_size": len(tok)})
    return load_tokenizer(str(tdir)), manifest.record("tokenizer", tdir, settings, inputs)


# ----------------------------------------------------------------------------------------------------------------
# phase 0
# ----------------------------------------------------------------------------------------------------------------
def arch_settings(arch: ArchConfig) -> dict[str, Any]:
    """What is fingerprinted and recorded of a built model's ``arch``: all of it, less ``model_type`` when it is
    ``t5`` (added with decoder-only models: T5 runs keep the fingerprints, caches and manifest ids they had)."""
    d = dataclasses.asdict(arch)
    if d["model_type"] == "t5":
        del d["model_type"]
    return d


def max_positions(cfg: Config, template: InputTemplate) -> int:
    """The longest sequence a causal LM built in phase 0 reads: the longest input (``data.max_src_tokens``, budget
    prompt included), what the input template adds around it, and the longest output."""
    return cfg.data.max_src_tokens + template.overhead() + cfg.data.max_tgt_tokens


def _given_model(cfg: Config, role: str, tok: PreTrainedTokenizerBase) -> tuple[Any, dict[str, Any], str]:
    """``(model, stats, model_id)`` of a given model (``{role}.name_or_path``, a GGUF file too), loaded and checked
    against the shared tokenizer."""
    mcfg = getattr(cfg, role)
    name = source_name(mcfg.name_or_path, mcfg.gguf_file)
    model, mtok = load_model(mcfg.name_or_path, trust_remote_code=mcfg.trust_remote_code, gguf_file=mcfg.gguf_file)
    shared = (f"the shared tokenizer (tokenizer.path={cfg.tokenizer.path})" if cfg.tokenizer.path
              else f"the shared tokenizer (of {given_tokenizer(cfg)})")
    check_shared_vocab(tok, mtok, names=(shared, f"{role} {name}"))
    return model, {"source": name, "trained": False, "params": count_parameters(model)}, name


def teacher_outputs(teacher, tok: PreTrainedTokenizerBase, src: list[list[int]], max_len: int, batch_size: int,
                    desc: str = "teacher targets") -> list[list[int]]:
    """The teacher's greedy outputs (token ids, its EOS included when it ended within ``max_len``) for the input
    ids ``src`` (written by the teacher's own template), in order: tw-rl's KV-cached loop
    (:func:`tw_rl.decoding.decode_teacher`, either family), batched by input length."""
    teacher.eval()
    pad = tok.pad_token_id
    start = start_token_id(teacher, pad)
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out: list[list[int]] = [[] for _ in src]
    for b in tqdm(range(0, len(order), batch_size), desc=f"phase 0: {desc}", unit="batch", dynamic_ncols=True,
                  mininterval=1.0):
        idx = order[b:b + batch_size]
        ids, mask = pad_batch([src[i] for i in idx], pad)
        d = decode_teacher(teacher, ids, mask, max_len=max_len, eos_id=tok.eos_token_id, vocab_size=len(tok),
                           start_id=start, pad_id=pad)
        for k, i in enumerate(idx):
            out[i] = d.tokens[k, :d.lengths[k]].tolist()
    return out


def teacher_targets(cfg: Config, run_dir: Path, teacher, teacher_id: str, teacher_data: Encoded,
                    teacher_template: InputTemplate, tok: PreTrainedTokenizerBase, tok_fp: str, train_hash: str,
                    longest_prompt: int) -> tuple[list[list[int]], dict[str, Any]]:
    """``(targets, stats)``: the teacher's greedy outputs for the training sources (``pretrain.student_targets=
    teacher``: sequence-level distillation, Kim & Rush 2016), one per pair of ``teacher_data`` (the training pairs
    within the limits, written by the teacher's template), each at most ``data.max_tgt_tokens`` tokens — the
    episode length — ending with EOS when the teacher ended by then.

    Cached in ``models/teacher_targets.json`` and recorded in the manifest (``teacher_targets``, its inputs the
    teacher, the tokenizer and the training data), so a new teacher or new data redoes them."""
    path = RunDir(run_dir).models / "teacher_targets.json"
    settings = {"teacher.input_template": ("chat" if teacher_template.chat else "plain")
                if teacher_template.family == CAUSAL else SEQ2SEQ,
                "data.max_src_tokens": cfg.data.max_src_tokens, "data.max_tgt_tokens": cfg.data.max_tgt_tokens,
                "data.on_error": cfg.data.on_error, "longest_prompt": longest_prompt, "task_prompt": cfg.task_prompt}
    inputs = {"teacher": teacher_id, "tokenizer": tok_fp, "data/train": train_hash}
    fp = _fingerprint("teacher_targets", settings, inputs)
    manifest = Manifest(run_dir)
    reuse, why = manifest.reuse("teacher_targets", path, settings, inputs)
    cached = _read_json(path) if reuse else None
    if cached is not None and cached.get("fingerprint") == fp and cached.get("origins") == teacher_data.origins:
        targets, stats = cached["targets"], dict(cached["stats"], cached=True)
    else:
        say_recomputing("teacher_targets", why)
        t0 = time.perf_counter()
        targets = teacher_outputs(teacher, tok, teacher_data.src, cfg.data.max_tgt_tokens, cfg.eval.batch_size)
        n = max(1, len(targets))
        stats = {"pairs": len(targets), "decode_time_s": time.perf_counter() - t0,
                 "mean_tokens": sum(map(len, targets)) / n,
                 "ended": sum(bool(t) and t[-1] == tok.eos_token_id for t in targets) / n}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"fingerprint": fp, "stats": stats, "origins": teacher_data.origins,
                                       "targets": targets}))
        manifest.record("teacher_targets", path, settings, inputs)
        stats = dict(stats, cached=False)
    return targets, dict(stats, file=str(path))


@dataclasses.dataclass
class PhaseZeroTeacher:
    """The phase-0 teacher (given or trained) as the student's phase 0 reads it: what ``student.init_layers`` copies
    and ``pretrain.student_targets=teacher`` decodes. ``model_id``: its manifest id (a given model's source name),
    recorded by the student so that a new teacher redoes it."""

    model: Any
    model_id: str
    template: InputTemplate


def _phase0_model(cfg: Config, role: str, run_dir: Path, tok: PreTrainedTokenizerBase, tok_fp: str,
                  longest_prompt: int, training_data: Callable[[InputTemplate], Encoded], train_hash: str = "",
                  teacher: Optional[PhaseZeroTeacher] = None) -> tuple[Any, dict[str, Any], str]:
    """``(model, stats, model_id)`` of ``role`` built in phase 0: the cached one, or one trained now and saved.

    The student may be made of the teacher's layers (``student.init_layers``, :func:`init_from_layers`) and trained
    on the teacher's outputs (``pretrain.student_targets=teacher``, :func:`teacher_targets`); either needs
    ``teacher``, whose id the student's fingerprint and manifest record then."""
    mcfg = getattr(cfg, role)
    template = input_template(cfg, role, tok)
    mdir = RunDir(run_dir).model(role)
    epochs = cfg.pretrain.teacher_epochs if role == "teacher" else cfg.pretrain.student_epochs
    seed = cfg.seed * 1000 + _SEED_OFFSET[role]
    pre = dataclasses.asdict(cfg.pretrain)
    if not pre["bf16"]:  # added later: float32 runs keep the fingerprints (and caches) they had before
        del pre["bf16"]
    del pre["student_targets"]  # the student's data only, recorded below when it is not the references
    init_layers = mcfg.init_layers if role == "student" else None
    distil = role == "student" and cfg.pretrain.student_targets == "teacher"
    if (init_layers is not None or distil) and teacher is None:
        raise ValueError("_phase0_model: student.init_layers and pretrain.student_targets=teacher need the teacher")
    # a student made of the teacher's layers is those layers (its arch unused), else its size
    shape = ({f"{role}.init_layers": list(init_layers)} if init_layers is not None
             else {f"{role}.arch": arch_settings(mcfg.arch)})
    # a causal LM's training inputs depend on its template (a given tokenizer's chat template, or the plain one)
    extra = {f"{role}.input_template": "chat" if template.chat else "plain"} if template.family == CAUSAL else {}
    if cfg.task_prompt:  # (added with task_prompt: runs without one keep their fingerprints)
        extra["task_prompt"] = cfg.task_prompt
    if distil:  # (added with these two options: runs without them keep their fingerprints)
        extra["pretrain.student_targets"] = cfg.pretrain.student_targets
    if init_layers is not None or distil:
        extra["student.init_from"] = teacher.model_id
    fp = _fingerprint(role, tok_fp, *shape.values(), pre, epochs, seed, cfg.data.max_src_tokens,
                      cfg.data.max_tgt_tokens, cfg.data.on_error, longest_prompt, *extra.values())
    manifest = Manifest(run_dir)
    settings = {**shape, "pretrain": pre, "epochs": epochs, "seed": seed,
                "data.max_src_tokens": cfg.data.max_src_tokens, "data.max_tgt_tokens": cfg.data.max_tgt_tokens,
                "data.on_error": cfg.data.on_error, "longest_prompt": longest_prompt,
                **extra}
    inputs = {"tokenizer": tok_fp, "data/train": train_hash}
    if "student.init_from" in extra:
        inputs["teacher"] = teacher.model_id
    marker = _read_json(mdir / "done.json")
    reuse, why = manifest.reuse(role, mdir, settings, inputs)
    if reuse and marker is not None and marker.get("fingerprint") == fp:
        model, _ = load_model(str(mdir))
        return model, dict(marker["stats"], cached=True, dir=str(mdir)), manifest.id(role)
    if not cfg.pretrain.enabled:
        raise ConfigError(f"{role}.name_or_path is not set and pretrain.enabled=false: give a model "
                          f"({role}.name_or_path=DIR) or enable phase 0")
    extra_stats: dict[str, Any] = {}
    if init_layers is not None:
        model = init_from_layers(teacher.model, list(init_layers))
        if model.config.pad_token_id is None:  # (a GGUF teacher's config may lack it; the tokenizer has one)
            model.config.pad_token_id = tok.pad_token_id
        arch: dict[str, Any] = {"model_type": model.config.model_type, "num_layers": len(init_layers)}
        extra_stats.update(init_layers=list(init_layers), init_from=teacher.model_id,
                           teacher_params=count_parameters(teacher.model))
    else:
        model = build_model(mcfg.arch, tok, seed, max_positions(cfg, template))
        arch = shape[f"{role}.arch"]
    data = training_data(template)
    if distil:
        targets, extra_stats["teacher_targets"] = teacher_targets(
            cfg, run_dir, teacher.model, teacher.model_id, training_data(teacher.template), teacher.template, tok,
            tok_fp, train_hash, longest_prompt)
        data = student_on_teacher(data, targets, training_data(teacher.template).origins)
        extra_stats["targets"] = "teacher"
    stats = train_model(model, data, epochs, cfg, seed, role)
    stats.update(trained=True, params=count_parameters(model), arch=arch, **extra_stats)
    say_recomputing(role, why)
    with atomic_dir(mdir) as tmp:  # a kill leaves the old model or none, never half of one
        save_model(model, tok, tmp)
        _write_json(tmp / "done.json", {"fingerprint": fp, "stats": stats})
    return model, dict(stats, cached=False, dir=str(mdir)), manifest.record(role, mdir, settings, inputs)


def student_on_teacher(student_data: Encoded, targets: list[list[int]], teacher_origins: list[str]) -> Encoded:
    """The student's training pairs with the teacher's outputs as targets: its own inputs (its template), the
    teacher's output for the same pair (``targets``, in ``teacher_origins``' order, which the two encodings share:
    which pairs are kept depends on the tokenizer and the limits only)."""
    if teacher_origins != student_data.origins or len(targets) != len(student_data.src):
        raise ValueError("student_on_teacher: the teacher's and the student's training pairs differ")
    return Encoded(student_data.src, [list(t) for t in targets], student_data.origins)


def tokenizer(cfg: Config, run_dir: Path) -> PreTrainedTokenizerBase:
    """Phase 0's shared tokenizer alone (cached as in :func:`pretrain`): what the checks before phase 0 need."""
    return _tokenizer(cfg, load_split(cfg.data, cfg.data.train_split), Path(run_dir))[0]


def pretrain(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Phase 0 (see the module docstring). Returns the summary also written to ``run_dir/pretrain.json``."""
    torch.set_num_threads(cfg.pretrain.num_threads or cfg.num_threads)
    try:
        return _pretrain(cfg, Path(run_dir))
    finally:
        torch.set_num_threads(cfg.num_threads)  # what the rest of the run uses


def _check_student_of_teacher(cfg: Config, tok: PreTrainedTokenizerBase, given_teacher) -> None:
    """``student.init_layers`` against the teacher it copies — the given one's config, or the config phase 0 builds
    from ``teacher.arch`` — before anything trains (:func:`tw_rl.models.factory.check_init_layers`)."""
    layers = list(cfg.student.init_layers)
    if given_teacher is not None:
        model, _, name = given_teacher
        check_init_layers(layers, model.config, name)
        return
    arch = cfg.teacher.arch
    if arch.model_type == "t5":
        raise ConfigError(f"student.init_layers={layers} needs a decoder-only teacher (llama, qwen2 or gpt2), not "
                          f"teacher.arch.model_type=t5: set teacher.arch.model_type or leave student.init_layers "
                          f"unset")
    config = causal_config(arch, tok, max_positions(cfg, input_template(cfg, "teacher", tok)))
    check_init_layers(layers, config, f"built in phase 0 (teacher.arch, {arch.model_type})")


def _pretrain(cfg: Config, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train = load_split(cfg.data, cfg.data.train_split)
    test = load_split(cfg.data, cfg.data.test_split)
    if cfg.eval.max_examples is not None:
        test = test[:cfg.eval.max_examples]
    prompted = [dataclasses.replace(p, source=cfg.task_prompt + p.source) for p in test]  # the inputs models read
    tok, tok_fp = _tokenizer(cfg, train, run_dir)
    train_hash = pairs_digest(train)
    longest_prompt = prompt_tokens(cfg, tok)

    summary: dict[str, Any] = {"tokenizer_dir": str(RunDir(run_dir).tokenizer), "vocab_size": len(tok),
                               "longest_budget_prompt_tokens": longest_prompt, "train_pairs": len(train),
                               "test_split": cfg.data.test_split, "test_pairs": len(test)}
    encoded: dict[tuple[str, bool], Encoded] = {}  # tokenized once per input template, when a model is trained

    def training_data(template: InputTemplate) -> Encoded:
        key = (template.family, template.chat)
        if key not in encoded:
            # later phases prepend the budget prompt to the student's source: leave room for it
            encoded[key] = encode_pairs(train, tok, source_room(cfg, tok), cfg.data.max_tgt_tokens,
                                        cfg.data.on_error, template, prefix=cfg.task_prompt)
        return encoded[key]

    # every model is loaded or checked before any is trained: a bad pair fails at once, not after the teacher's hour
    given = {role: _given_model(cfg, role, tok) for role in ROLES if getattr(cfg, role).name_or_path}
    for role in ROLES:
        if role not in given and not (role == "student" and cfg.student.init_layers is not None):
            check_buildable(getattr(cfg, role).arch, tok, max_positions(cfg, input_template(cfg, role, tok)))
    if cfg.student.init_layers is not None and "student" not in given:
        _check_student_of_teacher(cfg, tok, given.get("teacher"))
    models, templates, model_ids = {}, {}, []
    for role in ROLES:
        teacher = None
        if role == "student" and "teacher" in models:
            teacher = PhaseZeroTeacher(models["teacher"], model_ids[0], templates["teacher"])
        models[role], summary[role], model_id = given[role] if role in given else _phase0_model(
            cfg, role, run_dir, tok, tok_fp, longest_prompt, training_data, train_hash, teacher)
        templates[role] = input_template(cfg, role, tok, family_of(models[role]))
        model_ids.append(model_id)
    summary["artefact_ids"] = {"tokenizer": tok_fp, **dict(zip(ROLES, model_ids))}  # what later phases record

    eval_fp = _fingerprint("eval", model_ids, pairs_digest(prompted), cfg.data.test_split, cfg.eval.max_examples,
                           cfg.data.max_tgt_tokens)
    old = _read_json(RunDir(run_dir).pretrain)
    if old is not None and old.get("eval_fingerprint") == eval_fp:
        for role in ROLES:
            summary[role].update({k: old[role][k] for k in ("eval", "error_locations") if k in old[role]})
    else:
        for role in ROLES:
            summary[role].update(evaluate_model(models[role], tok, prompted, cfg, templates[role]))
    summary["eval_fingerprint"] = eval_fp
    summary["param_ratio"] = summary["teacher"]["params"] / summary["student"]["params"]
    summary["bleu_gap"] = summary["teacher"]["eval"]["bleu"] - summary["student"]["eval"]["bleu"]
    summary["train_time_s_total"] = sum(summary[r].get("train_time_s", 0.0) for r in ROLES
                                        if summary[r].get("trained"))
    summary["wall_time_s"] = time.perf_counter() - t_start
    _write_json(RunDir(run_dir).pretrain, summary)
    return summary
