"""Gymnasium environments of tw-rl. Importing this package registers ``tw_rl/TokenMDP-v0``."""

import gymnasium

from envs.token_mdp import Example, TeacherClient, TokenMDPBatch, TokenMDPEnv

if "tw_rl/TokenMDP-v0" not in gymnasium.registry:
    gymnasium.register(id="tw_rl/TokenMDP-v0", entry_point="envs.default:make_default_env")

__all__ = ["Example", "TeacherClient", "TokenMDPBatch", "TokenMDPEnv"]
