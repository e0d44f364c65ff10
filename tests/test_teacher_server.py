"""The teacher server without Ray: dynamic batching (:class:`DynamicBatcher`) and :class:`TeacherServer` under a
plain asyncio event loop, against the plain :class:`~tw_rl.teacher.Teacher`."""

import asyncio
import copy
import subprocess
import sys
import time

import numpy as np

from tw_rl.teacher_server import DynamicBatcher, TeacherServer


def requests(toy, n, seed=0):
    """``n`` requests of 1–4 rows: (sources, prefixes) with prefixes of varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        ex = [toy["examples"][int(i)] for i in rng.integers(len(toy["examples"]), size=k)]
        out.append(([e.teacher_src for e in ex],
                    [rng.integers(2, toy["V"], size=int(rng.integers(0, 6))).tolist() for _ in ex]))
    return out


def test_batcher_serves_full_batches_at_once_and_splits_results():
    from concurrent.futures import ThreadPoolExecutor

    seen = []

    def fn(src, rows):
        seen.append(len(rows))
        return [s * 100 + r for s, r in zip(src, rows)]

    async def main():
        b = DynamicBatcher(fn, ThreadPoolExecutor(1), max_batch_size=6, max_wait_ms=10_000)
        reqs = [([i] * 2, [1, 2]) for i in range(3)]  # 3 requests × 2 rows = 6 rows: served without waiting
        t0 = time.perf_counter()
        res = await asyncio.gather(*(b.submit(s, r) for s, r in reqs))
        return res, time.perf_counter() - t0, b.stats

    res, dt, stats = asyncio.run(main())
    assert res == [[1, 2], [101, 102], [201, 202]]
    assert seen == [6] and dt < 5 and stats.mean_batch_requests == 3


def test_server_matches_plain_teacher_without_ray(toy):
    async def main():
        server = TeacherServer(teacher=copy.deepcopy(toy["teacher"]), max_batch_size=64, max_wait_ms=20)
        reqs = requests(toy, 6, seed=1)
        res = await asyncio.gather(*(server.next_tokens(s, p) for s, p in reqs))
        return reqs, res, await server.stats()

    reqs, res, stats = asyncio.run(main())
    for (s, p), (w, lp) in zip(reqs, res):
        w0, lp0 = toy["teacher"].next_tokens(s, p)
        assert w == w0
        np.testing.assert_allclose(lp, lp0, atol=1e-5)
    assert stats.next_tokens.requests == 6 and stats.next_tokens.batches < 6


def test_a_failing_row_fails_only_its_own_request(toy):
    """An out-of-vocabulary token in one request's prefix makes the batched forward raise: that request gets the
    error, the requests batched with it their answers (served again one by one)."""
    async def main():
        server = TeacherServer(teacher=copy.deepcopy(toy["teacher"]), max_batch_size=64, max_wait_ms=200)
        good = requests(toy, 4, seed=4)
        bad = ([toy["examples"][0].teacher_src], [[3, 10_000]])  # token 10000 is outside the embedding
        res = await asyncio.gather(*(server.next_tokens(s, p) for s, p in good[:2]), server.next_tokens(*bad),
                                   *(server.next_tokens(s, p) for s, p in good[2:]), return_exceptions=True)
        return good, res, await server.stats()

    good, res, stats = asyncio.run(main())
    assert isinstance(res[2], IndexError), res[2]
    for (s, p), got in zip(good, res[:2] + res[3:]):
        assert not isinstance(got, BaseException), got
        w0, lp0 = toy["teacher"].next_tokens(s, p)
        assert got[0] == w0
        np.testing.assert_allclose(got[1], lp0, atol=1e-5)
    assert stats.next_tokens.failed_batches == 1 and stats.next_tokens.failed_requests == 1
    assert stats.next_tokens.requests == 4  # the served ones


def test_the_server_module_imports_no_ray():
    """The server is Ray-free: importing it (in a fresh interpreter) loads no Ray; the wing wraps it."""
    code = "import sys, tw_rl.teacher_server; assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    subprocess.run([sys.executable, "-c", code], check=True)
