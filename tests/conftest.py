"""Shared fixtures: tiny models built from configs, no files, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from envs.token_mdp import Example
from tw_rl.models.student import Student
from tw_rl.teacher import Teacher

V = 24  # |V| of the toy vocabulary; id 0 = pad/start, 1 = EOS
EOS = 1


def tiny_t5(vocab: int, d_model: int = 16, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=2, num_layers=1,
                   num_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS,
                   dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def toy():
    """A random tiny teacher and student over a toy vocabulary, and a few examples with budget prompts."""
    teacher = Teacher(tiny_t5(V, d_model=32, seed=1), vocab_size=V)
    base = tiny_t5(V, seed=2)
    base.resize_token_embeddings(V + 1)
    with torch.no_grad():
        base.get_output_embeddings().weight[V].normal_(0, 8.0)  # make <τ> a likely action so tests exercise it
    student = Student(base, tau_id=V).eval()
    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(6):
        n = int(torch.randint(2, 7, (1,), generator=g))
        src = torch.randint(2, V, (n,), generator=g).tolist() + [EOS]
        prompts = {b: [2 + int(10 * b)] + src for b in (0.0, 0.2, 0.5)}  # a one-token stand-in for the prompt
        examples.append(Example(teacher_src=src, student_src=prompts))
    return {"teacher": teacher, "student": student, "examples": examples, "V": V, "eos": EOS}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (one ``ray.init`` per module), sized for 2 cores; shut down after it."""
    from tw_rl.distributed import init_ray, shutdown_ray

    init_ray(num_cpus=2, object_store_memory=200 * 1024 ** 2)
    yield
    shutdown_ray()
