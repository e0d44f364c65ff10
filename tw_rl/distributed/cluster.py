"""The Ray this process runs on: a private local Ray bound to this machine, or the cluster named by ``RAY_ADDRESS``.

- :func:`init_ray` / :func:`shutdown_ray` — a local Ray that listens on 127.0.0.1 only and requires a token
  (:func:`local_auth_env`), or a connection to ``RAY_ADDRESS``.
- :func:`check_resources` / :func:`shortfall` — refuse (instead of waiting forever) actors a local Ray cannot place.
"""

from __future__ import annotations

import os
import secrets
import warnings
from typing import Any

import ray

from tw_rl.config import Config

LOOPBACK = "127.0.0.1"
# Ray resolves a node address of 127.0.0.1 to the machine's external address (ray._private.services.
# resolve_ip_for_localhost) unless multi-node clusters are off; with the external address its gRPC servers (GCS,
# raylet, core workers, agents) listen on every interface. Off, every server binds 127.0.0.1 (measured with Ray
# 2.60: tests/test_distributed.py lists the listeners). Read by ray_constants at import time and by every process
# Ray starts, hence both the environment variable and the attribute below.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_restore: dict[str, Any] = {}


def local_auth_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The authentication settings of a local (private) Ray, set in ``env`` (default ``os.environ``) and returned.

    Token authentication is set explicitly (``RAY_AUTH_MODE=token``) rather than relied on as Ray's default (Ray
    2.52–2.59 default to no authentication). Unless a token is given (``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH``), the token is a random one held in this process's environment only — inherited by
    the processes Ray starts, written to no file (a ``ray.init()`` without one writes ``~/.ray/auth_token``, mode
    0644). One token per process: Ray's token loader caches it, so a second local Ray in this process reuses it.
    An explicit ``RAY_AUTH_MODE=disabled`` is the user's choice: respected, with a warning.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        warnings.warn("RAY_AUTH_MODE=disabled: the local Ray accepts any client on this machine", stacklevel=2)
        return dict(env)
    changed = env.get("RAY_AUTH_MODE") != "token"
    env["RAY_AUTH_MODE"] = "token"
    if not env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH"):
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        changed = True
    if changed and env is os.environ:  # this process's Ray may have read the old settings already: re-read them
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig  # noqa: PLC0415 (private)

        RayConfig.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return dict(env)


def init_ray(num_cpus: float | None = None, *, object_store_memory: int | None = None, **kwargs: Any) -> None:
    """Start a local Ray on this machine only (or connect to ``RAY_ADDRESS`` when set). Idempotent.

    ``address="local"`` starts a new instance even if another Ray runs on the machine (never joins it by
    accident). The local Ray listens on 127.0.0.1 only (GCS, raylet, workers, agents; the dashboard is off) and
    requires a token (:func:`local_auth_env`). Usage statistics are off.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster started with `ray start` (and its auth token in the environment)
        ray.init(address=address, **kwargs)
        return
    from ray._private import ray_constants  # noqa: PLC0415 (private: see _SINGLE_MACHINE_ENV)

    local_auth_env()
    _restore.update(env=os.environ.get(_SINGLE_MACHINE_ENV), cluster=ray_constants.ENABLE_RAY_CLUSTER)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_memory, _node_ip_address=LOOPBACK, **kwargs)
    except BaseException:
        _undo_single_machine()
        raise


def _undo_single_machine() -> None:
    """After a local Ray: connecting to a cluster later must find this machine's real address again."""
    if not _restore:
        return
    from ray._private import ray_constants  # noqa: PLC0415

    ray_constants.ENABLE_RAY_CLUSTER = _restore["cluster"]
    if _restore["env"] is None:
        os.environ.pop(_SINGLE_MACHINE_ENV, None)
    else:
        os.environ[_SINGLE_MACHINE_ENV] = _restore["env"]
    _restore.clear()


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
    _undo_single_machine()


def shortfall(need: dict[str, float]) -> tuple[str, float, float] | None:
    """The first resource kind (``"CPU"``, ``"GPU"``, in ``need``'s order) of which ``need`` asks more than the
    local Ray has, as ``(kind, need, have)``; None when everything fits, or on a ``RAY_ADDRESS`` cluster (which may
    scale up)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    total = ray.cluster_resources()
    for kind, n in need.items():
        if n > total.get(kind, 0.0) + 1e-9:
            return kind, n, total.get(kind, 0.0)
    return None


def check_resources(cfg: Config) -> None:
    """Raise (instead of waiting forever) when the teacher replicas, rollout workers and data-parallel learner
    workers of ``cfg`` need more CPUs or GPUs than the local Ray has. Skipped on a ``RAY_ADDRESS`` cluster."""
    keys = {"CPU": "num_cpus", "GPU": "num_gpus"}
    per_learner = {"CPU": cfg.learner.worker_num_cpus, "GPU": float(cfg.learner.use_gpu)}
    need = {kind: (cfg.teacher.num_replicas * getattr(cfg.teacher, key)
                   + cfg.rollout.num_workers * getattr(cfg.rollout, key)
                   + cfg.learner.num_workers * per_learner[kind])  # the data-parallel learner's actors
            for kind, key in keys.items()}
    short = shortfall(need)
    if short is None:
        return
    kind, n, have = short
    key = keys[kind]
    raise ValueError(
        f"the teacher ({cfg.teacher.num_replicas} × teacher.{key}={getattr(cfg.teacher, key)}), rollout "
        f"workers ({cfg.rollout.num_workers} × rollout.{key}={getattr(cfg.rollout, key)}) and learner "
        f"workers ({cfg.learner.num_workers} × {per_learner[kind]:g}) need {n:g} "
        f"{kind}s but Ray has {have:g}; lower rollout.num_workers, rollout.{key}, teacher.{key} or "
        f"learner.num_workers (fractions are allowed), or use rollout.num_workers=0 for local mode")
