"""Small functions the learners share (composition, not a base class): masked means, the student's logits over a
batch, and a flat ``name → tensor`` learner state (safetensors-ready) for checkpoints."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tw_rl.batch import EpisodeBatch, decoder_inputs


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True (0 when there are none)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def batch_logits(net: nn.Module, batch: EpisodeBatch, start_id: int, pad_id: int, return_hidden: bool = False):
    """The student's logits over ``V ∪ {<τ>}`` at every state ``s_0 … s_T`` of the batch: ``[B, T+1, A]``
    (``return_hidden``: and the output layer's input ``[B, T+1, d]``, for a value head)."""
    dec_tokens, dec_teacher_mask = decoder_inputs(batch, start_id, pad_id)
    if return_hidden:
        return net(batch.src_ids, batch.src_mask, dec_tokens, dec_teacher_mask, return_hidden=True)
    return net(batch.src_ids, batch.src_mask, dec_tokens, dec_teacher_mask)


def clip_gradients(student: nn.Module, max_norm: float) -> torch.Tensor:
    """Zero the gradients of what the student keeps fixed (``Student.mask_grads``, ``rl.trainable=tau``), then
    clip; returns the gradient norm before clipping."""
    if hasattr(student, "mask_grads"):
        student.mask_grads()
    return torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)


def rollout_stats(batch: EpisodeBatch) -> dict[str, float]:
    """What every learner reports about the batch it trained on (``rollout/*``)."""
    n_steps = batch.mask.sum().clamp(min=1)
    return {
        "rollout/usage": float((batch.teacher_mask & batch.mask).sum() / n_steps),
        "rollout/teacher_logprob": float(masked_mean(batch.teacher_logprobs, batch.mask)),
        "rollout/length": float(batch.lengths.float().mean()),
    }


def learner_state(nets: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer, step: int
                  ) -> dict[str, torch.Tensor]:
    """``{"<net>.<param>": ..., "optimizer.<i>.<name>": ..., "learner.step": ...}``: cloned, contiguous tensors
    (tied weights must not share storage for safetensors). Optimiser hyperparameters come from the config."""
    out: dict[str, torch.Tensor] = {}
    for prefix, net in nets.items():
        for k, v in net.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().clone().contiguous()
    for idx, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optimizer.{idx}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    out["learner.step"] = torch.tensor(step, dtype=torch.int64)
    return out


def load_learner_state(state: Mapping[str, torch.Tensor], nets: Mapping[str, nn.Module],
                       optimizer: torch.optim.Optimizer) -> int:
    """Inverse of :func:`learner_state`; returns the step count."""
    for prefix, net in nets.items():
        p = prefix + "."
        net.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in state.items():
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v.clone()
    opt = optimizer.state_dict()
    opt["state"] = opt_state
    optimizer.load_state_dict(opt)
    return int(state["learner.step"])
