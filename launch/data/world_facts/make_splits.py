"""Writes the splits of the capitals task (launch/configs/smollm2.yaml) from capitals.tsv, deterministically:

    python launch/data/world_facts/make_splits.py

capitals.tsv lists 189 countries (those whose capital is not their name, so that echoing the question rarely
counts as an answer: only for Sao Tome and Bissau, which fell in the training split, whose answers are never
scored) and the 50 US states, each with its capital and accepted alternatives after ``|`` (e.g. ``Sucre|La Paz``). The places are shuffled with a fixed seed and split 60 test / 60 validation / 119 train,
so no place of the validation or test split is seen in training. A validation or test line asks one question
("What is the capital of France?"); a training line is written in three phrasings (training only needs the
question: phase 0 trains the student on the teacher's answers, pretrain.student_targets=teacher). Each split is
a TSV of ``question<TAB>answers`` (the tsv format of tw_rl/data/files.py).
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent
SEED, N_TEST, N_VAL = 20261203, 60, 60
ASK = "What is the capital of {place}?"
TRAIN_ASK = (ASK, "Which city is the capital of {place}?", "Name the capital city of {place}.")


def places() -> list[tuple[str, str]]:
    out = []
    for line in (HERE / "capitals.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            kind, name, capital = line.split("\t")
            out.append((name if kind == "country" else f"the US state of {name}", capital))
    return out


def main(out: Path = HERE) -> None:
    rows = places()
    random.Random(SEED).shuffle(rows)
    test, val, train = rows[:N_TEST], rows[N_TEST:N_TEST + N_VAL], rows[N_TEST + N_VAL:]
    for name, split, asks in (("test", test, (ASK,)), ("val", val, (ASK,)), ("train", train, TRAIN_ASK)):
        lines = [f"{ask.format(place=p)}\t{a}" for p, a in split for ask in asks]
        (out / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        print(f"{name}: {len(split)} places, {len(lines)} lines")


if __name__ == "__main__":
    main()
