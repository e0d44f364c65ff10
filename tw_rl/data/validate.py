"""Checks that need the tokenizer: examples longer than the model's limits, the budget prompt counted."""

from __future__ import annotations

import logging
from typing import Any

from tw_rl.data import DataError, LoadReport, Pair

log = logging.getLogger(__name__)

_BATCH = 1024  # pairs tokenized per call: fast tokenizers parallelize a batch; bounded for memory


class FileTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library alone (no torch, no transformers: what
    ``tw-rl train --dry-run`` may load), callable as :func:`check_token_lengths` calls a Hugging Face tokenizer.
    The file's post-processor adds the special tokens, as the Hugging Face fast tokenizer built on it does."""

    def __init__(self, path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, texts, add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self._tok.encode(texts, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]}


def check_token_lengths(pairs: list[Pair], tokenizer: Any, max_src_tokens: int, max_tgt_tokens: int,
                        on_error: str, src_prefix: str = "") -> list[Pair]:
    """The pairs within the token limits; an over-long one raises (``on_error=raise``) or is skipped and logged."""
    kept, report = check_token_lengths_with_report(pairs, tokenizer, max_src_tokens, max_tgt_tokens, on_error,
                                                   src_prefix)
    if report.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted((report.reasons or {}).items()))
        log.warning("token lengths: kept %d pairs, skipped %d over-long ones (%s)", report.kept, report.skipped,
                    reasons)
    return kept


def check_token_lengths_with_report(pairs: list[Pair], tokenizer: Any, max_src_tokens: int, max_tgt_tokens: int,
                                    on_error: str, src_prefix: str = "") -> tuple[list[Pair], LoadReport]:
    """Like :func:`check_token_lengths`, also returning what was kept and skipped (by reason); logs nothing.

    Lengths count special tokens (``add_special_tokens=True``) and, for sources, ``src_prefix`` (the budget prompt
    the student reads in front of every source).
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={on_error!r} is unknown; allowed: raise, skip")
    kept: list[Pair] = []
    report = LoadReport(reasons={})
    for start in range(0, len(pairs), _BATCH):
        chunk = pairs[start:start + _BATCH]
        src_lens = _lengths(tokenizer, [src_prefix + p.source for p in chunk])
        tgt_lens = _lengths(tokenizer, [p.target for p in chunk])
        for pair, n_src, n_tgt in zip(chunk, src_lens, tgt_lens):
            problem = ""
            if n_src > max_src_tokens:
                reason = "source_too_long"
                problem = (f"source is {n_src} tokens, over the limit data.max_src_tokens={max_src_tokens}"
                           + (f" (counting the prefix {src_prefix!r})" if src_prefix else ""))
            elif n_tgt > max_tgt_tokens:
                reason = "target_too_long"
                problem = f"target is {n_tgt} tokens, over the limit data.max_tgt_tokens={max_tgt_tokens}"
            if not problem:
                kept.append(pair)
                report.kept += 1
                continue
            if on_error != "skip":
                raise DataError(f"{pair.origin or '?'}: {problem}; raise the limit or set data.on_error=skip to "
                                f"skip and count such examples")
            report.skipped += 1
            report.reasons[reason] = report.reasons.get(reason, 0) + 1  # type: ignore[index]
    return kept, report


def _lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    # verbose=False: lengths over model_max_length are what we are measuring, not something to warn about
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]
