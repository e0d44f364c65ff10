"""Phase-2 rollout collection: collected tokens/s with 2 Ray rollout workers against 1, same total work, same run.

Two :class:`tw_rl.distributed.rollout.RolloutGroup` s are started side by side on one local Ray, each as phase 2 builds it
(``RolloutGroup.from_config``: its own teacher server actor with dynamic batching, rollout actors holding a student
replica), one with 1 rollout worker and one with 2, every worker decoding ``E = --episodes`` episodes per call
(``rollout.envs_per_worker``); per round the 1-worker group makes two calls and the 2-worker group one, so both
collect the same episodes (``--split``: ``1 × E`` against ``2 × E/2`` per call instead). Calls alternate between the two groups in rounds (a burst of other load on a shared
machine falls on both alike); tokens/s of a group = its tokens over its summed wall time (weights are sent once at
warm-up, as phase 2 sends them once per iteration). The student's ``<τ>`` row is biased so that about
``--usage`` of the steps call the teacher, as a trained student does at mid budgets.

Models: T5s of the default ``StudentConfig().arch`` / ``TeacherConfig().arch`` shapes (random weights; speed does
not depend on training), vocabulary 1000, sources of 16–32 tokens, episodes of up to ``--max-len`` tokens.
The last line printed is JSON with ``ratio`` (2 workers ÷ 1 worker).

    .venv/bin/python bench/scaling.py [--episodes 64] [--max-len 32] [--rounds 8] [--usage 0.2] [--split]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.rollout import EOS, PAD, VOCAB, build, sources  # noqa: E402
from tw_rl.envs.token_mdp import Example  # noqa: E402
from tw_rl.config import Config, StudentConfig, TeacherConfig, load_config  # noqa: E402
from tw_rl.models.student import Student  # noqa: E402
from tw_rl.teacher import Teacher  # noqa: E402

BUDGETS = [0.0, 0.2, 0.5]


def examples(n: int, src_len: int) -> list[Example]:
    ids, mask = sources(n, src_len, seed=7)
    out = []
    for row, m in zip(ids, mask):
        src = row[m].tolist()
        out.append(Example(teacher_src=src, student_src={b: [2 + int(10 * b)] + src for b in BUDGETS}))
    return out


def student_with_calls(usage: float) -> Student:
    """A student whose ``<τ>`` logit is raised so that roughly ``usage`` of its first steps call the teacher (the
    ``<τ>`` output row is fitted by a few gradient steps; the reported ``teacher_call_fraction`` is the measured
    one)."""
    student = Student(build(StudentConfig().arch, VOCAB + 1, seed=3), tau_id=VOCAB).eval()
    ids, mask = sources(64, 24, seed=9)
    dec = torch.zeros((ids.shape[0], 1), dtype=torch.long)
    weight = student.model.get_output_embeddings().weight
    if usage <= 0:  # the <τ> row at zero, as Student.from_base starts it: p(τ) ≈ 1/|V|, almost no calls
        with torch.no_grad():
            weight[VOCAB] = 0.0
        return student
    target = torch.log(torch.tensor(usage / (1 - usage)))
    for _ in range(200):
        logits = student.model(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits[:, -1]
        # p(τ) = u  ⇔  logit_τ − logsumexp(logits over V) = log(u / (1 − u))
        gap = (logits[:, VOCAB] - torch.logsumexp(logits[:, :VOCAB], -1)).mean()
        if abs(float(gap.detach() - target)) < 0.05:
            break
        (grad,) = torch.autograd.grad((gap - target) ** 2, weight)
        with torch.no_grad():
            weight[VOCAB] -= 0.5 * grad[VOCAB] / (grad[VOCAB].norm() + 1e-9) * min(1.0, abs(float(gap.detach() - target)))
    student.zero_grad(set_to_none=True)
    return student


def make_group(cfg: Config, student: Student, teacher: Teacher, exs: list[Example]):
    from tw_rl.distributed.rollout import RolloutGroup

    return RolloutGroup.from_config(cfg, student, None, exs, teacher, eos_id=EOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=64, help="episodes per sample call, split over the workers")
    ap.add_argument("--max-len", type=int, default=32, help="longest episode (data.max_tgt_tokens)")
    ap.add_argument("--src-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="timed sample calls per group (alternating)")
    ap.add_argument("--usage", type=float, default=0.2, help="approximate fraction of steps that call the teacher")
    ap.add_argument("--num-cpus", type=float, default=2, help="CPUs of the local Ray")
    ap.add_argument("--worker-cpus", type=float, default=0.5, help="rollout.num_cpus (threads: max(1, int(·)))")
    ap.add_argument("--teacher-cpus", type=float, default=0.25, help="teacher.num_cpus of each group's teacher")
    ap.add_argument("--split", action="store_true", help="split --episodes over the workers in every call (2 × E/2) "
                    "instead of the default: every worker decodes E per call and the 1-worker group makes two calls "
                    "per round (either way both groups collect the same episodes)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from tw_rl.distributed.cluster import init_ray, shutdown_ray

    exs = examples(256, args.src_len)
    student = student_with_calls(args.usage)
    teacher = Teacher(build(TeacherConfig().arch, VOCAB, seed=1), vocab_size=VOCAB, pad_id=PAD, start_id=PAD)
    init_ray(num_cpus=args.num_cpus)
    groups = {}
    try:
        for n in (1, 2):
            per_worker = args.episodes // n if args.split else args.episodes
            cfg = load_config(None, [f"rollout.num_workers={n}", f"rollout.envs_per_worker={per_worker}",
                                     f"rollout.num_cpus={args.worker_cpus}", f"teacher.num_cpus={args.teacher_cpus}",
                                     f"data.max_tgt_tokens={args.max_len}", "budgets=[0.0,0.2,0.5]"])
            groups[n] = make_group(cfg, student, teacher, exs)
        weights = student.state_dict()
        for n, g in groups.items():  # warm-up: weights sent, actors' first call paid
            g.sample(weights, version=1, seed=0)
        tokens = {n: 0 for n in groups}
        seconds = {n: 0.0 for n in groups}
        calls = {n: 0 for n in groups}
        busy = {n: 0.0 for n in groups}  # summed seconds the workers spent inside sample()
        episodes = {n: 0 for n in groups}
        for r in range(args.rounds):
            for n, g in (groups.items() if r % 2 == 0 else reversed(groups.items())):
                for _ in range(1 if args.split or n == 2 else 2):  # the same episodes per round for both groups
                    t0 = time.perf_counter()
                    eps, stats = g.sample(None, version=1, seed=r + 1)
                    seconds[n] += time.perf_counter() - t0
                    tokens[n] += stats.tokens
                    calls[n] += stats.teacher_calls
                    episodes[n] += stats.episodes
                    busy[n] += sum(w.seconds for w in stats.workers)
        assert episodes[1] == episodes[2], episodes
        res = {n: {"episodes": episodes[n], "tokens": tokens[n], "seconds": round(seconds[n], 3),
                   "tokens_per_s": round(tokens[n] / seconds[n], 1),
                   "teacher_call_fraction": round(calls[n] / max(1, tokens[n]), 3),
                   "worker_busy_over_wall": round(busy[n] / seconds[n], 2)} for n in groups}
        for n in groups:
            per_worker = args.episodes // n if args.split else args.episodes
            print(f"{n} rollout worker(s) × {per_worker} episodes per call: {json.dumps(res[n])}", flush=True)
    finally:
        for g in groups.values():
            g.close()
        shutdown_ray()
    print(json.dumps({"tokens_per_s_1_worker": res[1]["tokens_per_s"], "tokens_per_s_2_workers": res[2]["tokens_per_s"],
                      "ratio": round(res[2]["tokens_per_s"] / res[1]["tokens_per_s"], 3),
                      "worker_busy_over_wall_2_workers": res[2]["worker_busy_over_wall"],
                      "mode": "split" if args.split else "per_worker", "episodes": args.episodes,
                      "max_len": args.max_len, "rounds": args.rounds, "num_cpus": args.num_cpus,
                      "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
