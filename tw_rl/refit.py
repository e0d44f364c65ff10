"""Phase 1's last step: refit the gate's ``<τ>`` decision on the student's own states (``phase1.refit``; a
**[choice]**, docs/design.md "Refitting the gate on the student's own states").

Behaviour cloning (:mod:`tw_rl.oracle`) teaches ``<τ>`` at positions of the *teacher's* path, marked with the
*phase-0* student's KL and a fixed quota per sequence. The deployed student visits other states (its own prefixes,
teacher tokens where it called) and is no longer the phase-0 student, so on the demo the learned part of the gate
cost ~3 BLEU at b = 0.2 against the student's own confidence alone (docs/results.md). This step is one DAgger
iteration on the ``<τ>`` decision only, with the token policy frozen:

1. decode training inputs greedily with the student itself, each at one budget level of the grid (cycled);
2. score every visited state with SPEC §6's oracle quantity ``KL(π_T ‖ π_S)``, the teacher and the student
   teacher-forced along the student's own output;
3. fit ``KL̂(s) = w·x(s) + a·log max_v π_S(v|s) + c`` by ridge regression, ``x(s)`` the output layer's input;
4. write it into the gate head (:meth:`tw_rl.models.student.Student.head`), which represents *thresholding*
   ``KL̂`` exactly when ``a < 0``: with the ``<τ>`` row ``w/(−a)`` and the gate bias ``(c − q)/(−a)``,
   ``u(s) − log max_v π_S(v|s) = (KL̂(s) − q)/(−a)``, so greedy acting calls iff ``KL̂(s) > q + a·κ_b``
   (``κ_b`` the calibrated per-budget offset). ``q`` is the ``1 − b̄`` quantile of ``KL̂`` over the visited states
   (``b̄`` the mean positive budget), so the raw student (``κ = 0``, phase 2's rollouts) calls at about ``b̄``.

The same machinery serves phase 2's call learner (``rl.call_learner=rollout``; docs/design.md, "Phase 2's call
learner"): there the label at each visited state is not the oracle's KL but the **Monte-Carlo advantage of a call**
under SPEC §3's reward, ``A(s) = R(call at s) − R(no call at s)`` with ``R`` the teacher log-prob sum of the
output and both continuations decoded greedily by the student itself (:func:`call_advantages`), so the gate learns
from the reward alone which calls pay off for the policy as it is deployed.

No Ray here: the teacher is any :class:`tw_rl.envs.token_mdp.TeacherClient` (``distributions`` for the KL, ``score``
for the advantage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from tw_rl.envs.token_mdp import Example
from tw_rl.decoding import Decoded, decode
from tw_rl.examples import pad_batch
from tw_rl.models.student import Student
from tw_rl.oracle import kl_teacher_student


TARGETS = ("kl", "advantage")


@dataclass
class GateStates:
    """The states the student visited: the output layer's input, its log-confidence and the label to fit there
    (``kl``: the oracle's ``KL(π_T ‖ π_S)``; ``advantage``: the Monte-Carlo advantage of a call)."""

    x: torch.Tensor  # [N, d]
    log_conf: torch.Tensor  # [N]: log max_{v ∈ V} π_S(v | s)
    target: torch.Tensor  # [N]: the label at s
    calls: int  # teacher calls made while decoding (usage of the raw student)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @staticmethod
    def concat(parts: Sequence["GateStates"]) -> "GateStates":
        """The states of several collections (e.g. one per rollout worker), in order."""
        return GateStates(torch.cat([p.x for p in parts]), torch.cat([p.log_conf for p in parts]),
                          torch.cat([p.target for p in parts]), sum(p.calls for p in parts))


@dataclass
class GateFit:
    """The fitted predictor ``KL̂ = w·x + a·log_conf + c`` (or ``Â``, the advantage) and the raw call threshold
    ``q``."""

    weight: torch.Tensor  # [d]: w
    coef_conf: float  # a
    intercept: float  # c
    threshold: float  # q
    r2: float  # of KL̂ on the visited states
    positions: int
    raw_usage_before: float  # calls / output tokens of the student before the refit

    def predict(self, x: torch.Tensor, log_conf: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight.double() + self.coef_conf * log_conf.double() + self.intercept

    def as_dict(self) -> dict:
        return {"refit/coef_conf": round(self.coef_conf, 4), "refit/intercept": round(self.intercept, 4),
                "refit/threshold": round(self.threshold, 4), "refit/r2": round(self.r2, 4),
                "refit/positions": self.positions, "refit/raw_usage_before": round(self.raw_usage_before, 4)}


def ridge(features: torch.Tensor, target: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Ridge regression with an unpenalised intercept, on standardised columns (so ``l2`` means the same for every
    model width): minimises ``mean((F β + c − y)²) + l2 · |β ⊙ σ|²`` (``σ`` the columns' standard deviations).
    Returns ``β`` in the raw feature space and ``c``. Float64, closed form."""
    F, y = features.double(), target.double()
    mu, sd = F.mean(0), F.std(0, unbiased=False).clamp(min=1e-12)
    Z = (F - mu) / sd
    yc = y - y.mean()
    n = Z.shape[0]
    beta_z = torch.linalg.solve(Z.T @ Z / n + l2 * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T @ yc / n)
    beta = beta_z / sd
    return beta, float(y.mean() - mu @ beta)


def fit_gate(states: GateStates, call_rate: float, l2: float, setting: str = "phase1.refit",
             examples_key: str = "phase1.refit_examples") -> GateFit:
    """Fit the label of ``states`` and the threshold ``q`` above which a fraction ``call_rate`` of them lie. Raises
    ValueError (naming ``setting``) when the fit gives ``a ≥ 0`` (higher confidence predicting a *larger* KL or
    advantage), which the gate head cannot represent, or when there are too few states (raise ``examples_key``)."""
    if len(states) < states.x.shape[1] + 2:
        raise ValueError(f"{setting}: {len(states)} visited states are too few to fit {states.x.shape[1] + 2} "
                         f"coefficients; raise {examples_key}")
    beta, c = ridge(torch.cat([states.x, states.log_conf[:, None]], 1), states.target, l2)
    w, a = beta[:-1], float(beta[-1])
    if a >= 0:
        raise ValueError(f"{setting}: the fitted coefficient of the student's log-confidence is {a:.4g} ≥ 0, so "
                         f"the gate head cannot represent the fit; turn {setting} off")
    fit = GateFit(w, a, c, 0.0, 0.0, len(states), states.calls / max(len(states), 1))
    pred = fit.predict(states.x, states.log_conf)
    y = states.target.double()
    fit.r2 = float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-12))
    fit.threshold = float(torch.quantile(pred, 1.0 - call_rate)) if call_rate > 0 else float(pred.max())
    return fit


@torch.no_grad()
def write_gate(student: Student, fit: GateFit) -> None:
    """Set the ``<τ>`` row and the gate bias so that ``u(s) − log max π_S = (KL̂(s) − q)/(−a)``."""
    if student.tau_head != "gate":
        raise ValueError(f"phase1.refit needs the gate head (student.tau_head=gate), not {student.tau_head!r}")
    scale = -fit.coef_conf
    row = student.model.get_output_embeddings().weight
    row[student.tau_id] = (fit.weight / scale).to(row.dtype)
    student.gate_bias.fill_((fit.intercept - fit.threshold) / scale)


@torch.no_grad()
def collect_states(student: Student, teacher, examples: Sequence[Example], budgets: Sequence[float], *,
                   max_len: int, eos_id: int, pad_id: int = 0, start_id: int = 0, batch_size: int = 128,
                   target: str = "kl", flip_batch: int = 1024) -> GateStates:
    """Greedy decoding of ``examples`` by ``student`` itself, example ``i`` at ``budgets[i % len(budgets)]``; then the
    output layer's input, the student's log-confidence and the label ``target`` at every visited state:
    ``kl``, ``KL(π_T ‖ π_S)``; ``advantage``, :func:`call_advantages` (``flip_batch`` flipped paths at a time)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    if not budgets:
        raise ValueError("collect_states needs at least one budget level")
    lm = student.model.get_output_embeddings()
    device = lm.weight.device  # decoding runs where the student is; the states come back on the CPU
    captured: list[torch.Tensor] = []
    hook = lm.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))
    xs, confs, labels, calls = [], [], [], 0
    was_training = student.training
    student.eval()
    try:
        for k, b in enumerate(budgets):
            chunk_all = list(examples[k::len(budgets)])
            for i in range(0, len(chunk_all), batch_size):
                chunk = chunk_all[i:i + batch_size]
                ids, mask = pad_batch([e.student_src[b] for e in chunk], pad_id, device)
                teacher_src = [e.teacher_src for e in chunk]
                d = decode(student, ids, mask, max_len=max_len, eos_id=eos_id, teacher=teacher,
                           teacher_src=teacher_src, start_id=start_id, pad_id=pad_id, allow_tau=b > 0)
                calls += int(d.teacher_mask.sum())
                toks, tm = torch.as_tensor(d.tokens), torch.as_tensor(d.teacher_mask)
                B = len(chunk)
                dec = torch.cat([torch.full((B, 1), start_id), toks[:, :-1]], 1)
                dec_tm = torch.cat([torch.zeros(B, 1, dtype=torch.bool), tm[:, :-1]], 1)
                captured.clear()
                logits = student(ids, mask, dec.to(device), dec_tm.to(device)).float().cpu()
                x = captured[-1].cpu()
                if target == "kl":
                    outs = [d.tokens[j, :d.lengths[j]].tolist() for j in range(B)]
                    t_logp = torch.as_tensor(teacher.distributions(teacher_src, outs)).float().cpu()
                    label = kl_teacher_student(t_logp, logits)  # [B, T]
                else:
                    label = call_advantages(student, teacher, ids, mask, teacher_src, d, allow_tau=b > 0,
                                            max_len=max_len, eos_id=eos_id, pad_id=pad_id, start_id=start_id,
                                            flip_batch=flip_batch)
                conf = torch.log_softmax(logits[..., :student.tau_id], -1).amax(-1)
                valid = torch.arange(toks.shape[1])[None, :] < torch.as_tensor(d.lengths)[:, None]
                xs.append(x[valid].float())
                confs.append(conf[valid])
                labels.append(label[valid])
    finally:
        hook.remove()
        student.train(was_training)
    return GateStates(torch.cat(xs), torch.cat(confs), torch.cat(labels), calls)


@torch.no_grad()
def call_advantages(student: Student, teacher, src_ids: torch.Tensor, src_mask: torch.Tensor,
                    teacher_src: Sequence[Sequence[int]], base: Decoded, *, max_len: int, eos_id: int,
                    pad_id: int = 0, start_id: int = 0, allow_tau: bool = True, flip_batch: int = 1024
                    ) -> torch.Tensor:
    """The Monte-Carlo advantage of a call at every state of ``base`` (the student's greedy paths from
    ``src_ids``): ``A[i, t] = R(call at t) − R(no call at t)``, ``R`` SPEC §3's return (the sum of the teacher's
    log-probs of the output tokens, γ = 1), the path after ``t`` decoded greedily by ``student`` (its own ``<τ>``
    decisions included) in both branches. One branch is ``base`` itself; the other repeats ``base`` up to ``t`` and
    flips the decision there (``decode(..., flip_at=, replay=)``): one extra decode per state, ``flip_batch`` rows
    at a time, each batch scored by one ``teacher.score`` call. Returns ``[B, T]`` like ``base.tokens`` (0 beyond
    each row's length)."""
    B = len(teacher_src)
    outs = [base.tokens[j, :base.lengths[j]].tolist() for j in range(B)]
    r_base = torch.tensor([float(np.sum(r)) for r in teacher.score(teacher_src, outs)], dtype=torch.float64)
    called = torch.as_tensor(base.teacher_mask).bool()
    base_tokens = torch.as_tensor(base.tokens)
    adv = torch.zeros(base.tokens.shape, dtype=torch.float32)
    rows = [(j, t) for j in range(B) for t in range(int(base.lengths[j]))]
    for s in range(0, len(rows), flip_batch):
        jj = torch.as_tensor([j for j, _ in rows[s:s + flip_batch]])
        tt = torch.as_tensor([t for _, t in rows[s:s + flip_batch]])
        src = [teacher_src[j] for j in jj.tolist()]
        on = jj.to(src_ids.device)
        f = decode(student, src_ids[on], src_mask[on], max_len=max_len, eos_id=eos_id, teacher=teacher,
                   teacher_src=src, start_id=start_id, pad_id=pad_id, allow_tau=allow_tau, flip_at=tt,
                   replay=(base_tokens[jj], called[jj]))
        r_flip = torch.tensor([float(np.sum(r)) for r in
                               teacher.score(src, [f.tokens[i, :f.lengths[i]].tolist() for i in range(len(jj))])],
                              dtype=torch.float64)
        diff = r_flip - r_base[jj]  # the flipped branch minus the base: sign by which branch called at t
        adv[jj, tt] = torch.where(called[jj, tt], -diff, diff).float()
    return adv


def refit_gate(student: Student, teacher, examples: Sequence[Example], budgets: Sequence[float], *, l2: float,
               max_len: int, eos_id: int, pad_id: int = 0, start_id: int = 0, batch_size: int = 128) -> GateFit:
    """Collect the student's states at the positive levels of ``budgets``, fit ``KL̂`` and write it into the gate
    (raw call rate: the mean positive budget). Only the ``<τ>`` row and the gate bias change."""
    if student.tau_head != "gate":
        raise ValueError(f"phase1.refit needs the gate head (student.tau_head=gate), not {student.tau_head!r}")
    levels = [float(b) for b in budgets if b > 0]
    states = collect_states(student, teacher, examples, levels, max_len=max_len, eos_id=eos_id, pad_id=pad_id,
                            start_id=start_id, batch_size=batch_size)
    return write_fit(student, states, levels, l2)


def write_fit(student: Student, states: GateStates, levels: Sequence[float], l2: float, **names) -> GateFit:
    """Fit the label of ``states`` and write it into ``student``'s gate, with the raw call rate at the mean of the
    positive budget ``levels`` (the calibrated offsets do the rest); ``names``: :func:`fit_gate`'s setting names
    for its errors."""
    fit = fit_gate(states, call_rate=float(np.mean(levels)), l2=l2, **names)
    write_gate(student, fit)
    return fit
