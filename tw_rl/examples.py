"""Turn text pairs into MDP inputs: the teacher's ids of ``x`` and the student's ids of ``prompt(b) + x``."""

from __future__ import annotations

from typing import Sequence

import torch

from tw_rl.envs.token_mdp import Example
from tw_rl.models.family import InputTemplate
from tw_rl.prompt import budget_prompt
from tw_rl.data import Pair


def make_examples(pairs: Sequence[Pair], tokenizer, budgets: Sequence[float], prompt: str,
                  teacher_template: InputTemplate | None = None, student_template: InputTemplate | None = None,
                  task_prompt: str = "") -> list[Example]:
    """Tokenize once per budget, batched. Budgets are the grid's values (floats used as dict keys). Each role's
    input is written by its :class:`~tw_rl.models.family.InputTemplate` (default: a seq2seq model's, the tokenizer
    with its special tokens): the teacher reads ``task_prompt + x``, the student ``prompt(b) + task_prompt + x``."""
    sources = [task_prompt + p.source for p in pairs]
    teacher_template = teacher_template or InputTemplate(tokenizer)
    student_template = student_template or InputTemplate(tokenizer)
    teacher = teacher_template.inputs(sources)
    student = {float(b): student_template.inputs([budget_prompt(prompt, b) + s for s in sources]) for b in budgets}
    return [Example(teacher_src=teacher[i], student_src={b: student[b][i] for b in student},
                    text=p.source, reference=p.target) for i, p in enumerate(pairs)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: ids ``[B, L]`` and a bool mask ``[B, L]``, on ``device``."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = True
    return ids.to(device), mask.to(device)
