"""The files under ``launch/`` that commands need: the YAML configs and the job runtime environment.

In a checkout (an editable install included) they are read from the repository's ``launch/``; a wheel ships the
same files as package data (``tw_rl/_launch``, mapped in pyproject.toml), so ``tw-rl demo`` runs ``demo.yaml`` and
``tw-rl submit`` keeps its runtime env however tw-rl was installed. One copy in git; a missing file is an error
naming where it was looked for, never a silent default.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_launch"  # a wheel
_CHECKOUT = Path(__file__).resolve().parent.parent / "launch"  # the repository


def launch_dir() -> Path:
    """``tw_rl/_launch`` when installed from a wheel, else the checkout's ``launch/``."""
    for d in (_PACKAGED, _CHECKOUT):
        if (d / "runtime_env.yaml").is_file() and (d / "configs").is_dir():
            return d
    raise FileNotFoundError(f"tw-rl's launch files are missing: neither {_PACKAGED} (a wheel) nor {_CHECKOUT} (a "
                            f"checkout) holds runtime_env.yaml and configs/; reinstall tw-rl")


def config_file(name: str) -> Path:
    """A shipped config by name (``demo`` or ``demo.yaml``)."""
    path = launch_dir() / "configs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {path.name} in {path.parent}")
    return path


def runtime_env_file() -> Path:
    """The runtime environment of a training job (``tw-rl submit``)."""
    return launch_dir() / "runtime_env.yaml"
