"""Ray-on-CPU integration: the teacher actor (dynamic batching), remote teacher client, rollout group with restarts;
and the wing's boundary (no Ray outside ``tw_rl/distributed/``). The plain server: tests/test_teacher_server.py.

One local Ray (2 CPUs) for the whole module. Models are the toy ones of conftest.py, saved to a temporary directory
and loaded inside the actors.
"""

import ast
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from tests.conftest import tiny_t5
from tests.listeners import descendants, is_loopback, listeners as tcp_listeners
from tw_rl.config import Config, RolloutConfig, TeacherConfig
from tests.test_teacher_server import requests
from tw_rl.distributed.rollout import RolloutGroup
from tw_rl.distributed.teacher import RemoteTeacher, TeacherActor, start_teacher
from tw_rl.models.student import Student

MAX_LEN = 8
BUDGETS = [0.0, 0.2, 0.5]


@pytest.fixture(scope="module")
def teacher_dir(toy, tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    toy["teacher"].model.save_pretrained(d, safe_serialization=True)
    return str(d)


# ---------------------------------------------------------------------------------------------------------------
# the teacher actor
# ---------------------------------------------------------------------------------------------------------------
def test_teacher_actor_equals_plain_teacher(ray_cluster, toy, teacher_dir):
    client = start_teacher(TeacherConfig(num_cpus=0.5, max_wait_ms=0.0), teacher_dir, vocab_size=toy["V"])
    (src, prefixes), = requests(toy, 1, seed=2)
    # same tokens; log-probs equal up to float summation order (the actor runs 1 torch thread, this process 2)
    w, lp = client.next_tokens(src, prefixes)
    w0, lp0 = toy["teacher"].next_tokens(src, prefixes)
    assert w == w0
    np.testing.assert_allclose(lp, lp0, rtol=0, atol=1e-5)
    outputs = [p + [toy["eos"]] for p in prefixes]
    for a, b in zip(client.score(src, outputs), toy["teacher"].score(src, outputs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(client.distributions(src, outputs), toy["teacher"].distributions(src, outputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert client.score([], []) == []
    ray.kill(client.handles[0], no_restart=True)


def test_concurrent_requests_are_batched_and_routed_back(ray_cluster, toy, teacher_dir):
    actor = TeacherActor.options(num_cpus=0.5).remote(teacher_dir, toy["V"], max_batch_size=64, max_wait_ms=50,
                                                      num_threads=1)
    reqs = requests(toy, 8, seed=3)
    refs = [actor.next_tokens.remote(s, p) for s, p in reqs]  # 8 callers at once
    results = ray.get(refs)
    for (s, p), (w, lp) in zip(reqs, results):
        w0, lp0 = toy["teacher"].next_tokens(s, p)
        assert w == w0 and len(w) == len(p)
        np.testing.assert_allclose(lp, lp0, atol=1e-5)
    # the same from several threads (several rollout workers' clients), with scores
    client = RemoteTeacher([actor])
    got = [None] * 8

    def call(i):
        s, p = reqs[i]
        got[i] = client.score(s, [x + [1] for x in p])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for (s, p), g in zip(reqs, got):
        want = toy["teacher"].score(s, [x + [1] for x in p])
        assert len(g) == len(want)
        for a, b in zip(g, want):
            np.testing.assert_allclose(a, b, atol=1e-5)
    st = client.stats()[0]
    assert st.next_tokens.requests == 8 and st.next_tokens.rows == sum(len(p) for _, p in reqs)
    assert st.next_tokens.mean_batch_requests > 1, st
    assert st.score.requests == 8 and st.score.mean_batch_requests > 1, st
    ray.kill(actor, no_restart=True)


def test_max_batch_size_caps_a_batch(ray_cluster, toy):
    actor = TeacherActor.options(num_cpus=0.5).remote(teacher=toy["teacher"], max_batch_size=4, max_wait_ms=200)
    reqs = [([toy["examples"][0].teacher_src] * 2, [[3], [4, 5]]) for _ in range(6)]
    ray.get([actor.next_tokens.remote(s, p) for s, p in reqs])
    st = ray.get(actor.stats.remote()).next_tokens
    assert st.max_batch_rows == 4 and st.batches == 3
    ray.kill(actor, no_restart=True)


# ---------------------------------------------------------------------------------------------------------------
# the rollout group
# ---------------------------------------------------------------------------------------------------------------
def other_student(toy, seed=7):
    base = tiny_t5(toy["V"], seed=seed)
    base.resize_token_embeddings(toy["V"] + 1)
    return Student(base, tau_id=toy["V"]).eval()


def test_rollout_group_samples_restarts_and_versions(ray_cluster, toy, teacher_dir):
    run_cfg = Config(seed=0, budgets=BUDGETS,
                     rollout=RolloutConfig(num_workers=2, envs_per_worker=16, num_cpus=0.5, temperature=1.0),
                     teacher=TeacherConfig(num_cpus=0.5, max_wait_ms=5.0))
    run_cfg.data.max_tgt_tokens = MAX_LEN
    cfg = run_cfg.rollout
    group = RolloutGroup.from_config(run_cfg, toy["student"], teacher_dir, toy["examples"], toy["teacher"])
    assert not group.local and group.num_workers == 2
    new = other_student(toy)
    eps, st = group.sample(new.state_dict(), version=1)
    assert len(eps) == 32 and st.episodes == 32 and st.tokens == sum(len(e) for e in eps)
    assert sorted(w.worker_index for w in st.workers) == [0, 1]
    assert {e.policy_version for e in eps} == {1} and st.stale_episodes == 0 and st.restarts == 0
    assert st.teacher_calls == sum(int(e.teacher_mask.sum()) for e in eps) > 0
    # the workers act with the weights sent: their episodes equal a local group's with the same seeds
    local = RolloutGroup(toy["student"], toy["teacher"], toy["examples"], BUDGETS, cfg, max_len=MAX_LEN,
                         eos_id=toy["eos"], seed=0, local=True)
    leps, lst = local.sample(new.state_dict(), version=1)
    assert [e.src_ids.tolist() for e in leps] == [e.src_ids.tolist() for e in eps]
    assert lst.restarts == 0 and {e.policy_version for e in leps} == {1}

    # kill worker 1 while a sample is in flight: the group re-sends the weights and the sample
    ref = ray.put(toy["student"].state_dict())  # one put per iteration
    killer = threading.Timer(0.05, lambda: ray.kill(group.workers[1], no_restart=False))
    killer.start()
    eps2, st2 = group.sample(ref, version=2, n_per_worker=64)
    killer.join()
    eps3, st3 = group.sample(ref, version=3)
    assert len(eps2) == 128 and len(eps3) == 32
    assert st2.restarts + st3.restarts == 1 == group.restarts_total == st3.restarts_total
    assert {e.policy_version for e in eps2} == {2} and {e.policy_version for e in eps3} == {3}
    assert st2.stale_episodes == st3.stale_episodes == 0
    assert sorted(w.worker_index for w in st3.workers) == [0, 1]
    # a restarted worker without new weights this call produces stale episodes, and they are counted
    first = ray.get(group.workers[0].identity.remote())[1]
    ray.kill(group.workers[0], no_restart=False)
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until Ray has restarted it (a new instance answers)
        try:
            if ray.get(group.workers[0].identity.remote(), timeout=5)[1] != first:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    eps4, st4 = group.sample(None, version=3, n_per_worker=4)
    assert st4.restarts == 1 and st4.reissued == 0 and len(eps4) == 8
    assert st4.stale_episodes == 4 and {e.policy_version for e in eps4} == {0, 3}
    eps5, st5 = group.sample(None, version=3, n_per_worker=4)  # the group re-sent the weights afterwards
    assert st5.stale_episodes == 0 and st5.restarts == 0
    assert st.as_metrics()["rollout/episodes"] == 32
    teacher_actor = group._owned_teacher.handles[0]
    group.close()
    # close() stopped the teacher it started; ray.kill is asynchronous, so a call sent at once may still be served
    deadline = time.time() + 30
    while True:
        try:
            ray.get(teacher_actor.stats.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        except ray.exceptions.GetTimeoutError:
            pass
        assert time.time() < deadline, "the teacher actor still answers 30 s after close()"
        time.sleep(0.1)


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_sigkilled_teacher_and_rollout_worker_mid_sample_are_survived(ray_cluster, toy, teacher_dir):
    """Phase 2's sampling while the teacher replica and then a rollout worker are SIGKILLed (their processes, not
    ray.kill): Ray restarts both, the teacher's in-flight calls are re-sent, the worker's sample is re-issued, and
    every episode comes back, counted in teacher/restarts and rollout/restarts."""
    run_cfg = Config(seed=0, budgets=BUDGETS,
                     rollout=RolloutConfig(num_workers=2, envs_per_worker=16, num_cpus=0.5, temperature=1.0),
                     teacher=TeacherConfig(num_cpus=0.5, max_wait_ms=5.0))
    run_cfg.data.max_tgt_tokens = MAX_LEN
    group = RolloutGroup.from_config(run_cfg, toy["student"], teacher_dir, toy["examples"], toy["teacher"])
    try:
        teacher = group._owned_teacher.handles[0]
        eps, st = group.sample(toy["student"].state_dict(), version=1)
        assert st.teacher_restarts == 0 and st.teacher_calls > 0
        for victim in (teacher, group.workers[1]):
            pid = _pid(victim)
            killer = threading.Timer(0.1, lambda: os.kill(pid, signal.SIGKILL))
            killer.start()
            # long enough that the kill at 0.1 s lands mid-call (128 rows a worker took 0.08 s at times: the
            # kill then came after the sample and nothing was restarted)
            eps2, st2 = group.sample(None, version=1, n_per_worker=1024)
            killer.join()
            assert len(eps2) == 2048 and all(len(e) > 0 for e in eps2)
            if victim is not teacher:
                group._wait_until_alive(1)
            assert _pid(victim) != pid  # a new process
            if victim is teacher:
                eps3, st3 = group.sample(None, version=1)  # a restart seen after the call counts at the next
                assert st2.teacher_restarts + st3.teacher_restarts == 1 == st3.teacher_restarts_total
                assert st3.as_metrics()["teacher/restarts_total"] == 1
            else:
                assert st2.restarts == 1 and st2.reissued == 1 and st2.as_metrics()["rollout/restarts"] == 1
    finally:
        group.close()


def test_oversized_config_fails_fast(ray_cluster, toy):
    cfg = Config(rollout=RolloutConfig(num_workers=4, num_cpus=0.5), teacher=TeacherConfig(num_cpus=1.0))
    with pytest.raises(ValueError, match="need 3 CPUs but Ray has 2"):
        RolloutGroup.from_config(cfg, toy["student"], None, toy["examples"], toy["teacher"])


def test_from_config_local_mode_uses_no_ray(toy):
    cfg = Config(seed=0, budgets=BUDGETS, rollout=RolloutConfig(num_workers=0, envs_per_worker=5))
    cfg.data.max_tgt_tokens = MAX_LEN
    group = RolloutGroup.from_config(cfg, toy["student"], None, toy["examples"], toy["teacher"])
    assert group.local and group.num_workers == 1 and group.workers[0].teacher is toy["teacher"]
    assert group.workers[0].student is not toy["student"]  # a replica: the caller's module is never loaded into
    eps, st = group.sample(other_student(toy).state_dict(), version=4)
    assert len(eps) == 5 and {e.policy_version for e in eps} == {4} and st.restarts == 0
    assert all(len(e) <= MAX_LEN for e in eps)
    eps2, st2 = group.sample(None, version=4)
    assert st2.stale_episodes == 0 and {e.policy_version for e in eps2} == {4}
    group.close()


def test_call_states_on_ray_equal_a_local_group_and_survive_a_dead_worker(ray_cluster, toy, tmp_path):
    """Phase 2's call learner on Ray rollout actors: the advantages equal a local group's for the same weights and
    inputs, and a worker killed mid-call is restarted and its share sent again."""
    from tests.test_refit import _mixed_caller, _other_teacher

    gate, teacher = _mixed_caller(), _other_teacher()  # calls at some states; the teacher's tokens vary
    teacher.model.save_pretrained(tmp_path, safe_serialization=True)
    teacher_dir = str(tmp_path)
    run_cfg = Config(seed=0, budgets=BUDGETS, rollout=RolloutConfig(num_workers=2, num_cpus=0.5),
                     teacher=TeacherConfig(num_cpus=0.5, max_wait_ms=5.0))
    run_cfg.data.max_tgt_tokens = MAX_LEN
    group = RolloutGroup.from_config(run_cfg, gate, teacher_dir, toy["examples"], teacher)
    local = RolloutGroup(gate, teacher, toy["examples"], BUDGETS, run_cfg.rollout, max_len=MAX_LEN,
                         eos_id=toy["eos"], seed=0, local=True)
    idx = list(range(len(toy["examples"])))
    try:
        remote = group.call_states(gate.state_dict(), version=1, indices=idx)
        killer = threading.Timer(0.05, lambda: ray.kill(group.workers[1], no_restart=False))
        killer.start()
        again = group.call_states(None, version=1, indices=idx * 8)
        killer.join()
        assert group.restarts_total == 1 and len(again) > len(remote)
        after = group.call_states(None, version=1, indices=idx)  # the restarted worker got the weights again
    finally:
        group.close()
    want = local.call_states(gate.state_dict(), version=1, indices=idx)
    for states in (remote, after):
        assert states.calls == want.calls and 0 < want.calls < len(want)
        torch.testing.assert_close(states.x, want.x)
        torch.testing.assert_close(states.target, want.target, atol=1e-4, rtol=1e-4)
    assert float(want.target.abs().max()) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# the local Ray: loopback only, token authentication set explicitly
# ---------------------------------------------------------------------------------------------------------------
def test_local_ray_listens_on_loopback_only_and_requires_a_token(ray_cluster, toy):
    actor = TeacherActor.options(num_cpus=0.5).remote(teacher=toy["teacher"])
    ray.get(actor.stats.remote())  # a worker process is up (its core worker listens too)
    listeners = tcp_listeners(descendants(os.getpid()))
    names = " ".join(n for _, n in listeners)
    if "gcs_server" not in names or "raylet" not in names:  # ss shows no owner for sockets it may not inspect
        pytest.skip(f"`ss -ltnp` did not attribute Ray's sockets to its processes: {listeners}")
    assert len(listeners) >= 4, listeners
    outside = [(a, n) for a, n in listeners if not is_loopback(a)]
    assert not outside, f"the local Ray listens beyond loopback: {outside}"
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ["RAY_AUTH_MODE"] == "token" and get_authentication_mode() == AuthenticationMode.TOKEN
    assert len(os.environ.get("RAY_AUTH_TOKEN", "")) >= 32 or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ray.kill(actor, no_restart=True)


# ---------------------------------------------------------------------------------------------------------------
# the wing's boundary: every use of Ray lives in tw_rl/distributed/
# ---------------------------------------------------------------------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    """Every absolute module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_ray_is_imported_only_inside_the_wing_and_algos_import_neither():
    root = Path(__file__).resolve().parents[1]
    wing = root / "tw_rl" / "distributed"
    found: dict[str, set[str]] = {}
    for f in sorted([*(root / "tw_rl").rglob("*.py"), *(root / "envs").rglob("*.py")]):
        if wing in f.parents:
            continue
        mods = _imported_modules(f)
        bad = {m for m in mods if m == "ray" or m.startswith("ray.")}
        if root / "tw_rl" / "algos" in f.parents:
            bad |= {m for m in mods if m == "tw_rl.distributed" or m.startswith("tw_rl.distributed.")}
        if bad:
            found[str(f.relative_to(root))] = bad
    assert not found, found
    inside = {f.name for f in wing.glob("*.py") if any(m.split(".")[0] == "ray" for m in _imported_modules(f))}
    assert inside >= {"cluster.py", "teacher.py", "rollout.py", "data_parallel.py", "rllib_ppo.py", "tune.py"}
