"""``gymnasium.make("tw_rl/TokenMDP-v0")`` with no arguments: the embedded task with tiny, untrained models.

This is an assembly point (it builds a tokenizer and models), so it lives apart from the environment itself,
which imports no model code. Building takes a few seconds on a CPU.
"""

from __future__ import annotations

from tw_rl.envs.token_mdp import TokenMDPEnv
from tw_rl.config import ArchConfig, Config, EmbeddedTaskConfig
from tw_rl.data.embedded import EmbeddedTask
from tw_rl.examples import make_examples
from tw_rl.models.factory import build_t5
from tw_rl.models.student import Student
from tw_rl.models.tokenizer import budget_prompt_texts, train_tokenizer
from tw_rl.teacher import Teacher


def make_default_env(n_examples: int = 64, max_len: int = 32, seed: int = 0) -> TokenMDPEnv:
    cfg = Config()
    task = EmbeddedTask(EmbeddedTaskConfig(n_train=n_examples, n_validation=1, n_test=1, task_seed=seed))
    pairs = task.split("train")
    tok = train_tokenizer(task.texts(), vocab_size=400, extra_texts=budget_prompt_texts(cfg.budget_prompt))
    tiny = ArchConfig(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)
    teacher = Teacher(build_t5(tiny, tok, seed=seed + 1), vocab_size=len(tok), pad_id=tok.pad_token_id)
    examples = make_examples(pairs, tok, cfg.budgets, cfg.budget_prompt)  # before <τ> joins the vocabulary
    student = Student.from_base(build_t5(tiny, tok, seed=seed + 2), tok)
    max_src = max(len(s) for e in examples for s in e.student_src.values())
    return TokenMDPEnv(examples, teacher, n_actions=student.n_actions, eos_id=tok.eos_token_id,
                       budgets=cfg.budgets, max_len=max_len, max_src_len=max_src,
                       decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
