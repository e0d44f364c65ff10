"""Phase-2 learners, one file each (``pcl``, ``gkd``, ``ppo``, ``rllib_ppo``, ``reinforce``); the registry that
names them is :mod:`tw_rl.registry`, the protocol they follow :mod:`tw_rl.algos.learner`."""

from tw_rl.registry import ALGORITHMS, get_algorithm, requirements

__all__ = ["ALGORITHMS", "get_algorithm", "requirements"]
