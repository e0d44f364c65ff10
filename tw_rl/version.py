"""What code produced a result: ``git describe`` of the checkout this package runs from, else the package version.

Used by ``tw-rl --version`` and recorded in ``report.json`` (``commit``).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from tw_rl import __version__

_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_describe() -> str | None:
    """``git describe --always --dirty --tags`` when this package runs from a git checkout (``-dirty``: with
    uncommitted changes); None otherwise (an installed wheel has no history to describe)."""
    if not ((_ROOT / ".git").exists() and (_ROOT / "pyproject.toml").is_file()):
        return None
    try:
        r = subprocess.run(["git", "-C", str(_ROOT), "describe", "--always", "--dirty", "--tags"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def code_version() -> str:
    """The commit (``git describe``), else ``tw-rl <package version>``."""
    return git_describe() or f"tw-rl {__version__}"


def version_line() -> str:
    """``tw-rl --version``: the package version, and the commit in a checkout."""
    desc = git_describe()
    return f"tw-rl {__version__}" + (f" (git {desc})" if desc else "")
