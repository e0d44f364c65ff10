"""Parallel data from local files: line-aligned pair files, JSONL or TSV, plain or gzip.

For split ``S`` under ``data.path`` the formats are:

* ``pairs``: ``S.{src_lang}`` and ``S.{tgt_lang}``, one sentence per line, line ``i`` of one translating line ``i``
  of the other (e.g. Multi30k's ``train.de.gz`` / ``train.en.gz``);
* ``jsonl``: ``S.jsonl``, one object per line with the texts under ``src_lang`` / ``tgt_lang``, either at the top
  level or inside ``"translation"`` (the Hugging Face layout);
* ``tsv``: ``S.tsv``, ``source<TAB>target`` per line.

Each file may also be gzip-compressed (``.gz`` appended). Every bad line is a :class:`DataError` naming
``file:line`` (1-based); with ``on_error=skip`` bad lines are skipped and counted in a :class:`LoadReport`
instead. Misaligned pair files are always an error: no line of them can be trusted.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

from tw_rl.data import DataError, LoadReport, Pair

log = logging.getLogger(__name__)

FORMATS = ("pairs", "jsonl", "tsv")


class _BadLine(Exception):
    """One bad line: ``reason`` is the counter key of :class:`LoadReport`, ``detail`` the message after file:line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Collector:
    """Keeps good pairs up to ``limit`` and either raises on or counts bad lines."""

    on_error: str
    limit: Optional[int]
    pairs: list[Pair]
    report: LoadReport
    first_skipped: str = ""

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.pairs) >= self.limit

    def bad(self, where: str, err: _BadLine) -> None:
        if self.on_error != "skip":
            raise DataError(f"{where}: {err.detail} (set data.on_error=skip to skip and count bad lines)")
        self.report.skipped += 1
        assert self.report.reasons is not None
        self.report.reasons[err.reason] = self.report.reasons.get(err.reason, 0) + 1
        if not self.first_skipped:
            self.first_skipped = f"{where}: {err.detail}"

    def add(self, pair: Pair) -> None:
        self.pairs.append(pair)
        self.report.kept += 1


# ----------------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------------
def read_split(data_cfg, split: str) -> list[Pair]:
    """Read one split under ``data_cfg.path``; logs one warning with the counts if lines were skipped."""
    col = _read(data_cfg, split)
    if col.report.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted((col.report.reasons or {}).items()))
        log.warning("data split %r under %s: kept %d pairs, skipped %d bad lines (%s; first: %s)",
                    split, data_cfg.path, col.report.kept, col.report.skipped, reasons, col.first_skipped)
    return col.pairs


def read_split_with_report(data_cfg, split: str) -> tuple[list[Pair], LoadReport]:
    """Read one split and report what was kept and skipped (by reason); logs nothing."""
    col = _read(data_cfg, split)
    return col.pairs, col.report


def _read(data_cfg, split: str) -> _Collector:
    if data_cfg.on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={data_cfg.on_error!r} is unknown; allowed: raise, skip")
    fmt, files = resolve_files(data_cfg, split)
    col = _Collector(on_error=data_cfg.on_error, limit=data_cfg.max_examples, pairs=[],
                     report=LoadReport(reasons={}))
    if fmt == "pairs":
        _read_pairs(files[0], files[1], col)
    elif fmt == "jsonl":
        _read_jsonl(files[0], data_cfg.src_lang, data_cfg.tgt_lang, col)
    else:
        _read_tsv(files[0], col)
    if not col.pairs:  # an empty split would only fail later, far from its cause
        skipped = f" ({col.report.skipped} bad lines skipped; first: {col.first_skipped})" if col.first_skipped else ""
        raise DataError(f"split {split!r}: no pairs in {' / '.join(map(str, files))}{skipped}")
    return col


def resolve_files(data_cfg, split: str) -> tuple[str, list[Path]]:
    """The format and the file(s) of ``split``: ``data.format``, or in ``auto`` the only format whose files exist."""
    if not data_cfg.path:
        raise DataError("data.kind=files needs data.path=DIR (a directory with the split files)")
    root = Path(data_cfg.path)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data.path={str(root)!r} {what} (resolved against the working directory: {root.resolve()}); "
                        f"set data.path=DIR to the directory holding the split files, e.g. "
                        f"{split}.{data_cfg.src_lang}[.gz] and {split}.{data_cfg.tgt_lang}[.gz]")
    bases = {
        "pairs": [root / f"{split}.{data_cfg.src_lang}", root / f"{split}.{data_cfg.tgt_lang}"],
        "jsonl": [root / f"{split}.jsonl"],
        "tsv": [root / f"{split}.tsv"],
    }
    if data_cfg.format == "auto":
        found = [fmt for fmt in FORMATS if any(_existing(b) for b in bases[fmt])]
        if not found:
            tried = [str(p) for fmt in FORMATS for b in bases[fmt] for p in (b, _gz(b))]
            there = sorted(p.name for p in root.iterdir() if p.is_file())
            shown = ", ".join(there[:12]) + (", ..." if len(there) > 12 else "") if there else "none"
            raise DataError(f"no files for split {split!r} under {root}; tried: {', '.join(tried)}. "
                            f"Files there: {shown} (the data.*_split keys name the splits)")
        if len(found) > 1:
            present = [str(p) for fmt in found for b in bases[fmt] for p in _existing(b)]
            raise DataError(f"split {split!r} under {root} exists in several formats ({', '.join(found)}: "
                            f"{', '.join(present)}); set data.format to one of them")
        fmt = found[0]
    elif data_cfg.format in FORMATS:
        fmt = data_cfg.format
    else:
        raise DataError(f"data.format={data_cfg.format!r} is unknown; allowed: auto, {', '.join(FORMATS)}")
    return fmt, [_pick(b, fmt) for b in bases[fmt]]


# ----------------------------------------------------------------------------------------------------------------
# files and lines
# ----------------------------------------------------------------------------------------------------------------
def _gz(base: Path) -> Path:
    return base.with_name(base.name + ".gz")


def _existing(base: Path) -> list[Path]:
    return [p for p in (base, _gz(base)) if p.is_file()]


def _pick(base: Path, fmt: str) -> Path:
    found = _existing(base)
    if not found:
        raise DataError(f"data.format={fmt}: missing file {base} (also tried {_gz(base)})")
    if len(found) > 1:
        raise DataError(f"both {found[0]} and {found[1]} exist; remove one so the data is unambiguous")
    return found[0]


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` as bytes, without the line break.

    Splitting bytes on b"\\n" only (not ``str.splitlines``) keeps pair files aligned: Unicode separators such as
    U+2028 or U+0085 inside a sentence must not start a new line.
    """
    try:
        with _open(path) as f:
            for raw in f:
                yield raw.rstrip(b"\n").rstrip(b"\r")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz is an EOFError
        raise DataError(f"{path}: cannot read: {e}") from None


def _decode(raw: bytes, line_no: int) -> str:
    try:
        # the BOM some editors write is not part of the first sentence
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise _BadLine("invalid_utf8", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start})")


def _text(value: str, side: str) -> str:
    text = value.strip()
    if not text:
        raise _BadLine(f"empty_{side}", f"empty {side}")
    return text


def _count_lines(path: Path) -> int:
    return sum(1 for _ in _raw_lines(path))


# ----------------------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------------------
def _read_pairs(src_path: Path, tgt_path: Path, col: _Collector) -> None:
    # Count both files first: misalignment is reported even when max_examples stops reading early.
    n_src, n_tgt = _count_lines(src_path), _count_lines(tgt_path)
    if n_src != n_tgt:
        shorter, longer = (src_path, tgt_path) if n_src < n_tgt else (tgt_path, src_path)
        raise DataError(f"pair files are misaligned: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}; "
                        f"{longer}:{min(n_src, n_tgt) + 1} has no counterpart in {shorter}")
    for line_no, (raw_src, raw_tgt) in enumerate(zip(_raw_lines(src_path), _raw_lines(tgt_path)), start=1):
        if col.full:
            return
        try:
            src = _text(_decode(raw_src, line_no), "source")
        except _BadLine as err:
            col.bad(f"{src_path}:{line_no}", err)
            continue
        try:
            tgt = _text(_decode(raw_tgt, line_no), "target")
        except _BadLine as err:
            col.bad(f"{tgt_path}:{line_no}", err)
            continue
        col.add(Pair(src, tgt, f"{src_path}:{line_no}"))


def _read_jsonl(path: Path, src_key: str, tgt_key: str, col: _Collector) -> None:
    for line_no, raw in enumerate(_raw_lines(path), start=1):
        if col.full:
            return
        where = f"{path}:{line_no}"
        try:
            src, tgt = _jsonl_row(_decode(raw, line_no), src_key, tgt_key)
            col.add(Pair(src, tgt, where))
        except _BadLine as err:
            col.bad(where, err)


def _jsonl_row(line: str, src_key: str, tgt_key: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine("bad_json", f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        raise _BadLine("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("translation"), dict):
        obj = obj["translation"]
    texts = []
    for key, side in ((src_key, "source"), (tgt_key, "target")):
        if key not in obj:
            raise _BadLine("missing_key", f"missing {side} key {key!r} (keys: {sorted(obj)}); "
                                          f"data.src_lang/data.tgt_lang name the keys")
        if not isinstance(obj[key], str):
            raise _BadLine("bad_json", f"{side} key {key!r} is {type(obj[key]).__name__}, not a string")
        texts.append(_text(obj[key], side))
    return texts[0], texts[1]


def _read_tsv(path: Path, col: _Collector) -> None:
    for line_no, raw in enumerate(_raw_lines(path), start=1):
        if col.full:
            return
        where = f"{path}:{line_no}"
        try:
            fields = _decode(raw, line_no).split("\t")
            if len(fields) != 2:
                raise _BadLine("bad_tsv", f"expected source<TAB>target (exactly one tab), "
                                          f"found {len(fields) - 1} tabs")
            col.add(Pair(_text(fields[0], "source"), _text(fields[1], "target"), where))
        except _BadLine as err:
            col.bad(where, err)
