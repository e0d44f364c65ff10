"""Learner step time: one PCL update against one plain cross-entropy step on the same batch and model.

A PCL step (the default ``rl.value=learned``) runs the student over every state (``T+1`` positions), the value
head and its Polyak copy over the student's decoder state, the vectorised single- and multi-step consistency
loss, backward, AdamW and the Polyak update of the head. The baseline is one teacher-forced cross-entropy step of
the same student on the same tokens (forward, backward, AdamW). The two are timed alternately, round by round, and
the ratio is the median of the per-round ratios. With one thread (the default) the clock is the process's CPU time,
so that other load on a shared machine does not enter; with more, wall-clock time. The last line is JSON with ``ratio_pcl_vs_ce`` (PCL seconds ÷ CE
seconds).

    .venv/bin/python bench/learner.py [--threads 1] [--batch 64] [--length 32] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rollout import VOCAB, build  # noqa: E402
from tw_rl.algos.pcl import PCLLearner  # noqa: E402
from tw_rl.batch import Episode, EpisodeBatch  # noqa: E402
from tw_rl.config import ArchConfig, RLConfig, StudentConfig  # noqa: E402
from tw_rl.models.student import Student  # noqa: E402


def episodes(n: int, length: int, tau: int, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(length // 2, length + 1))
        tokens = rng.integers(2, VOCAB, size=T)
        actions = np.where(rng.random(T) < 0.2, tau, tokens)
        out.append(Episode(src_ids=rng.integers(2, VOCAB, size=24), actions=actions, tokens=tokens,
                           teacher_logprobs=-rng.random(T).astype(np.float32),
                           behavior_logprobs=-rng.random(T).astype(np.float32), budget=0.2, terminated=True))
    return out


def paired_times(a, b, repeats: int, clock=time.perf_counter) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` alternately (``a, b, b, a, ...``), so that load from elsewhere on a shared machine falls
    on both alike; returns their medians and the median of the per-round ratios ``a / b``."""
    a(), b()  # warm-up
    ta, tb = [], []
    for k in range(repeats):
        for fn, ts in ((a, ta), (b, tb)) if k % 2 == 0 else ((b, tb), (a, ta)):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def run(arch: ArchConfig, args) -> dict:
    model = build(arch, VOCAB + 1)
    student = Student(model, tau_id=VOCAB).train()
    batch = EpisodeBatch.collate(episodes(args.batch, args.length, VOCAB))
    learner = PCLLearner(RLConfig(), student, start_id=0, pad_id=0)
    lambdas = torch.full((args.batch,), 0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    dec, dec_tm = batch.decoder_inputs(0, 0)

    def ce_step():
        logits = student(batch.src_ids, batch.src_mask, dec[:, :-1], dec_tm[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[batch.mask], batch.actions[batch.mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # one torch thread: the process's CPU time is the work done, whatever else runs on the machine (wall-clock
    # medians on a loaded machine mix in the time the process waited for a core)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    pcl, ce, ratio = paired_times(lambda: learner.update(batch, lambdas), ce_step, args.repeats, clock)
    tokens = int(batch.mask.sum())
    return {"params": sum(p.numel() for p in student.parameters()), "pcl_ms": round(1e3 * pcl, 2),
            "ce_ms": round(1e3 * ce, 2), "ratio_pcl_vs_ce": round(ratio, 3),
            "pcl_tokens_per_s": round(tokens / pcl), "ce_tokens_per_s": round(tokens / ce)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {"student": run(StudentConfig().arch, args), "arch_default": run(ArchConfig(), args)}
    for k, v in res.items():
        print(k, v)
    print(json.dumps({"ratio_pcl_vs_ce": res["student"]["ratio_pcl_vs_ce"],
                      "ratio_pcl_vs_ce_arch_default": res["arch_default"]["ratio_pcl_vs_ce"]}))


if __name__ == "__main__":
    main()
