"""Metrics: the JSON-lines log, its TensorBoard mirror, non-finite values, the Timer."""

import json
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tw_rl.metrics import MetricsLogger, Timer, read_metrics


def _strict_json(line):
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_records(tmp_path):
    t0 = time.time()
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"loss/pcl": 1.5, "rollout/episodes": 64, "lambda/0.2": np.float32(0.25),
                    "teacher/calls": torch.tensor(3), "timing/update_s": torch.tensor([0.5])}, phase="rl")
        log.log(1, {"loss/ce": 2.0})
        # flushed on every call: readable while the logger is open
        assert len(read_metrics(tmp_path)) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (_strict_json(line) for line in lines)
    assert first == {"step": 0, "phase": "rl", "time": first["time"], "loss/pcl": 1.5, "rollout/episodes": 64,
                     "lambda/0.2": 0.25, "teacher/calls": 3, "timing/update_s": 0.5}
    assert isinstance(first["rollout/episodes"], int) and isinstance(first["loss/pcl"], float)
    assert t0 <= first["time"] <= second["time"] <= time.time()
    assert second["phase"] is None and second["step"] == 1
    assert not (tmp_path / "tb").exists()
    assert read_metrics(tmp_path) == [first, second]
    assert read_metrics(tmp_path, phase="rl") == [first]


def test_non_finite_values_are_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        rec = log.log(3, {"loss/pcl": float("nan"), "loss/v": float("inf"), "grad/norm": np.float64(-np.inf),
                          "loss/t": torch.tensor(float("nan")), "ok": 1.0}, phase="rl")
    assert rec["loss/pcl"] is None
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    got = _strict_json(line)
    assert [got[k] for k in ("loss/pcl", "loss/v", "grad/norm", "loss/t", "ok")] == [None, None, None, None, 1.0]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["rl/ok"]  # non-finite values are not sent to TensorBoard


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(3):
            log.log(step, {"loss/pcl": 1.0 / (step + 1), "rollout/usage": 0.1 * step}, phase="rl")
        log.log(7, {"loss/ce": 0.5})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss/ce", "rl/loss/pcl", "rl/rollout/usage"]
    pcl = acc.Scalars("rl/loss/pcl")
    assert [e.step for e in pcl] == [0, 1, 2]
    assert [e.value for e in pcl] == pytest.approx([1.0, 0.5, 1.0 / 3])
    assert [e.step for e in acc.Scalars("loss/ce")] == [7]


def test_a_second_logger_appends(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"a": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # a resumed run
        log.log(1, {"a": 2.0})
    assert [(r["step"], r["a"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (1, 2.0)]


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    assert read_metrics(tmp_path) == []
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"a": 1.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 1, "a"')
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"step": 2, "phase": None, "time": 0.0}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_bad_metric_values_and_names(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(0, {"step": 1.0})
        with pytest.raises(ValueError, match="shape"):
            log.log(0, {"loss/x": torch.ones(2)})
        with pytest.raises(TypeError, match="loss/x"):
            log.log(0, {"loss/x": "high"})
    assert read_metrics(tmp_path) == []


def test_close_is_idempotent(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(0, {"a": 1.0})
    log.close()
    log.close()
    with pytest.raises(ValueError):
        log.log(1, {"a": 1.0})  # writing after close is an error, not silently dropped


def test_timer_records_and_accumulates():
    metrics = {}
    with Timer(metrics, "update") as t:
        time.sleep(0.01)
    assert set(metrics) == {"timing/update_s"}
    assert metrics["timing/update_s"] == t.elapsed >= 0.01
    before = metrics["timing/update_s"]
    with pytest.raises(RuntimeError):
        with Timer(metrics, "update") as t2:
            time.sleep(0.005)
            raise RuntimeError  # the time is still recorded, added to what was there
    assert t2.elapsed >= 0.005
    assert metrics["timing/update_s"] == pytest.approx(before + t2.elapsed)
