"""The Multi30K pipeline at CI size: launch/configs/multi30k.yaml end to end on generated data in the same format.

A few hundred German→English pairs are written to a temporary directory as ``{train,val,test_2016_flickr}.{de,en}.gz``
(one sentence per line, line N of ``.de`` translating line N of ``.en``, as in ``../shared/data/multi30k``, which the
tests never read). The run goes through the real config file with overrides for the data path and tiny sizes:
tokenizer → phase 0 → phase 1 → phase 2 → evaluation by ``tw-rl train``, then ``tw-rl eval``.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from tests.test_train import TINY_PHASES
from tw_rl.cli import main
from tw_rl.config import load_config
from tw_rl.data import DataError, load_split
from tw_rl.evaluation.report import validate_report

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "configs" / "multi30k.yaml"

# A tiny German→English image-caption grammar: determiner + (adjective) + noun + verb phrase + (place).
_SUBJ = [("Ein Mann", "A man"), ("Eine Frau", "A woman"), ("Ein Junge", "A boy"), ("Ein Mädchen", "A girl"),
         ("Ein Hund", "A dog"), ("Zwei Männer", "Two men"), ("Eine Gruppe von Kindern", "A group of children")]
_ADJ = [("", ""), ("junger ", "young "), ("älterer ", "older "), ("kleiner ", "little ")]
_VERB = [("läuft", "is running"), ("sitzt", "is sitting"), ("spielt Fußball", "is playing soccer"),
         ("fährt Fahrrad", "is riding a bike"), ("lächelt", "is smiling"), ("springt", "is jumping")]
_PLACE = [("", ""), (" auf der Straße", " on the street"), (" im Park", " in the park"),
          (" am Strand", " on the beach"), (" im Schnee", " in the snow"), (" vor einem Haus", " in front of a house")]
SPLITS = {"train": 360, "val": 24, "test_2016_flickr": 24}


def _pair(rng: random.Random) -> tuple[str, str]:
    (sd, se), (ad, ae), (vd, ve), (pd, pe) = (rng.choice(x) for x in (_SUBJ, _ADJ, _VERB, _PLACE))
    if ad and sd.startswith("Ein "):  # "Ein junger Mann" / "A young man"
        sd = "Ein " + ad + sd[4:]
        se = se.split(" ", 1)[0] + " " + ae + se.split(" ", 1)[1]
    if se.startswith("Two") or se.startswith("A group"):
        ve = ve.replace("is ", "are ", 1)
    return f"{sd} {vd}{pd}.", f"{se} {ve}{pe}."


def write_multi30k_like(root: Path, seed: int = 0) -> Path:
    """``{split}.{de,en}.gz`` under ``root``, in the file format of ``../shared/data/multi30k``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in SPLITS.items():
        pairs = [_pair(rng) for _ in range(n)]
        for lang, col in (("de", 0), ("en", 1)):
            text = "".join(p[col] + "\n" for p in pairs)
            (root / f"{split}.{lang}.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    return root


# Tiny models and one short iteration of each phase; everything else comes from the config file.
CI = ["tokenizer.vocab_size=200", *TINY_PHASES, "rl.iterations=1", "rl.updates_per_iteration=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_multi30k_like(tmp_path_factory.mktemp("multi30k"))


def test_config_reads_multi30k_layout(data_dir):
    cfg = load_config(CONFIG, [f"data.path={data_dir}"])
    assert (cfg.data.kind, cfg.data.src_lang, cfg.data.tgt_lang) == ("files", "de", "en")
    assert (cfg.data.train_split, cfg.data.validation_split, cfg.data.test_split) == ("train", "val",
                                                                                      "test_2016_flickr")
    for split, n in SPLITS.items():
        pairs = load_split(cfg.data, split)
        assert len(pairs) == n
        assert pairs[0].origin.startswith(str(data_dir / f"{split}.de.gz"))
    assert cfg.teacher.arch.d_model > cfg.student.arch.d_model  # the real sizes: teacher much larger


def test_data_path_is_a_config_key(tmp_path):
    default = load_config(CONFIG)
    assert default.data.path and not Path(default.data.path).is_absolute()  # relative to the working directory
    assert load_config(CONFIG, [f"data.path={tmp_path}"]).data.path == str(tmp_path)


def test_missing_data_directory_names_the_path(tmp_path):
    missing = tmp_path / "no" / "multi30k"
    cfg = load_config(CONFIG, [f"data.path={missing}"])
    with pytest.raises(DataError) as e:
        load_split(cfg.data, cfg.data.train_split)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value) and "data.path" in str(e.value)


def test_train_with_missing_data_directory_fails_before_training(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = main(["train", "--config", str(CONFIG), f"data.path={missing}", f"out_dir={tmp_path / 'run'}"] + CI)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "run" / "models").exists()


def test_pipeline_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"data.path={data_dir}", f"out_dir={out}"] + CI
    assert main(["train", "--config", str(CONFIG)] + overrides) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert [r["budget"] for r in report["tw"]] == [0.0, 0.2, 0.5]
    assert report["tw"][0]["usage_mean"] == 0.0
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # trained on the training split, shared
    pre = json.loads((out / "pretrain.json").read_text())
    assert pre["train_pairs"] == SPLITS["train"] and pre["test_split"] == "test_2016_flickr"
    assert pre["teacher"]["params"] > pre["student"]["params"]
    for d in ("teacher", "student", "phase1", "final"):
        assert any((out / "models" / d).glob("*.safetensors")), d

    # tw-rl eval on the finished run (the command the full pipeline ends with) writes a valid report elsewhere
    ev = tmp_path / "eval"
    assert main(["eval", "--run", str(out), "--out", str(ev), "eval.baselines=false"]) == 0
    validate_report(json.loads((ev / "report.json").read_text()))
    assert "b=0.2" in capsys.readouterr().out
