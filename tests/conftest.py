"""Shared fixtures: tiny models built from configs, no files, no network.

The ``toy`` pair is trained for a few seconds inside the fixture (seeded, CPU, one thread) so that the tests that
use it can fail: a random tiny T5 decodes greedily to one token for every input, never emits EOS and never calls.
The task is *reverse the source*: content tokens ``8 … V−1`` then EOS, the output the same tokens reversed then
EOS. The student's source starts with a one-token budget prompt (``PROMPT``: 2, 4, 7 for b = 0, 0.2, 0.5; no source
token collides with them) and its traces call ``<τ>`` at the steps :func:`toy_call_steps` gives: never at b = 0,
at step 0 at b = 0.2, at steps 0 and 2 at b = 0.5 — so greedy usage is 0 at b = 0, between 0 and 1 above, and rises
with the budget. :func:`toy_properties` measures what the fixture promises and the fixture checks it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, \
    T5Config, T5ForConditionalGeneration

from tw_rl.envs.token_mdp import Example
from tw_rl.models.family import forced
from tw_rl.models.student import Student
from tw_rl.teacher import Teacher

V = 24  # |V| of the toy vocabulary; id 0 = pad/start, 1 = EOS
EOS = 1
TOY_BUDGETS = (0.0, 0.2, 0.5)
PROMPT = {b: 2 + int(10 * b) for b in TOY_BUDGETS}  # a one-token stand-in for the budget prompt: 2, 4, 7
FIRST_CONTENT = 8  # source tokens are FIRST_CONTENT … V−1: never a prompt token
TOY_MAX_LEN = 8  # the length limit the toy tests decode with (outputs are at most 7 tokens with EOS)


def tiny_t5(vocab: int, d_model: int = 16, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=2, num_layers=1,
                   num_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS,
                   dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_causal(kind: str, vocab: int, d_model: int = 16, seed: int = 0, layers: int = 1):
    """A tiny decoder-only LM of ``kind`` (``llama``, ``qwen2``, ``gpt2``), pad id 0 and EOS 1 as the T5s."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=True)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=d_model, n_layer=layers, n_head=2, n_positions=64,
                                          **common)).eval()
    config = (LlamaConfig if kind == "llama" else Qwen2Config)(
        hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1 if kind == "qwen2" else 2, max_position_embeddings=64, **common)
    return (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(config).eval()


def toy_call_steps(budget: float) -> tuple[int, ...]:
    """The output steps at which the toy student's traces call ``<τ>`` at ``budget`` (the EOS step never does)."""
    return () if budget == 0 else (0,) if budget < 0.3 else (0, 2)


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
    return ids, mask


def _reverse_pairs(g: torch.Generator, n: int) -> tuple[list[list[int]], list[list[int]]]:
    srcs, tgts = [], []
    for _ in range(n):
        x = torch.randint(FIRST_CONTENT, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        srcs.append(x + [EOS])
        tgts.append(x[::-1] + [EOS])
    return srcs, tgts


def _train_teacher(model, steps: int, seed: int, lr: float = 1e-2) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        srcs, tgts = _reverse_pairs(g, 32)
        (ids, mask), (labels, lmask) = _pad(srcs), _pad(tgts)
        if model.config.is_encoder_decoder:
            loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels.masked_fill(~lmask, -100)).loss
        else:  # the same teacher-forced positions, read by a causal LM as x ⧺ y
            dec = torch.cat([torch.zeros(len(srcs), 1, dtype=torch.long), labels[:, :-1]], 1)
            logits = forced(model, ids, mask, dec_ids=dec).logits
            loss = torch.nn.functional.cross_entropy(logits[lmask], labels[lmask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _train_student(student: Student, steps: int, seed: int, lr: float = 1e-2) -> float:
    """Behaviour cloning of the oracle traces: cross-entropy over V ∪ {<τ>}, the called token entering the decoder
    as a teacher token (with δ) — phase 1 in miniature, with the calls at :func:`toy_call_steps`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(steps):
        srcs, tgts = _reverse_pairs(g, 32)
        budgets = [TOY_BUDGETS[int(torch.randint(0, len(TOY_BUDGETS), (1,), generator=g))] for _ in srcs]
        ids, mask = _pad([[PROMPT[b]] + s for b, s in zip(budgets, srcs)])
        tokens, tmask = _pad(tgts)
        actions, called = tokens.clone(), torch.zeros_like(tmask)
        for i, (b, y) in enumerate(zip(budgets, tgts)):
            for t in toy_call_steps(b):
                if t < len(y) - 1:
                    actions[i, t], called[i, t] = student.tau_id, True
        start = torch.zeros(len(srcs), 1, dtype=torch.long)
        dec = torch.cat([start, tokens[:, :-1]], 1)
        dec_teacher = torch.cat([start.bool(), called[:, :-1]], 1)
        logits = student(ids, mask, dec, dec_teacher)
        loss = torch.nn.functional.cross_entropy(logits[tmask], actions[tmask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    return float(loss.detach())


def make_toy(teacher_kind: str = "t5", student_kind: str = "t5") -> dict:
    """The trained toy teacher and student and six examples with budget prompts (about 3-6 s on one CPU thread).
    ``*_kind``: ``t5`` or a decoder-only kind of :func:`tiny_causal` (a causal pair learns on more steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    causal = (teacher_kind != "t5", student_kind != "t5")
    try:
        teacher_model = (tiny_t5(V, d_model=32, seed=1) if not causal[0]
                         else tiny_causal(teacher_kind, V, d_model=32, seed=1, layers=2))
        _train_teacher(teacher_model, steps=200 if causal[0] else 100, seed=11)
        base = tiny_t5(V, seed=2) if not causal[1] else tiny_causal(student_kind, V, d_model=32, seed=2, layers=2)
        base.resize_token_embeddings(V + 1, mean_resizing=False)
        student = Student(base, tau_id=V)
        _train_student(student, steps=240 if causal[1] else 120, seed=12)
    finally:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(6):
        n = int(torch.randint(2, 7, (1,), generator=g))
        src = torch.randint(FIRST_CONTENT, V, (n,), generator=g).tolist() + [EOS]
        examples.append(Example(teacher_src=src, student_src={b: [PROMPT[b]] + src for b in TOY_BUDGETS}))
    return {"teacher": Teacher(teacher_model, vocab_size=V), "student": student.eval(), "examples": examples,
            "V": V, "eos": EOS}


@torch.no_grad()
def greedy_reference(student: Student, teacher_model, src: list[int], teacher_src: list[int], max_len: int,
                     eos: int, allow_tau: bool = True) -> tuple[list[int], list[int], list[bool]]:
    """Greedy acting from first principles, one row, no caches: at every step the argmax of the student's full
    training forward over ``V ∪ {<τ>}``; a ``<τ>`` appends the argmax of the teacher model's full forward on
    ``X_out`` (over ``V``). Returns ``(actions, tokens, teacher_mask)``, stopped at EOS or ``max_len``."""
    actions, tokens, called = [], [], []
    s = torch.tensor([src])
    for _ in range(max_len):
        dec = torch.tensor([[0] + tokens])
        q = student(s, torch.ones_like(s, dtype=torch.bool), dec, torch.tensor([[False] + called]))[0, -1]
        if not allow_tau:
            q = q[:student.tau_id]
        a = int(q.argmax())
        if a == student.tau_id:
            t_src = torch.tensor([teacher_src])
            logits = forced(teacher_model, t_src, torch.ones_like(t_src, dtype=torch.bool), dec_ids=dec).logits[0, -1]
            y = int(logits[:student.tau_id].argmax())
        else:
            y = a
        actions.append(a)
        tokens.append(y)
        called.append(a == student.tau_id)
        if y == eos:
            break
    return actions, tokens, called


def toy_properties(toy: dict, max_len: int = TOY_MAX_LEN) -> dict:
    """What the toy pair does when decoded greedily (tw_rl.decoding.decode) at each budget: distinct outputs
    (of the examples), the fraction that end with EOS, and the mean usage (calls / output length)."""
    from tw_rl.decoding import decode

    ex = toy["examples"]
    props = {}
    for b in TOY_BUDGETS:
        ids, mask = _pad([e.student_src[b] for e in ex])
        out = decode(toy["student"], ids, mask, max_len=max_len, eos_id=toy["eos"], teacher=toy["teacher"],
                     teacher_src=[e.teacher_src for e in ex])
        outs = [tuple(out.tokens[k, :out.lengths[k]].tolist()) for k in range(len(ex))]
        props[b] = {"distinct": len(set(outs)), "eos": float(np.mean(out.terminated)),
                    "usage": float(np.mean([out.teacher_mask[k, :out.lengths[k]].mean() for k in range(len(ex))])),
                    "rows_calling": int(sum(out.teacher_mask[k, :out.lengths[k]].any() for k in range(len(ex))))}
    return props


def check_toy(props: dict, n_examples: int) -> None:
    """The fixture's promises: varied outputs that mostly end, no calls at b = 0, and calls on some but not all
    steps at every b > 0, more at the larger budget."""
    for b, p in props.items():
        assert p["distinct"] >= n_examples // 2, (b, props)
        assert p["eos"] >= 0.5, (b, props)
        if b == 0:
            assert p["usage"] == 0.0, props
        else:
            assert 0.0 < p["usage"] < 1.0, props
    assert props[0.2]["usage"] < props[0.5]["usage"], props


@pytest.fixture(scope="session")
def toy():
    """A trained tiny teacher and student over a toy vocabulary, and six examples with budget prompts."""
    pair = make_toy()
    check_toy(toy_properties(pair), len(pair["examples"]))
    return pair


@pytest.fixture(scope="session")
def causal_toy():
    """The toy pair as decoder-only LMs: a Llama teacher and a Qwen2 student (same promises as ``toy``)."""
    pair = make_toy("llama", "qwen2")
    check_toy(toy_properties(pair), len(pair["examples"]))
    return pair


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (one ``ray.init`` per module), sized for 2 cores; shut down after it."""
    from tw_rl.distributed.cluster import init_ray, shutdown_ray

    init_ray(num_cpus=2, object_store_memory=200 * 1024 ** 2)
    yield
    shutdown_ray()


class CountingTeacher:
    """A teacher client that counts the rows it is asked about."""

    def __init__(self, teacher):
        self.teacher, self.rows = teacher, 0

    def next_tokens(self, src, prefixes):
        self.rows += len(prefixes)
        return self.teacher.next_tokens(src, prefixes)

    def score(self, src, outputs):
        return self.teacher.score(src, outputs)
