"""tw-rl: Knowledge Distillation with Training Wheels on Ray.

``tw_rl.load(run_dir)`` returns a :class:`tw_rl.api.TrainedModel` (``.generate(texts, budget=0.2)``); it is
imported on first use so that ``import tw_rl`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {"load": "tw_rl.api", "TrainedModel": "tw_rl.api", "Generation": "tw_rl.api", "InputError": "tw_rl.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tw_rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
