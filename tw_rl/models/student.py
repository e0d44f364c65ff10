"""The student: a seq2seq model or a causal LM whose actions are ``V ∪ {<τ>}`` and whose decoder knows which tokens it
asked for.

SPEC §2: ``<τ>`` is added to the vocabulary as the last action; a teacher-provided token enters the decoder as
``embed(w) + δ`` where ``δ`` is a learnable offset saved with the student. Logits over ``V ∪ {<τ>}`` are read as
soft Q-values by the learners (SPEC §4).

Acting and training are different forward passes: :meth:`Student.step` feeds one decoder position with a KV
cache (acting, on a :class:`tw_rl.models.family.Stepper` from :meth:`Student.start`); :meth:`Student.forward` returns
all positions' logits (training, :func:`tw_rl.models.family.forced`). Both work for either model family: a causal
LM reads its input and its output as one sequence (docs/design.md, "Two model families").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tw_rl.models.family import Stepper, auto_model_class, forced
from tw_rl.rundir import ArtefactError, atomic_write

TAU_TOKEN = "<τ>"
TAU_HEADS = ("token", "gate", "prompt_gate")
GATES = ("gate", "prompt_gate")
TRAINABLE = ("all", "tau")
GATE_BIAS_INIT = -3.0
_META = "tw_student.json"
_DELTA = "tw_delta.safetensors"


class PromptReader(nn.Module):
    """The part of the ``prompt_gate`` head that reads the input: one attention query over the encoder's states
    (a causal LM's final states over its input; the budget prompt is part of the input), pooled and projected to a scalar added to the gate ``u(s)``:
    ``r(x, b) = w · Σ_j softmax_j(q · e_j / √d) e_j``. Both start at zero (uniform pooling, no effect), so a fresh
    head behaves as the plain gate; behaviour cloning and PCL then teach it how the budget should move the gate."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d_model))
        self.weight = nn.Parameter(torch.zeros(d_model))

    def forward(self, enc: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """``enc [B, S, d]``, ``src_mask [B, S]`` → ``[B]``."""
        scores = (enc.float() @ self.query) / enc.shape[-1] ** 0.5
        scores = scores.masked_fill(~src_mask.bool(), float("-inf"))
        pooled = (torch.softmax(scores, dim=-1).unsqueeze(-1) * enc.float()).sum(1)
        return pooled @ self.weight


class Student(nn.Module):
    """Wraps a Hugging Face seq2seq model or causal LM. ``tau_id`` is the last action index;
    ``n_actions = tau_id + 1``."""

    def __init__(self, model: PreTrainedModel, tau_id: int, delta: torch.Tensor | None = None,
                 use_delta: bool = True, tau_bias: dict[float, float] | None = None, tau_head: str = "token",
                 gate_bias: float = GATE_BIAS_INIT):
        super().__init__()
        if tau_head not in TAU_HEADS:
            raise ValueError(f"tau_head={tau_head!r} is unknown; known: {TAU_HEADS}")
        self.tau_head = tau_head
        # the gate head's learnable bias (the token head has none): starts the student calling rarely, σ(−3) ≈ 0.05
        self.gate_bias = nn.Parameter(torch.tensor(float(gate_bias))) if tau_head in GATES else None
        self.model = model
        self.tau_id = int(tau_id)
        d_model = model.get_input_embeddings().weight.shape[1]
        self.reader = PromptReader(d_model) if tau_head == "prompt_gate" else None
        self.delta = nn.Parameter(delta.clone() if delta is not None else torch.zeros(d_model))
        self.use_delta = use_delta
        self.tau_only = False  # set_trainable("tau"): only the <τ> decision learns
        # budget level → offset added to the <τ> logit when acting at that level (tw_rl/evaluation/calibration.py); {} = none
        self.tau_bias: dict[float, float] = {float(b): float(k) for b, k in (tau_bias or {}).items()}
        if model.get_output_embeddings().weight.shape[0] != self.n_actions:
            raise ValueError(f"the student's output layer has {model.get_output_embeddings().weight.shape[0]} rows "
                             f"but <τ> has id {tau_id}; <τ> must be the last of V ∪ {{<τ>}}")

    def set_trainable(self, which: str) -> None:
        """``all``: every parameter learns. ``tau``: only what decides ``<τ>`` — the output layer's ``<τ>`` row
        and the gate bias — so the token policy stays exactly as it is (the other rows' gradients are zeroed by
        :meth:`mask_grads`, which every learner calls before clipping)."""
        if which not in TRAINABLE:
            raise ValueError(f"trainable={which!r} is unknown; known: {TRAINABLE}")
        self.tau_only = which == "tau"
        self.requires_grad_(not self.tau_only)
        if self.tau_only:
            self.model.get_output_embeddings().weight.requires_grad_(True)
            if self.gate_bias is not None:
                self.gate_bias.requires_grad_(True)
            if self.reader is not None:
                self.reader.requires_grad_(True)

    def added_parameters(self) -> list[nn.Parameter]:
        """What the method adds to the model and that starts from scratch, besides the output layer's ``<τ>`` row
        (a row of a shared tensor: :class:`tw_rl.optim.AddedRateAdamW` rates it): δ, the gate bias, the prompt
        reader."""
        extra = [self.gate_bias] if self.gate_bias is not None else []
        return [self.delta, *extra, *(self.reader.parameters() if self.reader is not None else [])]

    def mask_grads(self) -> None:
        """With ``set_trainable("tau")``: zero the gradient of every output-layer row but ``<τ>``'s."""
        grad = self.model.get_output_embeddings().weight.grad
        if self.tau_only and grad is not None:
            grad[: self.tau_id].zero_()

    @property
    def n_actions(self) -> int:
        return self.tau_id + 1

    def tau_bias_for(self, budget: float) -> float:
        """The calibrated ``<τ>`` logit offset at ``budget``: the level's own, linearly interpolated between the two
        calibrated levels around an off-grid budget, the nearest level's beyond them; 0 when none is calibrated."""
        if not self.tau_bias:
            return 0.0
        levels = sorted(self.tau_bias)
        return float(np.interp(float(budget), levels, [self.tau_bias[b] for b in levels]))

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_base(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  use_delta: bool = True, tau_head: str = "token") -> "Student":
        """Add ``<τ>`` to ``tokenizer`` (in place) and to ``model``'s embeddings, as the last action."""
        if TAU_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([TAU_TOKEN], special_tokens=True)
        tau_id = tokenizer.convert_tokens_to_ids(TAU_TOKEN)
        if tau_id != len(tokenizer) - 1:
            raise ValueError(f"{TAU_TOKEN} got id {tau_id}, expected the last id {len(tokenizer) - 1}")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # start <τ> as an unlikely action: the student calls only once it has learned to
            model.get_output_embeddings().weight[tau_id].zero_()
        return cls(model, tau_id, use_delta=use_delta, tau_head=tau_head)

    def head(self, logits: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output-layer logits ``[..., |V|+1]`` → the soft Q-values over ``V ∪ {<τ>}``.

        ``token`` head: unchanged — ``<τ>`` is one more row of the output layer (SPEC §4). ``gate`` head:
        ``Q(s, <τ>) = u(s) + α·logsumexp_V Q(s, ·)/α`` (α = 1) with ``u(s) = w_τ·h + b`` (the ``<τ>`` row plus
        :attr:`gate_bias`): the value of asking is the student's own soft value of continuing plus a learned
        advantage. The policy then factorises as ``π(<τ>|s) = σ(u(s))``, ``π(v|s) = (1 − σ(u)) · softmax_V(Q)_v``,
        and greedy acting calls iff ``u(s) > log max_v softmax_V(Q)_v``: with ``u`` constant this is exactly the
        confidence-threshold rule, so the head can only add to what the student's own confidence knows
        (docs/design.md, "The <τ> head"). ``prompt_gate``: the same gate plus the :class:`PromptReader`'s reading
        of the input, ``prompt [B]`` (broadcast over positions), so that the call rule can depend on the budget the
        prompt states."""
        if self.tau_head == "token":
            return logits
        v = logits[..., :self.tau_id]
        tau = logits[..., self.tau_id:] + self.gate_bias + torch.logsumexp(v.float(), dim=-1, keepdim=True).to(v.dtype)
        if prompt is not None:
            tau = tau + prompt.reshape(prompt.shape[0], *([1] * (tau.dim() - 1))).to(tau.dtype)
        return torch.cat([v, tau], dim=-1)

    # ----------------------------------------------------------------------------------------------------------
    def decoder_embeds(self, tokens: torch.Tensor, teacher_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids and [B, L] bool → [B, L, d]: ``embed(y) + δ·1[y came from the teacher]``."""
        e = self.model.get_input_embeddings()(tokens)
        if self.use_delta:
            e = e + teacher_mask.unsqueeze(-1).to(e.dtype) * self.delta
        return e

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, dec_tokens: torch.Tensor,
                dec_teacher_mask: torch.Tensor, encoder_outputs=None, return_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training forward: logits ``[B, L, |V|+1]`` for every decoder position (position t is state s_t).

        ``return_hidden``: also the output layer's input ``h [B, L, d]`` at every position (the decoder state a
        value head reads, :class:`tw_rl.models.value.ValueHead`)."""
        out = forced(self.model, src_ids, src_mask, dec_embeds=self.decoder_embeds(dec_tokens, dec_teacher_mask),
                     hidden=return_hidden, prompt=self.reader is not None, encoder_outputs=encoder_outputs)
        logits = self.head(out.logits, self._read(out.prompt, out.prompt_mask))
        return (logits, out.hidden) if return_hidden else logits

    def _read(self, enc: torch.Tensor | None, src_mask: torch.Tensor) -> torch.Tensor | None:
        return None if self.reader is None or enc is None else self.reader(enc, src_mask)

    def start(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> Stepper:
        """What acting on these inputs keeps: the encoder's states (or a causal LM's input) and the KV cache."""
        return Stepper(self.model, src_ids, src_mask)

    def step(self, steps: Stepper, tokens: torch.Tensor, teacher_mask: torch.Tensor) -> torch.Tensor:
        """Acting forward: feed one decoder position ``[B]`` with the KV cache; returns logits ``[B, |V|+1]``."""
        logits = steps.feed(embeds=self.decoder_embeds(tokens[:, None], teacher_mask[:, None]),
                            read_prompt=self.reader is not None)[:, -1]
        return self.head(logits, self._read(steps.prompt, steps.prompt_mask))

    # ----------------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """HF format (safetensors) plus δ and the ``<τ>`` id."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        extra = {"delta": self.delta.detach().contiguous().cpu()}
        if self.gate_bias is not None:
            extra["gate_bias"] = self.gate_bias.detach().reshape(1).contiguous().cpu()
        if self.reader is not None:
            extra.update({f"reader.{k}": v.detach().contiguous().cpu() for k, v in self.reader.state_dict().items()})
        save_file(extra, str(d / _DELTA))
        self.save_meta(d)

    def save_meta(self, directory: str | Path) -> None:
        """``tw_student.json``: the ``<τ>`` id, whether δ is used and the calibrated ``<τ>`` offsets."""
        atomic_write(Path(directory) / _META, json.dumps(  # rewritten by calibration: never torn
            {"tau_id": self.tau_id, "tau_token": TAU_TOKEN, "use_delta": self.use_delta, "tau_head": self.tau_head,
             "tau_bias": {f"{b:g}": k for b, k in sorted(self.tau_bias.items())}}, indent=1))

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> tuple["Student", PreTrainedTokenizerBase]:
        d = Path(directory)
        if not (d / _META).is_file():
            raise ArtefactError(f"{d / _META} is missing: {d} is not a saved tw-rl student")
        try:
            meta = json.loads((d / _META).read_text())
            meta["tau_id"], meta["use_delta"]
        except (ValueError, KeyError, TypeError) as e:
            raise ArtefactError(f"{d / _META} is corrupt ({type(e).__name__}: {e})") from None
        try:
            auto = auto_model_class(AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code))
            model = auto.from_pretrained(d, use_safetensors=True, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(d)
            extra = load_file(str(d / _DELTA))
        except Exception as e:  # safetensors' SafetensorError, OSError, ValueError: the file is in the message
            raise ArtefactError(f"{d}: cannot load the student's files ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); a *.safetensors file there is "
                                f"missing, truncated or corrupt") from None
        tau_bias = {float(b): float(k) for b, k in meta.get("tau_bias", {}).items()}
        gate_bias = float(extra["gate_bias"]) if "gate_bias" in extra else GATE_BIAS_INIT
        student = cls(model, meta["tau_id"], delta=extra["delta"], use_delta=meta["use_delta"], tau_bias=tau_bias,
                      tau_head=meta.get("tau_head", "token"), gate_bias=gate_bias)
        if student.reader is not None:
            missing = [k for k in student.reader.state_dict() if f"reader.{k}" not in extra]
            if missing:
                raise ValueError(f"{d / _DELTA} lacks the prompt reader's weights {missing} (tau_head=prompt_gate)")
            student.reader.load_state_dict({k[len("reader."):]: v for k, v in extra.items() if k.startswith("reader.")})
        return student, tokenizer
