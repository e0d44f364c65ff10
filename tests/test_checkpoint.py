"""Checkpoints: exact round trips of tensors, optimizer and RNG states; atomic saves; retention."""

import json
import os
import random

import numpy as np
import pytest
import torch

import tw_rl.checkpoint as ckpt
from tw_rl.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, optimizer_from_flat,
                              optimizer_to_flat, rng_state, save_checkpoint, set_rng_state)
from tw_rl.config import Config, to_yaml


def _small_save(run_dir, step, keep=3):
    return save_checkpoint(run_dir, step, {"student": {"w": torch.full((2,), float(step))}}, {"step": step}, None,
                           keep=keep)


# ---- tensors, state, config --------------------------------------------------------------------------------
def test_tensor_round_trip_keeps_dtypes_shapes_and_values(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tied = torch.randn(3, 4)
    buf = np.arange(10, dtype=np.int64)
    tensors = {
        "student": {
            "f32": torch.randn(3, 4),
            "f16": torch.randn(5).half(),
            "bf16": torch.randn(5).bfloat16(),
            "i64": torch.arange(7),
            "transposed": torch.randn(3, 4).t(),  # not contiguous
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "grad": torch.randn(2, requires_grad=True),
            "tied_a": tied, "tied_b": tied,  # the same tensor twice (tied embeddings)
            "view_a": base[:6], "view_b": base[6:],  # two views of one storage
        },
        "replay": {
            "np_i64": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
            "np_bool": np.array([True, False, True]),
            "np_f32": np.linspace(0, 1, 5, dtype=np.float32),
            "np_u8": np.array([0, 255], dtype=np.uint8),
            "np_strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
            "np_0d": np.array(7, dtype=np.int64),
            "np_read_only": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
            "np_view_a": buf[:5], "np_view_b": buf[5:],
        },
    }
    path = save_checkpoint(tmp_path, 10, tensors, {"step": 10}, None)
    assert path == tmp_path / "checkpoints" / "step_000010"
    loaded, state = load_checkpoint(path)
    assert state == {"step": 10}
    assert set(loaded) == {"student", "replay"}
    for group, group_tensors in tensors.items():
        assert set(loaded[group]) == set(group_tensors)
        for name, want in group_tensors.items():
            want = torch.from_numpy(np.array(want)) if isinstance(want, np.ndarray) else want.detach()
            got = loaded[group][name]
            assert got.dtype == want.dtype, name
            assert got.shape == want.shape, name
            assert torch.equal(got, want), name
    assert loaded["replay"]["np_bool"].numpy().dtype == np.bool_


def test_state_and_config_are_saved(tmp_path):
    state = {"step": 3, "lambdas": [0.0, 1.5], "meta": {"phase": "rl", "ok": True, "none": None}}
    yaml = to_yaml(Config())
    path = save_checkpoint(tmp_path, 3, {}, state, yaml)
    assert load_checkpoint(path)[1] == state
    assert (path / "config.yaml").read_text() == yaml
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "config.yaml", "state.json"]


def test_bad_inputs_fail_before_writing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, {}, {"x": np.zeros(2)}, None)
    with pytest.raises(ValueError, match="group"):
        save_checkpoint(tmp_path, 1, {"a/b": {}}, {}, None)
    with pytest.raises(TypeError, match="student/x"):
        save_checkpoint(tmp_path, 1, {"student": {"x": [1.0]}}, {}, None)
    assert list_checkpoints(tmp_path) == []
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


# ---- optimizer ---------------------------------------------------------------------------------------------
def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        y = torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                             {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.1}],
                            betas=(0.8, 0.95))
    return model, opt


def test_optimizer_state_round_trip_continues_bit_identically(tmp_path):
    model, opt = _model_and_opt(0)
    _train(model, opt, steps=5, seed=1)
    flat, meta = optimizer_to_flat(opt.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in flat.values())
    assert "state/0/exp_avg" in flat
    path = save_checkpoint(tmp_path, 5, {"student": model.state_dict(), "optimizer": flat},
                           {"optimizer": meta}, None)

    tensors, state = load_checkpoint(path)
    model2, opt2 = _model_and_opt(123)  # different initial weights: everything must come from the checkpoint
    model2.load_state_dict(tensors["student"])
    restored = optimizer_from_flat(tensors["optimizer"], state["optimizer"])
    assert restored["param_groups"][0]["betas"] == (0.8, 0.95)
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert set(restored["state"]) == set(opt.state_dict()["state"])  # integer parameter ids
    opt2.load_state_dict(restored)

    _train(model, opt, steps=2, seed=2)
    _train(model2, opt2, steps=2, seed=2)
    for (name, p1), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p1, p2), name
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_optimizer_flat_rejects_unstorable_values():
    with pytest.raises(TypeError, match="state/0/fn"):
        optimizer_to_flat({"state": {0: {"fn": object()}}, "param_groups": []})


# ---- RNG ---------------------------------------------------------------------------------------------------
def _draws(gen):
    return (random.random(), random.getrandbits(64), np.random.rand(3).tolist(), np.random.randn(),
            gen.integers(0, 2**62, size=3).tolist(), gen.normal(), torch.rand(3).tolist(), torch.randn(2).tolist())


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
def test_rng_state_round_trip_through_a_checkpoint(tmp_path, bit_generator):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    torch.manual_seed(3)
    gen = np.random.Generator(bit_generator(4))
    gen.normal()
    path = save_checkpoint(tmp_path, 1, {}, {"rng": rng_state(gen)}, None)
    expected = _draws(gen)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    gen2 = np.random.Generator(bit_generator(99))
    assert _draws(gen2) != expected
    set_rng_state(load_checkpoint(path)[1]["rng"], gen2)
    assert _draws(gen2) == expected


def test_set_rng_state_requires_the_generator_that_was_saved():
    with pytest.raises(ValueError, match="Generator"):
        set_rng_state(rng_state(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="Generator"):
        set_rng_state(rng_state(), np.random.default_rng(0))


# ---- atomicity ---------------------------------------------------------------------------------------------
def test_latest_ignores_temporary_and_incomplete_directories(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    good = _small_save(tmp_path, 10)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000030-abcd").mkdir()  # a save that died before its rename
    (root / ".tmp-step_000030-abcd" / "COMPLETE").write_text("")
    (root / "step_000020").mkdir()  # made by other means, never completed
    (root / "step_000020" / "student.safetensors").write_text("partial")
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(root / "step_000020")


def _fail_on_second_safetensors(monkeypatch):
    real, calls = ckpt.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            real(*args, **kwargs)  # the file is written, then the process "dies"
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def _fail_on_complete_marker(monkeypatch):
    real = ckpt._write_text

    def write_text(path, text):
        if path.name == "COMPLETE":
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(ckpt, "_write_text", write_text)


def _fail_on_rename(monkeypatch):
    def rename(src, dst):
        raise OSError("crash before rename")

    monkeypatch.setattr(ckpt.os, "rename", rename)


@pytest.mark.parametrize("fail", [_fail_on_second_safetensors, _fail_on_complete_marker, _fail_on_rename])
def test_failure_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch, fail):
    previous = _small_save(tmp_path, 10)
    fail(monkeypatch)
    tensors = {"student": {"w": torch.ones(3)}, "target": {"w": torch.zeros(3)}, "optimizer": {"m": torch.ones(1)}}
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 20, tensors, {"step": 20}, "seed: 0\n", keep=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000010"]  # no final dir, no temp dir
    assert latest_checkpoint(tmp_path) == previous
    tensors, state = load_checkpoint(previous)
    assert state == {"step": 10} and torch.equal(tensors["student"]["w"], torch.full((2,), 10.0))


def test_existing_step_is_not_overwritten(tmp_path):
    _small_save(tmp_path, 5)
    with pytest.raises(FileExistsError):
        _small_save(tmp_path, 5)
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"step": 5}


# ---- retention ---------------------------------------------------------------------------------------------
def test_keep_newest_checkpoints_and_remove_stale_temporaries(tmp_path):
    for step in range(1, 6):
        _small_save(tmp_path, step, keep=2)
        assert len(list_checkpoints(tmp_path)) == min(step, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]

    stale = tmp_path / "checkpoints" / ".tmp-step_000006-dead"
    stale.mkdir()
    _small_save(tmp_path, 6, keep=3)
    assert not stale.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005", "step_000006"]


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (10, 20, 30):
        _small_save(tmp_path, step, keep=2)
    path = _small_save(tmp_path, 15, keep=2)  # e.g. a run resumed from an older checkpoint
    assert path.is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000015", "step_000030"]


def test_checkpoint_files_are_json_and_safetensors_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"student": {"w": torch.ones(2)}}, {"a": 1}, "x: 1\n")
    for p in path.iterdir():
        assert p.suffix in {".safetensors", ".json", ".yaml", ""}, p
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 1, "groups": ["student"]}
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o755)
