"""Atomic checkpoints of a run: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a directory ``run_dir/checkpoints/step_{step:06d}/`` holding

- ``{group}.safetensors`` for every tensor group (``student``, ``target``, ``optimizer``, ``replay``, ...),
- ``state.json``: the step, budget multipliers, RNG states (:func:`rng_state`) and other metadata,
- ``config.yaml``: the resolved config (:func:`tw_rl.config.to_yaml`),
- ``COMPLETE``: written last.

Atomicity: everything is written and fsync'ed inside a hidden temporary directory next to the final one
(``.tmp-step_000010-<random>``), which is then renamed to its final name — a single ``rename(2)``, atomic on POSIX —
and nothing is written into it afterwards. A crash therefore leaves either no ``step_*`` directory or a complete
one; :func:`latest_checkpoint` also ignores directories without ``COMPLETE`` in case one was made by other means.
Older checkpoints are deleted only after the new one is in place. One process writes a run's checkpoints.

Optimizer state dicts and RNG states are not JSON or tensor dicts as they come; :func:`optimizer_to_flat` /
:func:`optimizer_from_flat` and :func:`rng_state` / :func:`set_rng_state` convert them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tw_rl.rundir import RunDir

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "COMPLETE"
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

TensorLike = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------------------------------
# save / find / load
# --------------------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, tensors: Mapping[str, Mapping[str, TensorLike]],
                    state: Mapping[str, Any], config_yaml: str | None, keep: int = 3) -> Path:
    """Write the checkpoint of ``step`` atomically and return its directory; keep the newest ``keep``.

    ``tensors`` maps a group name to a flat dict of tensors or numpy arrays (dtypes kept; non-contiguous and
    memory-sharing tensors are copied so that safetensors accepts them). ``state`` must be JSON-serialisable.
    Raises ``FileExistsError`` if a checkpoint of ``step`` already exists; on any error nothing is left behind.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    for group in tensors:
        if not _GROUP_NAME.match(group):
            raise ValueError(f"tensor group {group!r} must match {_GROUP_NAME.pattern} (it becomes a file name)")
    state_json = _dumps_state(state)  # fail before touching the disk

    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step_{step:06d}-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint should be as readable as the run
        for group, group_tensors in tensors.items():
            path = tmp / f"{group}.safetensors"
            save_file(_prepare_tensors(group, group_tensors), str(path), metadata={"format": "pt"})
            _fsync_file(path)
        _write_text(tmp / STATE_FILE, state_json)
        if config_yaml is not None:
            _write_text(tmp / CONFIG_FILE, config_yaml)
        _write_text(tmp / COMPLETE_FILE, json.dumps({"step": int(step), "groups": sorted(tensors)}) + "\n")
        _fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)  # make the rename itself durable

    _prune(root, keep=keep, protect=final)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest (smallest step) first."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the largest step, or None. Temporary and incomplete directories are ignored."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``(tensors by group, state)`` of a checkpoint directory; tensors are on the CPU.

    Numpy arrays that were saved come back as torch tensors of the same dtype (``.numpy()`` turns them back).
    The config text is ``path / CONFIG_FILE``.
    """
    path = Path(path)
    if not (path / COMPLETE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_FILE} file)")
    tensors = {p.name[: -len(".safetensors")]: load_file(str(p), device="cpu")
               for p in sorted(path.glob("*.safetensors"))}
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return tensors, state


# --------------------------------------------------------------------------------------------------------------
# optimizer state dicts ↔ flat tensors + JSON
# --------------------------------------------------------------------------------------------------------------
def optimizer_to_flat(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors (safetensors) and a JSON-able skeleton.

    Every tensor, at any depth, is replaced in the skeleton by ``{"__tensor__": name}`` and stored under ``name``
    (its path, e.g. ``state/0/exp_avg``); tuples and dicts with non-string keys (the parameter ids of ``state``)
    are tagged so that :func:`optimizer_from_flat` rebuilds the exact structure. Works for any optimizer whose
    state is made of tensors, numbers, strings, None, lists, tuples and dicts.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state_dict, "", tensors)
    return tensors, meta


def optimizer_from_flat(tensors: Mapping[str, torch.Tensor], meta: Any) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`: a state dict for ``optimizer.load_state_dict``."""
    return _decode(meta, tensors)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        if name in tensors:
            raise ValueError(f"two tensors of the state dict map to the same name {name!r}")
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}".lstrip("/"), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}".lstrip("/"), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = [(k, _encode(v, f"{path}/{k}".lstrip("/"), tensors)) for k, v in value.items()]
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
            return dict(items)
        for k, _ in items:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"state dict key {k!r} at {path or '/'} is not a JSON scalar")
        return {"__dict__": [[k, v] for k, v in items]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state dict value at {path or '/'} of type {type(value).__name__} cannot be stored")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------------------
def rng_state(generator: np.random.Generator | None = None) -> dict[str, Any]:
    """JSON-able RNG states: Python ``random``, numpy's global RNG, torch's CPU RNG, and ``generator`` if given.

    CUDA RNG states are added when CUDA is initialised in this process.
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state().tolist(),
    }
    if generator is not None:
        out["generator"] = _encode(generator.bit_generator.state, "", {})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any], generator: np.random.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured; ``generator`` is set in place and must be given iff one was saved."""
    if ("generator" in state) != (generator is not None):
        raise ValueError("pass a numpy Generator exactly when the saved state has one "
                         f"(saved: {'generator' in state}, given: {generator is not None})")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if generator is not None:
        generator.bit_generator.state = _decode(state["generator"], {})
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _prepare_tensors(group: str, tensors: Mapping[str, TensorLike]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors with no two sharing memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in tensors.items():
        if isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)  # 0-d stays 0-d (np.ascontiguousarray would make it 1-d)
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                arr = np.array(arr, order="C")  # torch.from_numpy warns on read-only memory
            t = torch.from_numpy(arr)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu()
        else:
            raise TypeError(f"{group}/{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
        t = t.contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storages:
                t = t.clone()  # tied weights, views of one buffer, numpy views of one base
                ptr = t.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        out[name] = t
    return out


def _dumps_state(state: Mapping[str, Any]) -> str:
    try:
        return json.dumps(state, indent=1, sort_keys=True) + "\n"
    except TypeError as e:
        raise TypeError(f"checkpoint state is not JSON-serialisable: {e}") from None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int, protect: Path) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never ``protect``) and stale temporary dirs."""
    complete = list_checkpoints(root.parent)
    newest = complete[-keep:]
    if protect not in newest:  # a save of an older step than the newest (resumed from an older checkpoint)
        newest = newest[1:] + [protect]
    for p in complete:
        if p not in newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # left by a crashed save; never a checkpoint
