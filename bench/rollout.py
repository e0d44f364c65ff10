"""Rollout decoding speed against Hugging Face ``generate``, and the cost of one teacher call.

1. Student tokens/s of :func:`tw_rl.decoding.decode` at budget 0 (``<τ>`` masked, no teacher) against greedy
   ``model.generate`` on the same model, batch and lengths. Both produce exactly ``new_tokens`` tokens per row
   (``decode`` gets an EOS id that never ends a row; ``generate`` gets ``min_new_tokens = max_new_tokens``).
   Runs alternate between the two; the median of ``--repeats`` runs is reported.
2. Seconds per ``Teacher.next_tokens`` call for batch sizes 1, 8, 64: cold (encoder states computed) and warm
   (encoder states from the teacher's cache, as for every ``<τ>`` after the first of a source).
3. Latency of Training Wheels at batch size 1: ms per sequence of ``decode`` with ``<τ>`` forced at every 5th
   step (usage 0.2), the teacher answering incrementally (per-sequence KV cache, the default) or batched over the
   full prefix (``incremental_max_rows=0``, the path before the KV cache), against teacher-alone
   ``Teacher.generate`` and the student alone (``<τ>`` masked); all produce exactly ``new_tokens`` tokens.
   Caches are cleared before every sequence. For the default teacher and a larger one (d 256, 3+3 layers).
4. The crossover of the two ``next_tokens`` paths: ms per call for ``b`` rows that each add 5 tokens between calls.

Part 1 also runs on decoder-only models (``--only causal`` runs only that): Llama-style causal LMs of the same widths
with ``num_layers + num_decoder_layers`` layers, the input left-padded for ``generate`` (``decode`` left-aligns it
itself), both producing exactly ``new_tokens`` tokens after the input.

Models are T5s built from the ``ArchConfig`` defaults (student, teacher and the plain ``ArchConfig()``) with a
vocabulary of 1000 (+ ``<τ>`` for the student), randomly initialised: speed does not depend on training.
The last line printed is JSON with ``ratio_vs_generate`` (default student: decode tokens/s ÷ generate tokens/s).

    .venv/bin/python bench/rollout.py [--threads 1] [--batch 64] [--new-tokens 48] [--repeats 5] [--only teacher]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tw_rl.config import ArchConfig, StudentConfig, TeacherConfig  # noqa: E402
from tw_rl.decoding import decode  # noqa: E402
from tw_rl.models.family import is_causal, left_align  # noqa: E402
from tw_rl.models.student import Student  # noqa: E402
from tw_rl.teacher import Teacher  # noqa: E402

VOCAB, PAD, EOS = 1000, 0, 1
LARGE_TEACHER = ArchConfig(d_model=256, d_ff=1024, d_kv=32, num_heads=8, num_layers=3, num_decoder_layers=3)


def build(arch: ArchConfig, vocab: int, seed: int = 0) -> T5ForConditionalGeneration:
    """Same layout as ``tw_rl.models.factory.build_t5`` (tied embeddings, ReLU feed-forward)."""
    cfg = T5Config(vocab_size=vocab, d_model=arch.d_model, d_ff=arch.d_ff, d_kv=arch.d_kv, num_heads=arch.num_heads,
                   num_layers=arch.num_layers, num_decoder_layers=arch.num_decoder_layers, dropout_rate=0.0,
                   feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS,
                   decoder_start_token_id=PAD)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    model.generation_config.decoder_start_token_id = PAD
    return model


def build_causal(arch: ArchConfig, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-style decoder-only LM as wide as ``arch``, with its encoder's and decoder's layers in one stack."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=arch.d_model, intermediate_size=arch.d_ff,
                      num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads, head_dim=arch.d_kv,
                      num_hidden_layers=arch.num_layers + arch.num_decoder_layers, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    return model


def sources(batch: int, src_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(src_len // 2, src_len + 1, (batch,), generator=g)
    ids = torch.randint(2, VOCAB, (batch, src_len), generator=g)
    mask = torch.arange(src_len)[None] < lens[:, None]
    ids[~mask] = PAD
    ids[torch.arange(batch), lens - 1] = EOS
    return ids, mask


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def bench_decode(arch: ArchConfig, batch: int, new_tokens: int, src_len: int, repeats: int,
                 causal: bool = False) -> dict:
    model = (build_causal if causal else build)(arch, VOCAB + 1)  # V ∪ {<τ>}
    student = Student(model, tau_id=VOCAB).eval()
    ids, mask = sources(batch, src_len)
    gen_ids, gen_mask = left_align(ids, mask) if is_causal(model) else (ids, mask)  # generate continues the input

    def run_decode():  # EOS id -1: no row ends early, exactly new_tokens steps (as generate with min_new_tokens)
        return decode(student, ids, mask, max_len=new_tokens, eos_id=-1, allow_tau=False)

    def run_generate():
        return model.generate(input_ids=gen_ids, attention_mask=gen_mask.long(), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, num_beams=1)

    gen = torch.Generator().manual_seed(0)

    def run_sampled():  # what rollouts do: temperature 1 over V ∪ {<τ>} (τ masked here: no teacher)
        return decode(student, ids, mask, max_len=new_tokens, eos_id=-1, allow_tau=False, temperature=1.0,
                      generator=gen)

    run_decode(), run_generate(), run_sampled()  # warm-up
    td, tg, ts = [], [], []
    for _ in range(repeats):
        s, out = timed(run_decode)
        assert out.tokens.shape == (batch, new_tokens) and (out.lengths == new_tokens).all()
        td.append(s)
        s, out = timed(run_generate)
        assert out.shape == (batch, new_tokens + (src_len if causal else 1))
        tg.append(s)
        ts.append(timed(run_sampled)[0])
    n = batch * new_tokens
    d, g, smp = (n / statistics.median(t) for t in (td, tg, ts))
    params = sum(p.numel() for p in model.parameters())
    return {"family": "causal" if causal else "seq2seq", "params": params, "d_model": arch.d_model,
            "layers": arch.num_layers + arch.num_decoder_layers,
            "decode_tokens_per_s": round(d), "generate_tokens_per_s": round(g), "ratio_vs_generate": round(d / g, 3),
            "decode_sampled_tokens_per_s": round(smp),
            "decode_s": [round(x, 4) for x in td], "generate_s": [round(x, 4) for x in tg]}


@torch.no_grad()
def bench_teacher(arch: ArchConfig, src_len: int, prefix_len: int, repeats: int,
                  batch_sizes=(1, 8, 64)) -> dict:
    # the batched path (what large requests get); repeating a call would be free on the incremental one
    teacher = Teacher(build(arch, VOCAB, seed=1), vocab_size=VOCAB, incremental_max_rows=0)
    g = torch.Generator().manual_seed(1)
    out = {"params": sum(p.numel() for p in teacher.model.parameters()), "d_model": arch.d_model,
           "prefix_len": prefix_len, "src_len": src_len}
    for b in batch_sizes:
        ids, mask = sources(b, src_len, seed=b)
        src = [row[m].tolist() for row, m in zip(ids, mask)]
        prefixes = torch.randint(2, VOCAB, (b, prefix_len), generator=g).tolist()
        teacher.next_tokens(src, prefixes)  # warm-up
        cold, warm = [], []
        for _ in range(repeats):
            teacher.clear_cache()  # cold: the encoder runs for every source of the call
            cold.append(timed(lambda: teacher.next_tokens(src, prefixes))[0])
            warm.append(timed(lambda: teacher.next_tokens(src, prefixes))[0])  # encoder states cached
        c, w = statistics.median(cold), statistics.median(warm)
        out[f"batch_{b}"] = {"cold_ms": round(1e3 * c, 2), "warm_ms": round(1e3 * w, 2),
                             "warm_ms_per_row": round(1e3 * w / b, 3), "cold_over_warm": round(c / w, 2)}
    # a call re-reads the whole prefix (no teacher KV cache across calls): cost grows with the step t
    ids, mask = sources(8, src_len, seed=8)
    src = [row[m].tolist() for row, m in zip(ids, mask)]
    by_len = {}
    for L in (1, 12, prefix_len, 2 * prefix_len):
        prefixes = torch.randint(2, VOCAB, (8, L), generator=g).tolist()
        teacher.next_tokens(src, prefixes)
        by_len[L] = round(1e3 * statistics.median(timed(lambda: teacher.next_tokens(src, prefixes))[0]
                                                  for _ in range(repeats)), 2)
    out["batch_8_warm_ms_by_prefix_len"] = by_len
    return out


@torch.no_grad()
def bench_latency(teacher_arch: ArchConfig, student_arch: ArchConfig, new_tokens: int, src_len: int, repeats: int,
                  n_sources: int = 8, every: int = 5) -> dict:
    """ms per sequence at batch size 1: TW at usage 1/every (incremental and batched teacher) vs teacher alone."""
    model = build(teacher_arch, VOCAB, seed=1)
    model.generation_config.min_new_tokens = new_tokens  # teacher alone: exactly new_tokens tokens, as decode
    teachers = {"incremental": Teacher(model, vocab_size=VOCAB), "batched": Teacher(model, vocab_size=VOCAB,
                                                                                    incremental_max_rows=0)}
    student = Student(build(student_arch, VOCAB + 1), tau_id=VOCAB).eval()
    ids, mask = sources(n_sources, src_len, seed=5)
    rule = lambda t, logits, calls: torch.full((logits.shape[0],), t % every == every // 2)  # noqa: E731

    def tw(teacher, i):
        return decode(student, ids[i:i + 1], mask[i:i + 1], max_len=new_tokens, eos_id=-1, teacher=teacher,
                      teacher_src=[ids[i][mask[i]].tolist()], allow_tau=False, tau_rule=rule)

    def alone(i):
        return teachers["incremental"].generate([ids[i][mask[i]].tolist()], new_tokens, eos_id=-1)

    def student_alone(i):  # the floor: the student's own 48 decoder steps, no teacher
        return decode(student, ids[i:i + 1], mask[i:i + 1], max_len=new_tokens, eos_id=-1, allow_tau=False)

    jobs = {f"tw_{name}": (lambda i, t=t: tw(t, i)) for name, t in teachers.items()}
    jobs["teacher_alone"], jobs["student_alone"] = alone, student_alone
    for job in jobs.values():
        job(0)  # warm-up
    ref = tw(teachers["batched"], 0).tokens
    assert (tw(teachers["incremental"], 0).tokens == ref).all(), "incremental and batched teachers disagree"
    assert ref.shape == (1, new_tokens) and len(alone(0)[0]) == new_tokens
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):  # rounds: a burst of load elsewhere falls on all jobs alike
        for name, job in jobs.items():
            for i in range(n_sources):
                for t in teachers.values():
                    t.clear_cache()
                times[name].append(timed(lambda: job(i))[0])
    out = {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}
    calls = sum(1 for t in range(new_tokens) if t % every == every // 2)
    out.update(calls_per_sequence=calls, new_tokens=new_tokens,
               incremental_over_alone=round(out["tw_incremental"] / out["teacher_alone"], 3),
               batched_over_alone=round(out["tw_batched"] / out["teacher_alone"], 3))
    return out


@torch.no_grad()
def bench_crossover(arch: ArchConfig, src_len: int, max_prefix: int, repeats: int, every: int = 5,
                    rows=(1, 2, 4, 8, 12, 16, 24, 32)) -> dict:
    """ms per ``next_tokens`` call of ``b`` rows, incremental vs batched: every row has added ``every`` tokens
    since its previous call (calls at prefix lengths every-1, 2·every-1, … < max_prefix), caches cleared first."""
    model = build(arch, VOCAB, seed=1)
    inc = Teacher(model, vocab_size=VOCAB, incremental_max_rows=10 ** 9)
    bat = Teacher(model, vocab_size=VOCAB, incremental_max_rows=0)
    g = torch.Generator().manual_seed(2)
    out = {}
    for b in rows:
        ids, mask = sources(b, src_len, seed=100 + b)
        src = [row[m].tolist() for row, m in zip(ids, mask)]
        seqs = torch.randint(2, VOCAB, (b, max_prefix), generator=g).tolist()
        lens = list(range(every - 1, max_prefix, every))

        def series(teacher):
            teacher.clear_cache()
            return [teacher.next_tokens(src, [q[:n] for q in seqs]) for n in lens]

        a, c = series(inc), series(bat)  # warm-up, and the same greedy tokens
        assert [x[0] for x in a] == [x[0] for x in c]
        ti, tb = [], []
        for _ in range(repeats):
            ti.append(timed(lambda: series(inc))[0] / len(lens))
            tb.append(timed(lambda: series(bat))[0] / len(lens))
        i, bt = 1e3 * statistics.median(ti), 1e3 * statistics.median(tb)
        out[b] = {"incremental_ms": round(i, 2), "batched_ms": round(bt, 2),
                  "incremental_over_batched": round(i / bt, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a rollout worker runs 1 by default)")
    ap.add_argument("--batch", type=int, default=64, help="rows decoded together (RolloutConfig.envs_per_worker)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per row (DataConfig.max_tgt_tokens)")
    ap.add_argument("--src-len", type=int, default=32, help="longest source")
    ap.add_argument("--prefix-len", type=int, default=24, help="teacher calls: prefix X_out[<t] length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["teacher", "causal"],
                    help="teacher: only parts 3 and 4 (latency, crossover); causal: only part 1 on causal LMs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"student_default": StudentConfig().arch, "arch_default": ArchConfig()}
    causal = {}
    for name, arch in models.items():
        causal[name] = bench_decode(arch, args.batch, args.new_tokens, args.src_len, args.repeats, causal=True)
        print(f"decode vs generate, causal LM [{name}]: {json.dumps(causal[name])}", flush=True)
    causal_summary = {f"causal_ratio_vs_generate{'' if n == 'student_default' else '_arch_default'}":
                      causal[n]["ratio_vs_generate"] for n in models}
    if args.only == "causal":
        print(json.dumps({**causal_summary, "batch": args.batch, "new_tokens": args.new_tokens,
                          "threads": args.threads, "torch": torch.__version__}))
        return
    # the default teacher, and a larger one (the default until the teacher was shrunk): the teacher's share of the
    # cost, and so the gain of its KV cache, grows with its size
    teachers = {"teacher_default": TeacherConfig().arch, "teacher_d256_3x3": LARGE_TEACHER}
    latency = {}
    for name, arch in teachers.items():
        latency[name] = bench_latency(arch, StudentConfig().arch, args.new_tokens, args.src_len, args.repeats)
        print(f"latency at batch size 1, usage 0.2 [{name}]: {json.dumps(latency[name])}", flush=True)
    for name, arch in teachers.items():
        crossover = bench_crossover(arch, args.src_len, args.new_tokens, args.repeats)
        print(f"next_tokens incremental vs batched [{name}]: {json.dumps(crossover)}", flush=True)
    if args.only == "teacher":
        return

    decoding = {}
    for name, arch in models.items():
        decoding[name] = bench_decode(arch, args.batch, args.new_tokens, args.src_len, args.repeats)
        print(f"decode vs generate [{name}]: {json.dumps(decoding[name])}", flush=True)
    teacher = bench_teacher(TeacherConfig().arch, args.src_len, args.prefix_len, args.repeats)
    print(f"teacher next_tokens [teacher_default]: {json.dumps(teacher)}", flush=True)
    summary = {"ratio_vs_generate": decoding["student_default"]["ratio_vs_generate"], **causal_summary,
               "ratio_vs_generate_arch_default": decoding["arch_default"]["ratio_vs_generate"],
               "decode_tokens_per_s": decoding["student_default"]["decode_tokens_per_s"],
               "generate_tokens_per_s": decoding["student_default"]["generate_tokens_per_s"],
               "teacher_warm_ms": {b: teacher[f"batch_{b}"]["warm_ms"] for b in (1, 8, 64)},
               "teacher_cold_ms": {b: teacher[f"batch_{b}"]["cold_ms"] for b in (1, 8, 64)},
               "tw_latency_ms": {k: latency["teacher_default"][k]
                                 for k in ("tw_incremental", "tw_batched", "teacher_alone", "student_alone")},
               "batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
               "torch": torch.__version__}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
