"""Gymnasium environments of tw-rl, imported as ``tw_rl.envs``. Importing it registers ``tw_rl/TokenMDP-v0``.

The files live in the repository's top-level ``envs/`` folder; they are installed as ``tw_rl/envs`` (a bare
``envs`` would collide with any other project's): pyproject maps the folder, and in a checkout ``tw_rl/__init__.py``
finds it. Imports inside the folder are relative, so they work under that name.
"""

import gymnasium

from .token_mdp import Example, TeacherClient, TokenMDPBatch, TokenMDPEnv

if "tw_rl/TokenMDP-v0" not in gymnasium.registry:
    gymnasium.register(id="tw_rl/TokenMDP-v0", entry_point="tw_rl.default_env:make_default_env")

__all__ = ["Example", "TeacherClient", "TokenMDPBatch", "TokenMDPEnv"]
