"""How well each call signal predicts where a call pays, on a trained run's validation split.

Training Wheels' caller, the confidence fallback and the oracle caller all rank the states of a decode and call at
the top-ranked ones; what separates them is the ranking. This script decodes the validation inputs greedily with
the student alone (no calls: the states every caller sees until its first call), scores every visited state with
the teacher (teacher-forced along the student's output), and measures each signal against two labels:

- *disagree*: the student's greedy token is not the teacher's greedy token (where the oracle caller calls);
- *gain*: ``log π_T(w*) − log π_T(student's token)`` (0 where they agree), the oracle caller's ranking.

Signals: ``confidence`` (``−log max_v π_S(v|s)``, the confidence fallback), ``tw`` (the student's own greedy call
margin at budget ``b``, ``Q(s, <τ>) − max_v Q(s, v)``: Training Wheels' caller; its calibrated offset shifts every
state alike, so it changes no ranking) and ``kl`` (``KL(π_T ‖ π_S)``, phase 1's oracle quantity; it reads the
teacher, so it is not deployable), and two callers fitted on the *training* split's states of the same decode
(``--fit-examples``): ``fit_linear`` (ridge regression of the gain on the standardised decoder state and
log-confidence: the best linear read-out of what Training Wheels' gate sees) and ``fit_mlp`` (a 64-unit MLP on the
same inputs, logistic loss on *disagree*: more capacity). For each: the AUC for *disagree*, and the share of the oracle's one-step gain it
captures when it calls at the top ``b`` fraction of states (the oracle's own top ``b`` by gain = 1; feedback of
calls on later states is ignored — a one-step measure, not a decode).

    .venv/bin/python bench/caller_signals.py RUN_DIR [--budget 0.2] [--examples 500] [--fit-examples 2000]
        [--student final|phase1]

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tw_rl  # noqa: E402
from tw_rl.decoding import decode  # noqa: E402
from tw_rl.examples import pad_batch  # noqa: E402
from tw_rl.models.student import Student  # noqa: E402
from tw_rl.oracle import kl_teacher_student  # noqa: E402


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for boolean ``label`` (Mann–Whitney, ties at half)."""
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gain_share(score: np.ndarray, gain: np.ndarray, rate: float) -> float:
    """Gain of the top ``rate`` fraction of states by ``score`` ÷ gain of the top ``rate`` by gain itself."""
    k = max(1, int(round(rate * len(score))))
    best = np.sort(gain)[::-1][:k].sum()
    return float(gain[np.argsort(-score, kind="mergesort")[:k]].sum() / best) if best > 0 else float("nan")


@torch.no_grad()
def states(model, student: Student, examples, budget: float, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Signals and labels at every state of the student's own greedy (call-free) decode of ``examples``, and the
    output layer's input there (``hidden [N, d]``)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("hidden", "confidence", "tw", "kl", "disagree", "gain")}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = pad_batch([model.student_src(e, budget) for e in chunk], model.pad_id)
        d = decode(student, ids, mask, max_len=model.max_len, eos_id=model.eos_id, teacher=model.teacher,
                   teacher_src=[e.teacher_src for e in chunk], start_id=model.start_id, pad_id=model.pad_id,
                   allow_tau=False)
        toks = torch.as_tensor(d.tokens)
        B = len(chunk)
        dec = torch.cat([torch.full((B, 1), model.start_id), toks[:, :-1]], 1)
        q, hidden = student(ids, mask, dec, torch.zeros_like(dec, dtype=torch.bool), return_hidden=True)
        q = q.float()
        outs = [d.tokens[j, :d.lengths[j]].tolist() for j in range(B)]
        t_logp = model.teacher.distributions([e.teacher_src for e in chunk], outs).float()
        T = t_logp.shape[1]
        q, toks = q[:, :T], toks[:, :T]
        V = t_logp.shape[-1]
        qv = q[..., :student.tau_id]
        margin = q[..., student.tau_id] - qv.amax(-1)
        log_conf = torch.log_softmax(qv, -1).amax(-1)
        chosen = t_logp.gather(-1, toks.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
        best, best_id = t_logp.max(-1)
        valid = torch.arange(T)[None, :] < torch.as_tensor(d.lengths)[:, None]
        cols = {"hidden": hidden[:, :T].float(), "confidence": -log_conf, "tw": margin,
                "kl": kl_teacher_student(t_logp, q), "disagree": best_id != toks, "gain": best - chosen}
        for k, v in cols.items():
            out[k].append(v[valid].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def fitted_callers(train: dict[str, np.ndarray], test: dict[str, np.ndarray], seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Scores on ``test`` of a ridge regression of the gain and of a 64-unit MLP for *disagree*, both fitted on
    ``train`` over the standardised ``[hidden, log-confidence]``."""
    def features(s: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([s["hidden"], -s["confidence"][:, None]], 1)

    x_tr, x_te = features(train), features(test)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    a = np.concatenate([x_tr, np.ones((len(x_tr), 1))], 1)
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ train["gain"].astype(np.float64))
    linear = np.concatenate([x_te, np.ones((len(x_te), 1))], 1) @ w
    torch.manual_seed(seed)
    xt, yt = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(train["disagree"], dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(300):
        idx = torch.randint(0, len(xt), (2048,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]).squeeze(-1), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mlp = net(torch.tensor(x_te, dtype=torch.float32)).squeeze(-1).numpy()
    return {"fit_linear": linear, "fit_mlp": mlp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--fit-examples", type=int, default=2000, help="training inputs whose states fit the fitted "
                   "callers (0: none)")
    p.add_argument("--student", choices=["final", "phase1"], default="final")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = tw_rl.load(args.run)
    student = model.student if args.student == "final" else Student.load(args.run / "models" / "phase1")[0].eval()
    validation = model.load_examples(model.cfg.data.validation_split, args.examples)
    s = states(model, student, validation, args.budget)
    disagree = s["disagree"].astype(bool)
    res = {"run": str(args.run), "student": args.student, "budget": args.budget, "split": "validation",
           "states": int(len(disagree)), "disagree_rate": round(float(disagree.mean()), 4), "signals": {}}
    if args.fit_examples > 0:
        train = states(model, student, model.load_examples(model.cfg.data.train_split, args.fit_examples),
                       args.budget)
        s.update(fitted_callers(train, s))
        res["fit_states"] = int(len(train["gain"]))
    for name in [k for k in ("confidence", "tw", "kl", "fit_linear", "fit_mlp") if k in s]:
        res["signals"][name] = {"auc_disagree": round(auc(s[name], disagree), 4),
                                "gain_share_at_b": round(gain_share(s[name], s["gain"], args.budget), 4)}
    for name, v in res["signals"].items():
        print(f"{name:11s} AUC(disagree) {v['auc_disagree']:.3f}   share of the oracle's one-step gain at "
              f"{args.budget:g}: {v['gain_share_at_b']:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
