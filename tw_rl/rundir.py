"""The run directory: its layout in one place (every file and folder a run writes, by name), the atomic writes of
its files, and the error for one that is missing or corrupt.

``tw-rl train`` writes a run directory; ``tw-rl eval`` / ``generate`` / ``calibrate``, :func:`tw_rl.load`, the
sweep and the RLlib adapter read it. They all ask a :class:`RunDir` for a path instead of joining strings, so the
layout is written once (docs/design.md, "The run directory")::

    RUN/config.yaml          the resolved config (written after the data checks, before phase 0)
    RUN/manifest.json        what produced each cached artefact (tw_rl/manifest.py)
    RUN/metrics.jsonl        metrics of every phase (tw_rl/metrics.py); RUN/tb/ with tensorboard
    RUN/tokenizer/           phase 0's tokenizer
    RUN/pretrain.json        phase 0's summary
    RUN/models/{teacher,student,phase1,final}/   the models of phases 0-2
    RUN/models/references.npz, RUN/models/phase0_rng.json   phase 1's inputs
    RUN/checkpoints/step_NNNNNN/                phase 2's checkpoints (tw_rl/checkpoint.py)
    RUN/calibration.json     the <τ> offsets per budget, fitted on validation
    RUN/report.json, report.md, quality_vs_cost.png, outputs.jsonl   the evaluation (also in RUN/eval/ or --out)

A report directory (``RUN``, ``RUN/eval`` or ``tw-rl eval --out DIR``) has the same report names, so
``RunDir(DIR).report_json`` serves all three.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MODELS = ("teacher", "student", "phase1", "final")  # phase 0's teacher and student, phase 1's and 2's students


@dataclass(frozen=True)
class RunDir:
    """The paths of one run (or report) directory. ``RunDir(path)`` touches nothing on disk."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    # ---- configuration and provenance
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    # ---- phase 0
    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        """``models/NAME``: ``teacher`` and ``student`` (phase 0), ``phase1``, ``final`` (phase 2)."""
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r} of a run directory; known: {MODELS}")
        return self.models / name

    @staticmethod
    def trained_student_name(rl_enabled: bool) -> str:
        """The run's trained student: ``final`` when its config ran phase 2, else ``phase1``."""
        return "final" if rl_enabled else "phase1"

    def trained_student(self, rl_enabled: bool) -> Path:
        return self.model(self.trained_student_name(rl_enabled))

    # ---- phases 1 and 2
    @property
    def phase0_rng(self) -> Path:
        """The RNG state after phase 0, restored when phase 0 is cached (an exact resume)."""
        return self.models / "phase0_rng.json"

    @property
    def references(self) -> Path:
        return self.models / "references.npz"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    # ---- calibration and evaluation
    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def eval_dir(self) -> Path:
        """Where ``tw-rl eval`` writes without ``--out``."""
        return self.root / "eval"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plot(self) -> Path:
        return self.root / "quality_vs_cost.png"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs.jsonl"


class ArtefactError(RuntimeError):
    """A run file that is missing, truncated or corrupt; the message names the file (the CLI exits with 2)."""


# ---- atomic writes: a temporary next to the target, then os.replace
def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``: readers see
    the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are as readable as before
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (by a library that wants a file name); moved into place
    with ``os.replace`` when the block ends without an error, deleted otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory next to ``path`` to write a whole artefact into; when the block succeeds it replaces
    ``path`` (an existing one is moved aside first and deleted after), when it fails it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
