"""The registry of phase-2 learners: name → module. Adding a learner is one file in ``tw_rl/algos/`` plus one line
here.

Every module exposes ``make_learner(cfg, student, start_id, pad_id, **context)`` returning a
:class:`tw_rl.algos.learner.Learner`; ``context`` holds ``teacher`` (the driver's :class:`~tw_rl.teacher.Teacher`),
for learners that query the teacher. A learner with its own sampling loop (``rllib_ppo``) says so through the
protocol (``owns_loop``). Settings an algorithm cannot run without are declared in :data:`REQUIRES` (applied when
the user leaves them unset). See ``docs/algorithms.md``.

The registry names modules by string and imports nothing of them, so the config (which checks ``algo`` and applies
:data:`REQUIRES`) stands below the learners.
"""

import importlib
from types import ModuleType
from typing import Any

ALGORITHMS: dict[str, str] = {
    "pcl": "tw_rl.algos.pcl",  # Path Consistency Learning, the default (SPEC §4)
    "gkd": "tw_rl.algos.gkd",  # on-policy distillation, generalized JSD + the <τ> decision
    "ppo": "tw_rl.algos.ppo",  # token-level PPO on the same reward and cost
    "rllib_ppo": "tw_rl.distributed.rllib_ppo",  # RLlib's PPO on TokenMDPEnv through an RLModule wrapping the
    # student: all RLlib, so it lives in the Ray wing
    "reinforce": "tw_rl.algos.reinforce",  # the smallest example (docs/algorithms.md)
}


# What an algorithm needs from the rest of the config: key → (value, why). Resolved by tw_rl.config.load_config
# before anything runs: a key that neither the YAML file nor an override sets takes the algorithm's value, so
# ``algo=NAME`` alone always runs; a key set explicitly to another value is a ConfigError that names both keys.
REQUIRES: dict[str, dict[str, tuple[Any, str]]] = {
    "rllib_ppo": {"rl.trainable": ("all", "trains the whole student in its own loop (RLlib's PPO learner, "
                                          "tw_rl/distributed/rllib_ppo.py)")},
}
# Algorithms whose learner runs data-parallel (learner.num_workers ≥ 1, tw_rl/distributed/data_parallel.py); every
# other one needs learner.num_workers=0.
DATA_PARALLEL = frozenset({"pcl"})


def requirements(name: str) -> dict[str, tuple[Any, str]]:
    """The settings ``name`` needs (:data:`REQUIRES`, plus ``learner.num_workers=0`` outside :data:`DATA_PARALLEL`)."""
    req = {} if name in DATA_PARALLEL else {
        "learner.num_workers": (0, "runs one learner (data-parallel learning is built for algo=pcl only)")}
    req.update(REQUIRES.get(name, {}))
    return req


def get_algorithm(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name])
