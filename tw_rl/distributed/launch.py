"""Launching on Ray: a head node bound to loopback, training submitted as a Ray job.

``tw-rl head`` builds (and runs) ``ray start --head`` and ``tw-rl submit`` builds (and runs) ``ray job submit``;
both are thin wrappers whose command lines come from :func:`head_command` and :func:`submit_command`, which the
tests run too.

Why loopback by default: the Ray dashboard's job server (port 8265) accepts a job — that is, arbitrary code to run
on the cluster — from anyone who can reach it. Ray 2.60's token authentication refuses clients without the token,
but a token can leak and the dashboard has had unauthenticated endpoints before, so the job server stays on
127.0.0.1 and is reached through SSH (``ray dashboard cluster.yaml`` or ``ssh -L 8265:127.0.0.1:8265 HEAD``).
``--public-dashboard`` binds it to 0.0.0.0, for a private network you control.

Token authentication: the head is started with ``RAY_AUTH_MODE=token``. The token is ``RAY_AUTH_TOKEN`` (or the
file ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``); :func:`auth_env` creates ``~/.ray/auth_token`` when none
exists. Clients (``ray job submit``, ``ray status``) need the same token in their environment or home directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

SHIPPED = "shipped"  # runtime_env=SHIPPED: launch/runtime_env.yaml as shipped (tw_rl.resources.runtime_env_file)
LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_GCS_PORT = 6379


# --------------------------------------------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------------------------------------------
def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def has_token(env: Mapping[str, str]) -> bool:
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else default_token_path().is_file()


def auth_env(env: Mapping[str, str] | None = None, *, create: bool = True) -> dict[str, str]:
    """``env`` (default: this process's environment) with token authentication on (``RAY_AUTH_MODE=token``).

    If no token is given (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``create``, a
    random one is written to ``~/.ray/auth_token`` (mode 600), as ``ray get-auth-token --generate`` would.
    ``RAY_AUTH_MODE=disabled`` in ``env`` is respected (with a warning): it is the user's explicit choice.
    """
    out = dict(os.environ if env is None else env)
    if out.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("warning: RAY_AUTH_MODE=disabled: anyone who can reach the cluster's ports can run code on it",
              file=sys.stderr)
        return out
    out["RAY_AUTH_MODE"] = "token"
    if not has_token(out):
        if not create:
            raise RuntimeError("token authentication is on but there is no token: set RAY_AUTH_TOKEN, or "
                               "RAY_AUTH_TOKEN_PATH, or create ~/.ray/auth_token (`ray get-auth-token --generate`)")
        path = default_token_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        print(f"created a Ray authentication token in {path}; clients of this cluster need it", file=sys.stderr)
    private_token_file(out)
    return out


def private_token_file(env: Mapping[str, str]) -> Path | None:
    """Make the token file ``env`` names (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` when no
    ``RAY_AUTH_TOKEN`` is given) readable by its owner only (mode 0600; ``ray.init`` writes it 0644). Returns the
    file, or None when the token is not read from a file."""
    if env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else default_token_path()
    if not path.is_file():
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(0o600)
        except PermissionError as e:
            raise RuntimeError(f"the Ray token file {path} has mode {mode:o} (others can read it) and cannot be "
                               f"made private: {e}; run `chmod 600 {path}`") from None
        print(f"made the Ray token file {path} private (mode {mode:o} → 600)", file=sys.stderr)
    return path


def single_machine(node_ip_address: str) -> bool:
    """A head whose services advertise a loopback address serves this machine only."""
    import ipaddress

    try:
        return node_ip_address == "localhost" or ipaddress.ip_address(node_ip_address).is_loopback
    except ValueError:
        return False


def head_env(node_ip_address: str = LOOPBACK, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``ray start --head``: token authentication (:func:`auth_env`), and for a loopback
    ``node_ip_address`` multi-node mode off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): otherwise Ray rewrites
    127.0.0.1 to the machine's external address and its services listen on every interface (Ray 2.60; with the
    variable every service binds 127.0.0.1, ``tests/test_launch.py`` lists them)."""
    out = auth_env(env)
    if single_machine(node_ip_address):
        out["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return out


# --------------------------------------------------------------------------------------------------------------
# the head node
# --------------------------------------------------------------------------------------------------------------
def head_command(*, num_cpus: float | None = None, num_gpus: float | None = None,
                 node_ip_address: str = LOOPBACK, public_dashboard: bool = False,
                 port: int = DEFAULT_GCS_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT,
                 temp_dir: str | Path | None = None, ports: Mapping[str, int] | None = None,
                 block: bool = False, ray: str = "ray") -> list[str]:
    """The ``ray start --head`` command line.

    The dashboard and job server listen on 127.0.0.1 unless ``public_dashboard`` (then 0.0.0.0).
    ``node_ip_address`` is the address Ray's own services advertise (127.0.0.1: a single machine; a private
    address when workers are to join). ``ports`` sets further Ray ports by option name without the dashes,
    e.g. ``{"ray-client-server-port": 10001}`` (so that two heads on one machine do not collide).
    """
    cmd = [ray, "start", "--head", f"--port={port}", f"--node-ip-address={node_ip_address}",
           f"--dashboard-host={'0.0.0.0' if public_dashboard else LOOPBACK}", f"--dashboard-port={dashboard_port}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus:g}")
    if temp_dir is not None:
        cmd.append(f"--temp-dir={temp_dir}")
    for name, value in (ports or {}).items():
        cmd.append(f"--{name}={value}")
    if block:
        cmd.append("--block")
    return cmd


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (for tests and for heads that must not collide)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------------------
def load_runtime_env(path: str | Path | None = SHIPPED, env_vars: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """The runtime environment of a training job: ``path`` (YAML; ``SHIPPED``: the one tw-rl ships, in a checkout
    ``launch/runtime_env.yaml``; None: none) with ``env_vars`` added."""
    import yaml

    if path == SHIPPED:
        from tw_rl.resources import runtime_env_file

        path = runtime_env_file()

    renv: dict[str, Any] = {}
    if path is not None:
        renv = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(renv, dict):
            raise ValueError(f"{path}: a runtime_env file holds a mapping, e.g. env_vars: {{...}}")
    if env_vars:
        renv["env_vars"] = {**(renv.get("env_vars") or {}), **{k: str(v) for k, v in env_vars.items()}}
    return renv


def submit_command(config: str | Path, overrides: Sequence[str] = (), *, address: str | None = None,
                   working_dir: str | Path = ".", runtime_env: str | Path | None = SHIPPED,
                   env_vars: Mapping[str, str] | None = None, submission_id: str | None = None,
                   no_wait: bool = False, entrypoint_num_cpus: float | None = None,
                   entrypoint_num_gpus: float | None = None, ray: str = "ray", resume: bool = False) -> list[str]:
    """``ray job submit ... -- tw-rl train --config CONFIG OVERRIDES``.

    ``address``: the job server (default ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS`` or http://127.0.0.1:8265).
    ``config`` is relative to ``working_dir`` (it travels with it). The entrypoint reserves
    ``entrypoint_num_cpus`` / ``entrypoint_num_gpus``: the job's driver holds the learner (``learner.*``).
    """
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
               or f"http://{LOOPBACK}:{DEFAULT_DASHBOARD_PORT}")
    cmd = [ray, "job", "submit", f"--address={address}", f"--working-dir={working_dir}",
           f"--runtime-env-json={json.dumps(load_runtime_env(runtime_env, env_vars))}"]
    if submission_id:
        cmd.append(f"--submission-id={submission_id}")
    if entrypoint_num_cpus:
        cmd.append(f"--entrypoint-num-cpus={entrypoint_num_cpus:g}")
    if entrypoint_num_gpus:
        cmd.append(f"--entrypoint-num-gpus={entrypoint_num_gpus:g}")
    if no_wait:
        cmd.append("--no-wait")
    cmd += ["--", "tw-rl", "train", "--config", str(config), *(["--resume"] if resume else []), *overrides]
    return cmd


def ray_executable() -> str:
    """The ``ray`` next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.is_file() else "ray"


# --------------------------------------------------------------------------------------------------------------
# the CLI (tw-rl head / tw-rl submit)
# --------------------------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    h = ("start a Ray head on this machine with token authentication, its dashboard and job server on 127.0.0.1 "
         "(reach them through SSH; --public-dashboard to bind 0.0.0.0); stop it with `ray stop`")
    p = sub.add_parser("head", help=h, description=h)
    p.add_argument("--num-cpus", type=float, help="CPUs the head offers (default: all)")
    p.add_argument("--num-gpus", type=float, help="GPUs the head offers (default: all)")
    p.add_argument("--port", type=int, default=DEFAULT_GCS_PORT, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help="dashboard and job server port (default 8265)")
    p.add_argument("--node-ip-address", default=LOOPBACK, help="the address Ray's services advertise and "
                   "listen on (default 127.0.0.1: this machine only, every Ray service bound to loopback; give a "
                   "private address for workers to join)")
    p.add_argument("--public-dashboard", action="store_true", help="bind the dashboard and job server to 0.0.0.0: "
                   "anyone who reaches the port and has the token can run code on the cluster")
    p.add_argument("--temp-dir", help="Ray's session directory (default /tmp/ray)")
    p.add_argument("--block", action="store_true", help="stay in the foreground; Ctrl-C stops the head")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")

    h = ("submit `tw-rl train --config CONFIG` to a Ray cluster as a job (ray job submit with the working "
         "directory and launch/runtime_env.yaml)")
    p = sub.add_parser("submit", help=h, description=h)
    p.add_argument("--config", required=True, help="YAML config, relative to the working directory")
    p.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, "
                   "RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".", help="directory shipped with the job (default: .; files in "
                   ".gitignore and runtime_env excludes stay behind)")
    p.add_argument("--runtime-env", default=SHIPPED, help="runtime_env YAML (default: the one tw-rl ships, "
                   "launch/runtime_env.yaml in a checkout)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable "
                   "of the job (repeatable)")
    p.add_argument("--submission-id", help="job id (default: generated by Ray)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--resume", action="store_true", help="tw-rl train --resume")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. out_dir=/data/x")


def run_head(args) -> int:
    cmd = head_command(num_cpus=args.num_cpus, num_gpus=args.num_gpus, node_ip_address=args.node_ip_address,
                       public_dashboard=args.public_dashboard, port=args.port, dashboard_port=args.dashboard_port,
                       temp_dir=args.temp_dir, block=args.block, ray=ray_executable())
    if args.public_dashboard:
        print("warning: the dashboard and job server will listen on 0.0.0.0: only do this on a network you "
              "control", file=sys.stderr)
    if args.print:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd, env=head_env(args.node_ip_address))


def run_submit(args) -> int:
    from tw_rl.config import load_config

    cfg_path = Path(args.working_dir) / args.config
    cfg = load_config(cfg_path, args.overrides)  # fail here, not on the cluster
    if not Path(cfg.out_dir).is_absolute():
        print(f"warning: out_dir={cfg.out_dir} is relative: the job runs in Ray's copy of the working directory, "
              f"so the run would land there (and be lost with it); give an absolute out_dir=/path/on/the/cluster",
              file=sys.stderr)
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r} is not KEY=VALUE")
        env_vars[key] = value
    cmd = submit_command(args.config, args.overrides, address=args.address, working_dir=args.working_dir,
                         runtime_env=args.runtime_env, env_vars=env_vars, submission_id=args.submission_id,
                         no_wait=args.no_wait, entrypoint_num_cpus=cfg.learner.num_cpus,
                         entrypoint_num_gpus=cfg.learner.num_gpus, ray=ray_executable(), resume=args.resume)
    if args.print:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd, env=auth_env(create=False))  # the cluster's token, never a new one
