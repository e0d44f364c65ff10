"""Parallel data from a Hugging Face dataset (``data.kind=hf``).

Two layouts are understood, chosen by the dataset's features: translation (``{"translation": {src, tgt}}``, e.g.
``wmt19`` ``de-en``) and summarization (``document`` → ``summary``, e.g. ``xsum``); a dataset with plain
``src_lang`` / ``tgt_lang`` columns works too. Without network only datasets already in the local cache load, and
a failure comes at once (no retry loop) with a hint to use local files instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

from tw_rl.data import DataError, LoadReport, Pair

log = logging.getLogger(__name__)

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROBE_TIMEOUT_S = 3.0


def load_hf_split(data_cfg, split: str) -> list[Pair]:
    """Load ``split`` of ``data.hf_name`` / ``data.hf_config``; logs one warning if rows were skipped."""
    pairs, report = load_hf_split_with_report(data_cfg, split)
    if report.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted((report.reasons or {}).items()))
        log.warning("dataset %s[%s]: kept %d pairs, skipped %d bad rows (%s)",
                    data_cfg.hf_name, split, report.kept, report.skipped, reasons)
    return pairs


def load_hf_split_with_report(data_cfg, split: str) -> tuple[list[Pair], LoadReport]:
    """Load one split and report what was kept and skipped (by reason)."""
    if not data_cfg.hf_name:
        raise DataError("data.kind=hf needs data.hf_name (e.g. wmt19 with data.hf_config=de-en, or xsum)")
    name = data_cfg.hf_name if not data_cfg.hf_config else f"{data_cfg.hf_name}/{data_cfg.hf_config}"
    ds = _load(data_cfg, split, name)
    columns, get = _layout(ds.features, data_cfg.src_lang, data_cfg.tgt_lang, name)

    pairs: list[Pair] = []
    report = LoadReport(reasons={})
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            if data_cfg.max_examples is not None and len(pairs) >= data_cfg.max_examples:
                return pairs, report
            origin = f"{name}[{split}]#{row}"
            row += 1
            src, tgt = get(dict(zip(columns, values)))
            bad = "empty_source" if not src else "empty_target" if not tgt else ""
            if bad:
                if data_cfg.on_error != "skip":
                    raise DataError(f"{origin}: {bad.replace('_', ' ')} (set data.on_error=skip to skip and "
                                    f"count bad rows)")
                report.skipped += 1
                report.reasons[bad] = report.reasons.get(bad, 0) + 1  # type: ignore[index]
                continue
            pairs.append(Pair(src, tgt, origin))
            report.kept += 1
    if not pairs:  # an empty split would only fail later, far from its cause
        raise DataError(f"dataset {name} split {split!r}: no pairs ({row} rows, {report.skipped} skipped)")
    return pairs, report


# ----------------------------------------------------------------------------------------------------------------
# loading without hanging
# ----------------------------------------------------------------------------------------------------------------
def _load(data_cfg, split: str, name: str) -> Any:
    import datasets

    hint = (f"To use local files instead: data.kind=files data.path=DIR with {split}.{data_cfg.src_lang} and "
            f"{split}.{data_cfg.tgt_lang} (plain or .gz, line-aligned), or {split}.jsonl, or {split}.tsv")
    offline = _offline_reason()
    try:
        with _forced_offline(offline is not None):
            return datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        why = f" ({offline}; only datasets in the local cache can load)" if offline else ""
        raise DataError(f"cannot load Hugging Face dataset {name} split {split!r}{why}: "
                        f"{type(e).__name__}: {e}. {hint}") from e


def _offline_reason() -> Optional[str]:
    """Why the Hub cannot be reached, or None if it may be: an offline env var, or a failed quick probe.

    The probe replaces datasets' own ~23 s retry loop with a few seconds at most. Behind a proxy a direct connection
    says nothing, so the probe is skipped and datasets decides.
    """
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    error = _within(_PROBE_TIMEOUT_S, lambda: socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close())
    return None if error is None else f"cannot reach {host}:{port}: {error}"


def _within(seconds: float, fn: Callable[[], None]) -> Optional[str]:
    """Run ``fn`` in a daemon thread (name resolution ignores socket timeouts); its error, or None if it succeeded."""
    result: list[Optional[str]] = []

    def target() -> None:
        try:
            fn()
            result.append(None)
        except Exception as e:  # any failure to connect means: treat as offline
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else f"no answer within {seconds:g} s"


@contextmanager
def _forced_offline(enabled: bool) -> Iterator[None]:
    """Put datasets and huggingface_hub in offline mode for one call.

    Both read their env vars once at import, so an env var set later (or a failed probe) would otherwise not count.
    """
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved


# ----------------------------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------------------------
def _layout(features: Any, src: str, tgt: str, name: str) -> tuple[list[str], Callable[[dict], tuple[str, str]]]:
    """The columns to read and how to turn one row of them into (source, target), picked by the features."""
    if "translation" in features:
        feat = features["translation"]
        langs = list(getattr(feat, "languages", None) or (feat.keys() if isinstance(feat, dict) else []))
        if src not in langs or tgt not in langs:
            raise DataError(f"dataset {name}: translation languages are {langs}, not data.src_lang={src!r} and "
                            f"data.tgt_lang={tgt!r}; set those two keys")
        return ["translation"], lambda r: (_clean(r["translation"].get(src)), _clean(r["translation"].get(tgt)))
    if "document" in features and "summary" in features:
        return ["document", "summary"], lambda r: (_clean(r["document"]), _clean(r["summary"]))
    if src in features and tgt in features:
        return [src, tgt], lambda r: (_clean(r[src]), _clean(r[tgt]))
    raise DataError(f"dataset {name}: cannot tell source and target apart; its features are {sorted(features)}. "
                    f"Understood layouts: 'translation' with {{{src!r}, {tgt!r}}} (data.src_lang/data.tgt_lang), "
                    f"'document' and 'summary', or columns {src!r} and {tgt!r}")


def _clean(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
