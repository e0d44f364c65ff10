"""The registry of phase-2 learners: name → module. Adding a learner is one file plus one line here.

Every module exposes ``make_learner(cfg, student, ...)``; see ``docs/algorithms.md``.
"""

import importlib
from types import ModuleType

ALGORITHMS: dict[str, str] = {
    "pcl": "tw_rl.algos.pcl",
}


def get_algorithm(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name])
