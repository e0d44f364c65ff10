"""Launching on Ray: a local head bound to 127.0.0.1 with token authentication on, the smoke training run submitted
with ``ray job submit`` (the command ``tw-rl submit`` runs), the run directory it wrote; the cluster launcher file
against Ray's own schema.

The head gets its own session directory and free ports (so it never meets another Ray on this machine) and is
started with ``--block`` in its own process group, which teardown stops — never ``ray stop``, which would stop every
Ray of this user on the machine. Every wait has a deadline.
"""

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tw_rl.config import load_config
from tests.listeners import descendants, is_loopback, listeners
from tw_rl.distributed.launch import LOOPBACK, free_port, head_command, head_env, private_token_file, submit_command

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 420
HEAD_TIMEOUT_S = 90


# ---------------------------------------------------------------------------------------------------------------
# a local head
# ---------------------------------------------------------------------------------------------------------------
def _our_processes(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (our head's unique session directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _run(cmd, env, timeout=60, **kw):
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="twrl-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env = head_env(LOOPBACK, env)  # what `tw-rl head` runs ray start with
    dashboard_port = free_port()
    ports = {name: free_port() for name in ("ray-client-server-port", "node-manager-port", "object-manager-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port")}
    cmd = head_command(num_cpus=2, port=free_port(), dashboard_port=dashboard_port, temp_dir=temp_dir, ports=ports,
                       block=True, ray=RAY)
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://{LOOPBACK}:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {(Path(temp_dir) / 'head.log').read_text()}")
            try:
                if _run([RAY, "job", "list", f"--address={address}"], env, timeout=30).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the head did not answer within {HEAD_TIMEOUT_S} s: "
                            f"{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "token": token, "cmd": cmd, "temp_dir": temp_dir, "pid": proc.pid}
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):  # ray start --block outlives SIGTERM
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 20
        while (left := _our_processes(temp_dir)) and time.monotonic() < deadline:
            for pid in left:  # daemons of this head that left the process group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_head_listens_on_loopback_only(head):
    cmd = head["cmd"]
    assert f"--dashboard-host={LOOPBACK}" in cmd and f"--node-ip-address={LOOPBACK}" in cmd
    public = head_command(public_dashboard=True)
    assert "--dashboard-host=0.0.0.0" in public  # only when asked for
    # what it says: every service of the head (GCS, raylet, dashboard, agents, workers) bound to loopback
    deadline = time.monotonic() + 30  # the job server answers before the raylet listens
    while True:
        found = listeners(descendants(head["pid"]) | set(_our_processes(head["temp_dir"])))
        names = " ".join(n for _, n in found)
        if ("gcs_server" in names and "raylet" in names) or time.monotonic() > deadline:
            break
        time.sleep(1)
    if "gcs_server" not in names or "raylet" not in names:
        pytest.skip(f"`ss -ltnp` did not attribute the head's sockets to its processes: {found}")
    outside = [(a, n) for a, n in found if not is_loopback(a)]
    assert not outside, f"the head listens beyond loopback: {outside}"


def test_head_env_and_token_file_mode(tmp_path):
    env = head_env(LOOPBACK, {"RAY_AUTH_TOKEN": "x" * 64})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in head_env("10.0.0.5", {"RAY_AUTH_TOKEN": "x" * 64})
    token = tmp_path / "auth_token"
    token.write_text("y" * 64)
    token.chmod(0o644)  # as ray.init writes ~/.ray/auth_token
    assert private_token_file({"RAY_AUTH_TOKEN_PATH": str(token)}) == token
    assert token.stat().st_mode & 0o777 == 0o600
    assert private_token_file({"RAY_AUTH_TOKEN": "z" * 64}) is None


def test_client_without_the_token_is_refused(head):
    env = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # a wrong token
    r = _run([RAY, "job", "list", f"--address={head['address']}"], env)
    assert r.returncode != 0
    assert "auth" in (r.stdout + r.stderr).lower()


def test_smoke_training_job_succeeds(head, tmp_path):
    out = tmp_path / "smoke-run"  # absolute: the job runs in Ray's copy of the working directory
    sid = f"tw-smoke-{secrets.token_hex(4)}"
    cmd = submit_command("launch/configs/smoke.yaml", [f"out_dir={out}"], address=head["address"],
                         working_dir=".", submission_id=sid, no_wait=True, ray=RAY)
    r = _run(cmd, head["env"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    status, deadline = "", time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        s = _run([RAY, "job", "status", f"--address={head['address']}", sid], head["env"], timeout=60)
        said = (s.stdout + s.stderr).lower()  # "Job 'ID' succeeded" / "failed" / "stopped"
        status = next((w.upper() for w in ("succeeded", "failed", "stopped") if f"' {w}" in said), "")
        if status:
            break
        time.sleep(3)
    logs = _run([RAY, "job", "logs", f"--address={head['address']}", sid], head["env"], timeout=60).stdout
    if not status:
        _run([RAY, "job", "stop", f"--address={head['address']}", sid], head["env"], timeout=60)
    assert status == "SUCCEEDED", f"job {sid}: {status or 'not finished in time'}\n{logs[-4000:]}"

    report = json.loads((out / "report.json").read_text())
    cfg = load_config(REPO / "launch" / "configs" / "smoke.yaml", [f"out_dir={out}"])
    assert [r["budget"] for r in report["tw"]] == cfg.budgets
    assert report["tw"][0]["usage_mean"] == 0.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{cfg.rl.iterations:06d}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phase2 = [r for r in rows if r.get("phase") == "phase2"]
    assert len(phase2) == cfg.rl.iterations
    assert all(r.get("rollout/tokens", 0) > 0 for r in phase2), phase2[0]
    assert (out / "models" / "final").is_dir() and (out / "pretrain.json").is_file()
    assert "report:" in logs


# ---------------------------------------------------------------------------------------------------------------
# the cluster launcher file
# ---------------------------------------------------------------------------------------------------------------
def _validate_cluster(config: dict) -> None:
    """Ray's own checks: defaults of the provider filled in (``prepare_config``), then ``validate_config`` (the
    ray-schema.json shipped with Ray, plus its cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    _validate_cluster(cluster)
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu_types = [t for t, v in types.items() if v.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker type for the teacher replicas and the learner"
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds
    assert "RAY_AUTH_MODE=token" in head_cmds
    assert any("pip install" in c for c in cluster["setup_commands"])


@pytest.mark.parametrize("breakage", ["unknown_top_key", "wrong_type", "head_type_missing", "min_over_max"])
def test_a_broken_cluster_yaml_fails(cluster, breakage):
    import jsonschema

    bad = copy.deepcopy(cluster)
    if breakage == "unknown_top_key":
        bad["max_wrokers"] = 3
    elif breakage == "wrong_type":
        bad["max_workers"] = "many"
    elif breakage == "head_type_missing":
        bad["head_node_type"] = "no.such.type"
    else:
        bad["max_workers"] = 0
        next(iter(t for t in bad["available_node_types"].values() if "min_workers" in t))["min_workers"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_cluster(bad)


# ---------------------------------------------------------------------------------------------------------------
# the commands, without Ray
# ---------------------------------------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tw_rl.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **(env or {})})


def test_tw_rl_head_binds_loopback_unless_told():
    r = _cli("head", "--num-cpus", "2", "--print")
    assert r.returncode == 0, r.stderr
    assert "--dashboard-host=127.0.0.1" in r.stdout and "--node-ip-address=127.0.0.1" in r.stdout
    r = _cli("head", "--public-dashboard", "--print")
    assert "--dashboard-host=0.0.0.0" in r.stdout and "warning" in r.stderr


def test_tw_rl_submit_builds_ray_job_submit():
    r = _cli("submit", "--print", "--address", "http://127.0.0.1:1234", "--env", "HF_HOME=/data/hf",
             "--config", "launch/configs/wmt19_flan_t5.yaml", "out_dir=/tmp/x", "rl.iterations=3")
    assert r.returncode == 0, r.stderr
    import shlex

    argv = shlex.split(r.stdout.strip())
    assert argv[1:3] == ["job", "submit"] and "--address=http://127.0.0.1:1234" in argv
    assert "--working-dir=." in argv and "--entrypoint-num-gpus=1" in argv and "--entrypoint-num-cpus=8" in argv
    renv = json.loads(next(a for a in argv if a.startswith("--runtime-env-json=")).split("=", 1)[1])
    assert renv["env_vars"]["HF_HOME"] == "/data/hf" and "runs/" in renv["excludes"]
    assert argv[argv.index("--"):] == ["--", "tw-rl", "train", "--config", "launch/configs/wmt19_flan_t5.yaml",
                                       "out_dir=/tmp/x", "rl.iterations=3"]
    bad = _cli("submit", "--print", "--config", "launch/configs/smoke.yaml", "rl.iterationz=3")
    assert bad.returncode == 2 and "iterationz" in bad.stderr  # checked here, not on the cluster
