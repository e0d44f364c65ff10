"""The trials of ``tw-rl sweep`` on Ray Tune: one Tune trial per trial description, each in a placement group
sized for its driver and the Ray actors that driver starts.

What a trial does is the caller's (:func:`tw_rl.sweep.sweep` passes the ordinary driver): the wing runs it and
records what it returns, so it never imports ``tw_rl.train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ray import tune

from tw_rl.config import Config
from tw_rl.distributed.cluster import init_ray


def trial_bundles(cfg: Config, cpus_per_trial: float) -> list[dict[str, float]]:
    """A trial's placement group: ``cpus_per_trial`` CPUs for its driver, plus, when ``rollout.num_workers > 0``,
    one bundle per teacher replica and rollout worker of ``cfg`` (the driver's Ray actors are placed in it)."""
    bundles = [{"CPU": cpus_per_trial}]
    if cfg.rollout.num_workers > 0:
        bundles += ([{"CPU": cfg.teacher.num_cpus, "GPU": cfg.teacher.num_gpus}] * cfg.teacher.num_replicas
                    + [{"CPU": cfg.rollout.num_cpus, "GPU": cfg.rollout.num_gpus}] * cfg.rollout.num_workers)
    return [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]


def run_trials(trial_fn: Callable[[dict[str, Any]], dict[str, float]], trials: Sequence[dict[str, Any]],
               bundles: list[dict[str, float]], storage: Path, max_concurrent: int | None = None) -> None:
    """``trial_fn(trial)`` for every trial description (a dict with a ``"name"``) as one Tune trial (a grid over
    the whole descriptions) in a placement group of ``bundles``; Tune records the metrics each call returns, under
    ``storage/sweep``. A failing trial does not stop the others. ``trial_fn`` must be importable by name (Tune
    pickles it into its worker processes)."""

    def trainable(param: dict[str, Any]) -> None:
        tune.report(trial_fn(param["trial"]))

    init_ray()
    tuner = tune.Tuner(
        tune.with_resources(trainable, tune.PlacementGroupFactory(bundles)),
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                    trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: f"{t.trial_id}_{t.config['trial']['name']}"[:120]),
        run_config=tune.RunConfig(name="sweep", storage_path=str(storage), verbose=1,
                                  failure_config=tune.FailureConfig(fail_fast=False)),
    )
    tuner.fit()
