"""Phase 1's optimizer: AdamW with a rate of its own for what the method adds to the student.

A pretrained student's body wants a small rate (1e-4: more undoes what it knows), while the ``<τ>`` decision and δ
start from zero and, at that rate, barely move in a short phase 1 (an Adam step moves each weight by about the rate:
the gate bias goes from −3 by < 0.01 in 70 steps). :class:`AddedRateAdamW` gives those parameters ``added_lr``:
δ, the gate bias and the prompt reader (:meth:`Student.added_parameters`) as their own parameter group, and the
output layer's ``<τ>`` row — one row of a tensor shared with every token (and, when tied, with the input
embeddings) — by scaling that row's AdamW update by ``added_lr / lr`` after each step. AdamW's update of a weight is
proportional to the rate (its moments do not depend on it, and the decoupled weight decay is ``lr · wd · w``), so
the scaled row moves exactly as it would in a group of its own at ``added_lr``.
"""

from __future__ import annotations

import torch

from tw_rl.models.student import Student
from tw_rl.pretrain import lr_at


class AddedRateAdamW:
    """AdamW over ``student``'s parameters; ``added_lr`` (None: ``lr``) for δ, the gate and the ``<τ>`` row; both
    rates follow the same schedule (:func:`tw_rl.pretrain.lr_at`: no warm-up, cosine to ``final_lr_fraction``)."""

    def __init__(self, student: Student, lr: float, added_lr: float | None = None, total_steps: int = 1,
                 final_lr_fraction: float = 1.0) -> None:
        self.student, self.total, self.final = student, max(1, int(total_steps)), float(final_lr_fraction)
        self.ratio = 1.0 if added_lr is None else float(added_lr) / float(lr)
        added = student.added_parameters()
        ids = {id(p) for p in added}
        body = [p for p in student.parameters() if id(p) not in ids]
        self.opt = torch.optim.AdamW([{"params": body, "peak": float(lr)},
                                      {"params": added, "peak": float(lr) * self.ratio}], lr=float(lr))
        self.count = 0

    @property
    def lr(self) -> float:
        """The body's current rate."""
        return self.opt.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One AdamW step at this step's scheduled rates, the ``<τ>`` row's update scaled to ``added_lr``."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.count, self.total, group["peak"], 0, self.final)
        row = self.student.model.get_output_embeddings().weight
        tau = self.student.tau_id
        before = row.detach()[tau].clone() if self.ratio != 1.0 else None
        self.opt.step()
        if before is not None:
            with torch.no_grad():
                row[tau] = before + (row[tau] - before) * self.ratio
        self.count += 1
