"""Local-file data (pairs, jsonl, tsv), Hugging Face loading offline, and the token-length check."""

from __future__ import annotations

import gzip
import json
import logging
import time
from pathlib import Path

import pytest

from tw_rl.config import DataConfig
from tw_rl.data import DataError, Pair, load_split
from tw_rl.data.files import read_split, read_split_with_report
from tw_rl.data.validate import check_token_lengths, check_token_lengths_with_report

DE = ["Ein Hund läuft.", "Zwei Männer.", "Eine Frau singt."]
EN = ["A dog runs.", "Two men.", "A woman sings."]


def cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(kind="files", path=str(tmp_path), **kw)


def write(path: Path, data: str | bytes) -> Path:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def lines(items: list[str]) -> str:
    return "".join(s + "\n" for s in items)


def texts(pairs: list[Pair]) -> list[tuple[str, str]]:
    return [(p.source, p.target) for p in pairs]


# ----------------------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_pair_files(tmp_path, suffix):
    write(tmp_path / f"train.de{suffix}", lines(DE))
    write(tmp_path / f"train.en{suffix}", lines(EN))
    pairs = load_split(cfg(tmp_path), "train")
    assert texts(pairs) == list(zip(DE, EN))
    assert [p.origin for p in pairs] == [f"{tmp_path / ('train.de' + suffix)}:{i}" for i in (1, 2, 3)]


def test_pair_files_keep_unicode_separators_and_crlf(tmp_path):
    # U+2028 inside a sentence is not a line break; CRLF endings and a BOM are not part of the text
    write(tmp_path / "train.de", "\ufeffa\u2028b\r\nc\r\n")
    write(tmp_path / "train.en", "x\ny")
    assert texts(read_split(cfg(tmp_path), "train")) == [("a\u2028b", "x"), ("c", "y")]


def test_jsonl_flat_and_translation_layouts(tmp_path):
    rows = [{"de": DE[0], "en": EN[0]}, {"translation": {"de": DE[1], "en": EN[1]}}, {"en": EN[2], "de": DE[2]}]
    write(tmp_path / "dev.jsonl", lines([json.dumps(r, ensure_ascii=False) for r in rows]))
    pairs = read_split(cfg(tmp_path), "dev")
    assert texts(pairs) == list(zip(DE, EN))
    assert pairs[1].origin == f"{tmp_path / 'dev.jsonl'}:2"


def test_jsonl_gz_with_other_keys(tmp_path):
    write(tmp_path / "train.jsonl.gz", lines([json.dumps({"src": "a", "tgt": "b"})]))
    assert texts(read_split(cfg(tmp_path, src_lang="src", tgt_lang="tgt"), "train")) == [("a", "b")]


def test_tsv(tmp_path):
    write(tmp_path / "test.tsv", lines([f"{d}\t{e}" for d, e in zip(DE, EN)]))
    pairs = read_split(cfg(tmp_path), "test")
    assert texts(pairs) == list(zip(DE, EN))
    assert pairs[2].origin == f"{tmp_path / 'test.tsv'}:3"


def test_forced_format(tmp_path):
    write(tmp_path / "train.tsv", "a\tb\n")
    write(tmp_path / "train.jsonl", '{"de": "c", "en": "d"}\n')
    assert texts(read_split(cfg(tmp_path, format="tsv"), "train")) == [("a", "b")]
    assert texts(read_split(cfg(tmp_path, format="jsonl"), "train")) == [("c", "d")]
    with pytest.raises(DataError, match="missing file .*train.de"):
        read_split(cfg(tmp_path, format="pairs"), "train")


def test_max_examples(tmp_path):
    write(tmp_path / "train.de", lines(DE))
    write(tmp_path / "train.en", lines(EN))
    assert texts(read_split(cfg(tmp_path, max_examples=2), "train")) == list(zip(DE, EN))[:2]


# ----------------------------------------------------------------------------------------------------------------
# finding files
# ----------------------------------------------------------------------------------------------------------------
def test_auto_no_files_lists_paths_tried(tmp_path):
    with pytest.raises(DataError) as e:
        read_split(cfg(tmp_path), "valid")
    for name in ["valid.de", "valid.en.gz", "valid.jsonl", "valid.tsv"]:
        assert str(tmp_path / name) in str(e.value)


def test_auto_several_formats(tmp_path):
    write(tmp_path / "train.tsv", "a\tb\n")
    write(tmp_path / "train.jsonl", '{"de": "a", "en": "b"}\n')
    with pytest.raises(DataError, match="data.format"):
        read_split(cfg(tmp_path), "train")


def test_pair_file_without_counterpart(tmp_path):
    write(tmp_path / "train.de", "a\n")
    with pytest.raises(DataError, match="missing file .*train.en"):
        read_split(cfg(tmp_path), "train")


def test_plain_and_gz_both_present(tmp_path):
    for name in ["train.de", "train.de.gz", "train.en"]:
        write(tmp_path / name, "a\n")
    with pytest.raises(DataError, match="train.de.gz"):
        read_split(cfg(tmp_path), "train")


def test_no_path(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        read_split(DataConfig(kind="files"), "train")
    with pytest.raises(DataError, match="nope' does not exist"):
        read_split(cfg(tmp_path / "nope"), "train")
    write(tmp_path / "a_file", "x\n")
    with pytest.raises(DataError, match="a_file' is not a directory"):
        read_split(cfg(tmp_path / "a_file"), "train")


# ----------------------------------------------------------------------------------------------------------------
# bad lines: raise names file:line; skip counts
# ----------------------------------------------------------------------------------------------------------------
def test_misaligned_pair_files(tmp_path):
    write(tmp_path / "train.de.gz", lines(DE))
    write(tmp_path / "train.en", lines(EN[:2]))
    for on_error in ["raise", "skip"]:  # never skippable: no line of misaligned files can be trusted
        with pytest.raises(DataError) as e:
            read_split(cfg(tmp_path, on_error=on_error, max_examples=1), "train")
        msg = str(e.value)
        assert "train.de.gz has 3 lines" in msg and "train.en has 2" in msg and "train.de.gz:3" in msg


@pytest.mark.parametrize("fmt", ["pairs", "tsv", "jsonl"])
def test_empty_target(tmp_path, fmt):
    tgt = [EN[0], "  ", EN[2]]
    if fmt == "pairs":
        write(tmp_path / "train.de", lines(DE))
        write(tmp_path / "train.en", lines(tgt))
        where = "train.en:2"
    elif fmt == "tsv":
        write(tmp_path / "train.tsv", lines([f"{d}\t{e}" for d, e in zip(DE, tgt)]))
        where = "train.tsv:2"
    else:
        write(tmp_path / "train.jsonl", lines([json.dumps({"de": d, "en": e}) for d, e in zip(DE, tgt)]))
        where = "train.jsonl:2"
    with pytest.raises(DataError, match=f"{where}: empty target"):
        read_split(cfg(tmp_path), "train")
    pairs, report = read_split_with_report(cfg(tmp_path, on_error="skip"), "train")
    assert texts(pairs) == [(DE[0], EN[0]), (DE[2], EN[2])]
    assert (report.kept, report.skipped, report.reasons) == (2, 1, {"empty_target": 1})


def test_empty_source(tmp_path):
    write(tmp_path / "train.de", lines([DE[0], DE[1], ""]))
    write(tmp_path / "train.en", lines(EN))
    with pytest.raises(DataError, match="train.de:3: empty source"):
        read_split(cfg(tmp_path), "train")


def test_invalid_utf8(tmp_path):
    write(tmp_path / "train.de", lines(DE))
    write(tmp_path / "train.en", lines(EN).encode().replace(b"Two", b"T\xffo"))
    with pytest.raises(DataError, match=r"train.en:2: invalid UTF-8 \(byte 0xff"):
        read_split(cfg(tmp_path), "train")
    pairs, report = read_split_with_report(cfg(tmp_path, on_error="skip"), "train")
    assert len(pairs) == 2 and report.reasons == {"invalid_utf8": 1}


def test_bad_json_and_missing_key(tmp_path):
    write(tmp_path / "train.jsonl", lines(['{"de": "a", "en": "b"}', '{"de": "a", ', '{"de": "a"}', "[1]",
                                           '{"de": "a", "en": 3}']))
    with pytest.raises(DataError, match="train.jsonl:2: malformed JSON"):
        read_split(cfg(tmp_path), "train")
    write(tmp_path / "train.jsonl", lines(['{"de": "a", "en": "b"}', '{"de": "a"}']))
    with pytest.raises(DataError, match="train.jsonl:2: missing target key 'en'"):
        read_split(cfg(tmp_path), "train")
    write(tmp_path / "train.jsonl", lines(['{"de": "a", "en": "b"}', '{"de": "a", ', '{"de": "a"}', "[1]",
                                           '{"de": "a", "en": 3}', "", '{"de": "c", "en": "d"}']))
    pairs, report = read_split_with_report(cfg(tmp_path, on_error="skip"), "train")
    assert texts(pairs) == [("a", "b"), ("c", "d")]
    assert report.skipped == 5 and report.reasons == {"bad_json": 4, "missing_key": 1}


@pytest.mark.parametrize("line", ["no tab here", "a\tb\tc"])
def test_tsv_needs_exactly_one_tab(tmp_path, line):
    write(tmp_path / "train.tsv", lines(["x\ty", line]))
    with pytest.raises(DataError, match="train.tsv:2: expected source<TAB>target"):
        read_split(cfg(tmp_path), "train")


def test_skip_logs_one_warning_with_counts(tmp_path, caplog):
    write(tmp_path / "train.tsv", lines(["x\ty", "bad", "\tz", "u\tv"]))
    with caplog.at_level(logging.WARNING, logger="tw_rl.data.files"):
        pairs = read_split(cfg(tmp_path, on_error="skip"), "train")
    assert texts(pairs) == [("x", "y"), ("u", "v")]
    [record] = caplog.records
    assert "skipped 2" in record.getMessage() and "bad_tsv=1" in record.getMessage()
    assert "empty_source=1" in record.getMessage() and "train.tsv:2" in record.getMessage()


def test_max_examples_counts_kept_pairs(tmp_path):
    write(tmp_path / "train.tsv", lines(["a\tb", "bad", "c\td", "e\tf"]))
    pairs, report = read_split_with_report(cfg(tmp_path, on_error="skip", max_examples=2), "train")
    assert texts(pairs) == [("a", "b"), ("c", "d")] and report.skipped == 1


def test_empty_split_is_an_error(tmp_path):
    write(tmp_path / "train.de", "")
    write(tmp_path / "train.en", "")
    with pytest.raises(DataError, match="no pairs"):
        read_split(cfg(tmp_path), "train")
    write(tmp_path / "dev.tsv", "bad\n")
    with pytest.raises(DataError, match="no pairs .*1 bad lines skipped; first: .*dev.tsv:1"):
        read_split(cfg(tmp_path, on_error="skip"), "dev")


def test_corrupt_gzip(tmp_path):
    write(tmp_path / "train.de.gz", lines(DE))
    (tmp_path / "train.en.gz").write_bytes(gzip.compress(lines(EN).encode())[:-12])  # truncated
    with pytest.raises(DataError, match="train.en.gz: cannot read"):
        read_split(cfg(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------------------------
def test_hf_offline_fails_fast_with_hint(monkeypatch):
    from tw_rl.data.hf import load_hf_split

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        load_hf_split(DataConfig(kind="hf", hf_name="wmt19", hf_config="de-en"), "validation")
    assert time.monotonic() - t0 < 5
    assert "data.kind=files" in str(e.value) and "wmt19" in str(e.value)


def test_hf_needs_a_name():
    with pytest.raises(DataError, match="data.hf_name"):
        load_split(DataConfig(kind="hf"), "train")


@pytest.mark.parametrize("layout", ["translation", "summarization", "columns", "unknown"])
def test_hf_layouts(monkeypatch, layout):
    import datasets

    from tw_rl.data.hf import load_hf_split_with_report

    data = {
        "translation": {"translation": [{"de": "a", "en": "b"}, {"de": "c", "en": " "}, {"de": "e", "en": "f"}]},
        "summarization": {"document": ["a", "c", "e"], "summary": ["b", "", "f"], "id": ["1", "2", "3"]},
        "columns": {"de": ["a", "c", "e"], "en": ["b", None, "f"]},
        "unknown": {"text": ["a"]},
    }[layout]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(data))
    c = DataConfig(kind="hf", hf_name="toy", on_error="skip")
    if layout == "unknown":
        with pytest.raises(DataError, match="features are \\['text'\\]"):
            load_hf_split_with_report(c, "train")
        return
    pairs, report = load_hf_split_with_report(c, "train")
    assert texts(pairs) == [("a", "b"), ("e", "f")] and report.reasons == {"empty_target": 1}
    assert pairs[1].origin == "toy[train]#2"
    with pytest.raises(DataError, match=r"toy\[train\]#1: empty target"):
        load_hf_split_with_report(DataConfig(kind="hf", hf_name="toy"), "train")


def test_hf_translation_languages_must_match(monkeypatch):
    import datasets

    from tw_rl.data.hf import load_hf_split

    features = datasets.Features({"translation": datasets.Translation(languages=["cs", "en"])})
    ds = datasets.Dataset.from_dict({"translation": [{"cs": "a", "en": "b"}]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    with pytest.raises(DataError, match="translation languages are \\['cs', 'en'\\]"):
        load_hf_split(DataConfig(kind="hf", hf_name="wmt19", hf_config="cs-en"), "train")
    assert texts(load_hf_split(DataConfig(kind="hf", hf_name="wmt19", src_lang="cs"), "train")) == [("a", "b")]


# ----------------------------------------------------------------------------------------------------------------
# token lengths
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byt5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # one token per byte + </s>; needs no files


def test_token_lengths_raise_names_origin(byt5):
    pairs = [Pair("abc", "xy", "f.de:1"), Pair("abcdefgh", "xy", "f.de:2"), Pair("a", "xyzxyz", "f.de:3")]
    assert check_token_lengths(pairs[:1], byt5, 4, 3, "raise") == pairs[:1]  # 3 bytes + </s> = 4 tokens: fits
    with pytest.raises(DataError, match=r"f.de:2: source is 9 tokens, over the limit data.max_src_tokens=8"):
        check_token_lengths(pairs, byt5, 8, 8, "raise")
    with pytest.raises(DataError, match=r"f.de:3: target is 7 tokens, over the limit data.max_tgt_tokens=6"):
        check_token_lengths(pairs, byt5, 9, 6, "raise")
    with pytest.raises(DataError, match=r"f.de:1: source is 7 tokens.*prefix 'b: '"):
        check_token_lengths(pairs, byt5, 6, 9, "raise", src_prefix="b: ")


def test_token_lengths_skip_counts(byt5, caplog):
    pairs = [Pair("abc", "xy", "1"), Pair("abcdefgh", "xy", "2"), Pair("a", "xyzxyz", "3"), Pair("ab", "x", "4")]
    kept, report = check_token_lengths_with_report(pairs, byt5, 8, 6, "skip")
    assert [p.origin for p in kept] == ["1", "4"]
    assert (report.kept, report.skipped) == (2, 2)
    assert report.reasons == {"source_too_long": 1, "target_too_long": 1}
    with caplog.at_level(logging.WARNING, logger="tw_rl.data.validate"):
        assert check_token_lengths(pairs, byt5, 8, 6, "skip") == kept
    assert "skipped 2" in caplog.text
