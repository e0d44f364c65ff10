"""tw-rl: Knowledge Distillation with Training Wheels on Ray.

``tw_rl.load(run_dir)`` returns a :class:`tw_rl.api.TrainedModel` (``.generate(texts, budget=0.2)``); it is
imported on first use so that ``import tw_rl`` stays light.
"""
__version__ = "0.1.0"


def _find_envs_in_checkout() -> None:
    """``tw_rl.envs`` is the repository's top-level ``envs/`` folder (the project's layout). A wheel installs it as
    ``tw_rl/envs`` and an editable install maps it (pyproject's package-dir); a plain checkout on ``sys.path``
    (the tests, a Ray job's working directory) needs this finder, which maps that one name and nothing else."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folder = here.parent / "envs"
    if (here / "envs").is_dir() or not (folder / "token_mdp.py").is_file():
        return  # installed (tw_rl/envs exists), or not a checkout

    class _EnvsFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "tw_rl.envs":
                return None
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_EnvsFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _EnvsFinder())  # first: a checkout pairs with its own envs/


_find_envs_in_checkout()

_LAZY = {"load": "tw_rl.api", "TrainedModel": "tw_rl.api", "Generation": "tw_rl.api", "InputError": "tw_rl.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tw_rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
