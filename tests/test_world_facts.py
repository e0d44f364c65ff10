"""The short-answer task of the pretrained-teacher run (launch/data/world_facts/, launch/configs/smollm2.yaml): the
committed splits are what make_splits.py writes, no place is in two splits, and the files read as the run reads
them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tw_rl.config import load_config
from tw_rl.data.files import read_split
from tw_rl.evaluation.quality import answer_found

DIR = Path(__file__).resolve().parents[1] / "launch" / "data" / "world_facts"


def _module():
    spec = importlib.util.spec_from_file_location("make_splits", DIR / "make_splits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_splits_are_reproduced(tmp_path):
    _module().main(tmp_path)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.tsv").read_text() == (DIR / f"{split}.tsv").read_text(), split


def _place(question: str) -> str:
    return re.sub(r"^(What is the capital of |Which city is the capital of |Name the capital city of )|[?.]$", "",
                  question)


def test_splits_are_disjoint_by_place_and_read_as_the_run_reads_them():
    cfg = load_config(DIR.parents[1] / "configs" / "smollm2.yaml", [f"data.path={DIR}"])
    splits = {s: read_split(cfg.data, s) for s in ("train", "val", "test")}
    places = {s: {_place(p.source) for p in pairs} for s, pairs in splits.items()}
    assert [len(places[s]) for s in ("train", "val", "test")] == [119, 60, 60]
    assert len(splits["train"]) == 3 * 119 and len(splits["test"]) == len(splits["val"]) == 60
    assert not (places["train"] & places["val"] or places["train"] & places["test"] or places["val"] & places["test"])
    assert len(set().union(*places.values())) == 239 == len(_module().places())
    for pairs in splits.values():
        for p in pairs:
            assert p.target and answer_found(f"The answer is {p.target.split('|')[-1]}.", p.target)
    # echoing the question never counts as an answer where answers are scored (validation and test); training
    # answers are never scored (phase 0 trains on the teacher's outputs), and two of them would be
    echoed = {s: {p.target for p in pairs if answer_found(p.source, p.target)} for s, pairs in splits.items()}
    assert echoed == {"train": {"Sao Tome", "Bissau"}, "val": set(), "test": set()}
