"""Phase 1's optimizer: the parameters the method adds (δ, gate, prompt reader, the <τ> row) at their own rate."""

import copy

import pytest
import torch

from tests.conftest import tiny_causal
from tests.test_student import word_tokenizer
from tw_rl.models.student import Student
from tw_rl.optim import AddedRateAdamW
from tw_rl.pretrain import lr_at


def gate_student(seed=0):
    tok = word_tokenizer([f"w{i}" for i in range(13)])
    student = Student.from_base(tiny_causal("llama", len(tok), seed=seed), tok, tau_head="prompt_gate")
    assert student.model.get_output_embeddings().weight is student.model.get_input_embeddings().weight  # tied
    return student.train()


def loss_of(student, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 16, (4, 5), generator=g)
    dec = torch.randint(3, 16, (4, 4), generator=g)
    tmask = torch.rand(4, 4, generator=g) < 0.5
    logits = student(src, torch.ones_like(src, dtype=torch.bool), dec, tmask)
    target = torch.randint(0, student.n_actions, (4, 4), generator=g)  # <τ> among the targets
    target[:, 0] = student.tau_id
    return torch.nn.functional.cross_entropy(logits.reshape(-1, student.n_actions), target.reshape(-1))


def run(student, steps, **kw):
    opt = AddedRateAdamW(student, total_steps=steps, final_lr_fraction=0.1, **kw)
    for s in range(steps):
        opt.zero_grad()
        loss_of(student, s).backward()
        opt.step()
    return opt


def test_same_rate_is_plain_adamw_with_the_schedule():
    a, b = gate_student(), gate_student()
    run(a, 3, lr=1e-2)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for s in range(3):  # no warm-up, cosine to 0.1 of the rate
        for g in opt.param_groups:
            g["lr"] = lr_at(s, 3, 1e-2, 0, 0.1)
        opt.zero_grad()
        loss_of(b, s).backward()
        opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # bitwise: added_lr=None leaves every earlier run (the demo) as it was


def test_added_rate_moves_the_tau_row_as_its_own_group_would():
    """A reference where the <τ> row is a tensor of its own, in AdamW's group at added_lr: identical trajectory."""
    lr, added = 1e-3, 3e-2
    a, ref = gate_student(), gate_student()
    start = copy.deepcopy(ref.state_dict())
    run(a, 4, lr=lr, added_lr=added)

    # the reference: the <τ> row split off as its own leaf, rejoined in the forward
    emb = ref.model.get_output_embeddings().weight
    tau = ref.tau_id
    body_rows = torch.nn.Parameter(emb.detach()[:tau].clone())
    tau_row = torch.nn.Parameter(emb.detach()[tau:].clone())
    others = [p for n, p in ref.named_parameters() if p is not emb]
    added_ids = {id(p) for p in ref.added_parameters()}
    body = [p for p in others if id(p) not in added_ids] + [body_rows]
    opt = torch.optim.AdamW([{"params": body, "peak": lr}, {"params": ref.added_parameters() + [tau_row],
                                                            "peak": added}], lr=lr)
    for s in range(4):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, 4, g["peak"], 0, 0.1)
        with torch.no_grad():
            emb.copy_(torch.cat([body_rows, tau_row]))
        emb.requires_grad_(True)
        emb.grad = None
        opt.zero_grad()
        loss_of(ref, s).backward()
        body_rows.grad, tau_row.grad = emb.grad[:tau].clone(), emb.grad[tau:].clone()
        opt.step()
    with torch.no_grad():
        emb.copy_(torch.cat([body_rows, tau_row]))
    for (name, p), (_, q) in zip(a.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, msg=name, rtol=1e-5, atol=1e-6)

    # and the rates did differ: the <τ> row and the gate bias moved far more than at lr alone
    slow = gate_student()
    slow.load_state_dict(start)
    run(slow, 4, lr=lr)
    w0 = start["model.lm_head.weight"]
    moved = lambda s: (s.model.get_output_embeddings().weight[tau] - w0[tau]).norm().item()
    assert moved(a) > 10 * moved(slow)
    assert abs(a.gate_bias.item() + 3.0) > 10 * abs(slow.gate_bias.item() + 3.0)
    # the token rows moved at lr in both (the same up to the <τ> logit's effect on the softmax)
    rows = lambda s: (s.model.get_output_embeddings().weight[:tau] - w0[:tau]).norm().item()
    assert rows(a) == pytest.approx(rows(slow), rel=0.2)


def test_added_parameters_are_what_the_method_adds():
    s = gate_student()
    names = {n for n, p in s.named_parameters() if any(p is q for q in s.added_parameters())}
    assert names == {"delta", "gate_bias", "reader.query", "reader.weight"}
