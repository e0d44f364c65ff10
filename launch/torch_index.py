#!/usr/bin/env python3
"""Which package index `make` installs torch from: prints the pip arguments (and, on stderr, why).

On a public Linux machine `pip install torch==2.13.0` from PyPI is the multi-GB CUDA build. So, with
``TORCH_INDEX=auto`` (the Makefile's default):

- a GPU (``nvidia-smi -L`` lists one): PyPI as configured — the CUDA build is what it is for;
- pip configured with its own index or wheel directory (``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``,
  ``PIP_FIND_LINKS`` or ``index-url`` / ``extra-index-url`` / ``find-links`` in ``pip config``, e.g. a machine-local
  wheel mirror): nothing added — that index decides, and a public one it may not reach is never added;
- otherwise: ``--index-url https://download.pytorch.org/whl/cpu``, PyTorch's CPU-only wheels (its own index also
  serves torch's dependencies).

``TORCH_INDEX=default`` adds nothing; ``TORCH_INDEX=cpu`` the CPU index; any other value is an index URL used as
``--index-url``. Standard library only: it runs before the venv has anything else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Mapping

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PUBLIC = ("https://pypi.org/simple", "https://pypi.org/simple/", "https://pypi.python.org/simple")
_KEYS = ("index-url", "extra-index-url", "find-links")
_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")


def has_gpu() -> bool:
    """An NVIDIA GPU that ``nvidia-smi -L`` lists."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def pip_config(pip: str) -> dict[str, str]:
    """``pip config list`` as ``{"global.extra-index-url": "...", ...}`` ({} when pip cannot say)."""
    try:
        r = subprocess.run([pip, "config", "list"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip("'\"")
    return out


def custom_index(config: Mapping[str, str], env: Mapping[str, str]) -> str | None:
    """The first setting that points pip somewhere other than public PyPI, as ``name=value``; None if none."""
    for name in _ENV:
        value = env.get(name, "").strip()
        if value and value not in PUBLIC:
            return f"{name}={value}"
    for key, value in config.items():
        if key.rpartition(".")[2] in _KEYS and value and value not in PUBLIC:
            return f"{key}={value}"
    return None


def torch_args(choice: str, gpu: bool, config: Mapping[str, str], env: Mapping[str, str]) -> tuple[list[str], str]:
    """The pip arguments for installing torch, and the reason."""
    if choice == "default":
        return [], "TORCH_INDEX=default: pip's configured index"
    if choice == "cpu":
        return ["--index-url", CPU_INDEX], "TORCH_INDEX=cpu: PyTorch's CPU index"
    if choice != "auto":
        return ["--index-url", choice], f"TORCH_INDEX={choice}"
    if gpu:
        return [], "a GPU is present (nvidia-smi): pip's configured index (the CUDA build)"
    where = custom_index(config, env)
    if where is not None:
        return [], f"no GPU, but pip is configured with its own index ({where}): that index decides"
    return ["--index-url", CPU_INDEX], "no GPU (no nvidia-smi listing one): PyTorch's CPU index"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default="auto", help="auto (default), default, cpu, or an index URL")
    p.add_argument("--pip", default="pip", help="the pip whose configuration counts")
    a = p.parse_args(argv)
    args, why = torch_args(a.index.strip() or "auto", has_gpu() if a.index == "auto" else False,
                           pip_config(a.pip) if a.index == "auto" else {}, os.environ)
    print(f"torch: {why}" + (f" ({' '.join(args)})" if args else ""), file=sys.stderr)
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
