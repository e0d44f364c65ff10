"""The registry of phase-2 learners: name → module. Adding a learner is one file plus one line here.

Every module exposes ``make_learner(cfg, student, start_id, pad_id, **context)`` returning an object with
``update(batch: EpisodeBatch, lambdas [B]) -> dict[str, float]``, ``student``, ``state_dict()`` and
``load_state_dict()``; ``context`` holds ``teacher`` (the driver's :class:`~tw_rl.teacher.Teacher`) and
``teacher_src`` (student input ids → teacher input ids), for learners that query the teacher. A module may instead
expose ``run_phase2(run, student, log, resume) -> Student`` to run its own sampling loop (``rllib_ppo``).
See ``docs/algorithms.md``.
"""

import importlib
from types import ModuleType

ALGORITHMS: dict[str, str] = {
    "pcl": "tw_rl.algos.pcl",  # Path Consistency Learning, the default (SPEC §4)
    "gkd": "tw_rl.algos.gkd",  # on-policy distillation, generalized JSD + the <τ> decision
    "ppo": "tw_rl.algos.ppo",  # token-level PPO on the same reward and cost
    "rllib_ppo": "tw_rl.algos.rllib_ppo",  # RLlib's PPO on TokenMDPEnv through an RLModule wrapping the student
    "reinforce": "tw_rl.algos.reinforce",  # the smallest example (docs/algorithms.md)
}


def get_algorithm(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name])
