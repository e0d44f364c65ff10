"""Run-directory identity: what produced every cached artefact of a run.

``run_dir/manifest.json`` holds one record per artefact (``tokenizer``, ``teacher``, ``student`` of phase 0,
``references``, ``phase1_student``, ``final_student``, ``calibration``)::

    {"path": "models/phase1",                          # relative to the run directory
     "settings": {"phase1.lr": 0.001, ...},           # the config subset that decides it (flat, dotted keys)
     "inputs": {"teacher": "3f2a…", "data/train": "9b1c…"},   # ids of upstream artefacts, hashes of data
     "id": "c0ffee…",                                 # hash of (name, settings, inputs): what downstream records
     "files": {"model.safetensors": [size, sha256], ...},    # what verification checks
     "code": "0.1.0+git.1a2b3c4"}                     # the code version that wrote it (recorded, not compared)

:meth:`Manifest.reuse` answers "may this artefact be reused?": yes when its record has the same settings and
inputs and every recorded file is there with its size and hash; no (with the reason: the setting that changed,
old → new) when the settings or inputs differ, or the artefact is absent (then the caller recomputes it and the
artefacts that depend on it, whose inputs name it); and an :class:`ArtefactError` naming the file when the
artefact is there but a recorded file is missing, truncated or altered — a corrupt cache is never silently
replaced or used. The manifest is written after the artefact's files (:func:`atomic_dir`, :func:`atomic_write`),
so a crash leaves at worst an unrecorded artefact, which is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from tw_rl.rundir import ArtefactError, RunDir, atomic_write
from tw_rl.version import code_version

_ABSENT = " is absent"  # Manifest.reuse's reason when the artefact was simply not there yet
_FORMAT = 1


# --------------------------------------------------------------------------------------------------------------
# hashes and the code version
# --------------------------------------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (settings, inputs, a list of data pairs)."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def pairs_digest(pairs) -> str:
    """The hash of a list of data pairs (sources and targets, in order): a data split's identity."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.source.encode("utf-8") + b"\x00" + p.target.encode("utf-8") + b"\x01")
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, rel: str) -> dict[str, list]:
    p = root / rel
    if p.is_file():
        return {p.name: [p.stat().st_size, file_sha256(p)]}
    return {str(f.relative_to(p)): [f.stat().st_size, file_sha256(f)]
            for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")}


_VERIFIED: set[tuple[str, int, int]] = set()  # (file, size, mtime_ns) hashed and found as recorded


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"phase1": {"lr": 1e-3}}`` → ``{"phase1.lr": 1e-3}`` (dataclasses as dicts), for naming what changed."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, tuple):
        obj = list(obj)
    return {prefix[:-1]: json.loads(json.dumps(obj, default=str))}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["phase1.lr: 0.001 → 0.002", ...]`` between two flat dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {a!r} → {b!r}")
    return out


# --------------------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------------------
PHASE0_ARTEFACTS = ("tokenizer", "teacher", "student", "teacher_targets")  # (teacher_targets: when recorded)
PHASE1_ARTEFACTS = ("references", "phase1_student")
class Manifest:
    """``run_dir/manifest.json``, read once; every :meth:`record` rewrites it atomically."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = RunDir(self.dir).manifest
        self.artefacts: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        """(Re)read the file: every change re-reads it first, so two Manifest objects of one run never undo each
        other's records."""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.artefacts = dict(data["artefacts"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ArtefactError(f"{self.path} is corrupt ({type(e).__name__}: {e}); it records what produced "
                                    f"every artefact of the run, so the run cannot be trusted: use a new "
                                    f"out_dir") from None

    def id(self, name: str) -> str | None:
        """The id of a recorded artefact (what downstream artefacts record as their input)."""
        rec = self.artefacts.get(name)
        return rec["id"] if rec else None

    def entry(self, name: str) -> dict | None:
        return self.artefacts.get(name)

    def reuse(self, name: str, path: str | Path, settings: Mapping[str, Any], inputs: Mapping[str, Any]
              ) -> tuple[bool, str]:
        """``(True, "")`` when ``name`` at ``path`` may be reused; ``(False, why)`` when it must be recomputed.
        Raises :class:`ArtefactError` when it is there but one of its recorded files is missing or altered."""
        rel = self._rel(path)
        rec = self.artefacts.get(name)
        if not (self.dir / rel).exists():
            return False, f"{rel}{_ABSENT}"
        if rec is None:
            return False, f"{rel} is not recorded in {self.path.name}"
        diff = changes(rec["settings"], flatten(settings)) + [
            f"input {k} changed" for k in sorted(set(rec["inputs"]) | set(inputs))
            if rec["inputs"].get(k) != inputs.get(k)]
        if rec["path"] != rel:
            diff.append(f"path: {rec['path']!r} → {rel!r}")
        if diff:
            return False, "; ".join(diff)
        self.verify(name)
        return True, ""

    def verify(self, name: str) -> Path:
        """Check every recorded file of ``name``: present, same size, same SHA-256. Returns the artefact's path."""
        rec = self.artefacts.get(name)
        if rec is None:
            raise ArtefactError(f"{self.path} has no record of {name}")
        root = self.dir / rec["path"]
        for fname, (size, sha) in rec["files"].items():
            f = root if rec.get("file") else root / fname
            if not f.is_file():
                raise ArtefactError(f"{f} is missing ({name}, recorded in {self.path}): the artefact is incomplete; "
                                    f"restore it or use a new out_dir")
            st = f.stat()
            seen = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            if seen in _VERIFIED:  # hashed already in this process, unchanged since: a model is hashed once
                continue
            if st.st_size != size or file_sha256(f) != sha:
                raise ArtefactError(f"{f} is truncated or corrupt ({name}: {f.stat().st_size} bytes, "
                                    f"recorded {size} bytes with another SHA-256 in {self.path}); restore it or use "
                                    f"a new out_dir")
            _VERIFIED.add(seen)
        return root

    def verify_present(self) -> None:
        """:meth:`verify` every recorded artefact that is there (one that is absent is recomputed when needed)."""
        for name, rec in self.artefacts.items():
            if (self.dir / rec["path"]).exists():
                self.verify(name)

    def record(self, name: str, path: str | Path, settings: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
        """Record ``name`` (already complete at ``path``) with what produced it; returns its id."""
        rel = self._rel(path)
        flat = flatten(settings)
        inputs = dict(inputs)
        self._load()
        self.artefacts[name] = {"path": rel, "file": (self.dir / rel).is_file(), "settings": flat,
                                "inputs": inputs, "id": digest([name, flat, inputs]),
                                "files": _files(self.dir, rel), "code": code_version()}
        self.save()
        return self.artefacts[name]["id"]

    def refresh(self, name: str) -> None:
        """Re-hash the files of ``name`` after an in-place update that keeps its identity (calibration offsets
        written into ``tw_student.json``)."""
        self._load()
        rec = self.artefacts[name]
        rec["files"] = _files(self.dir, rec["path"])
        self.save()

    def refresh_path(self, path: str | Path) -> None:
        """:meth:`refresh` every artefact recorded at ``path`` (none: nothing to do)."""
        rel = self._rel(path)
        for name in [n for n, rec in self.artefacts.items() if rec["path"] == rel]:
            self.refresh(name)

    def forget(self, name: str) -> None:
        self._load()
        if self.artefacts.pop(name, None) is not None:
            self.save()

    def copy_to(self, dest: str | Path, names: tuple[str, ...]) -> None:
        """Write ``dest/manifest.json`` with the records of ``names`` (those recorded here): a new run directory
        that was given copies of these artefacts (``tw-rl sweep``) reuses them instead of recomputing them."""
        other = Manifest(dest)
        other.artefacts.update({n: self.artefacts[n] for n in names if n in self.artefacts})
        other.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps({"format": _FORMAT, "artefacts": self.artefacts}, indent=1,
                                           sort_keys=True) + "\n")

    def _rel(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return str(p.relative_to(self.dir))
        except ValueError:
            return str(p.resolve().relative_to(self.dir.resolve())) if p.is_absolute() else str(p)


def say_recomputing(name: str, why: str) -> None:
    """Say why a cached artefact is not reused (:meth:`Manifest.reuse`'s reason: what changed), unless it simply
    was not there yet."""
    if why and not why.endswith(_ABSENT):
        print(f"tw-rl: recomputing {name}: {why}", file=sys.stderr)
