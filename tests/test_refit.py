"""The gate refit (tw_rl/refit.py): ridge against its closed form, the written gate thresholds the fitted KL exactly,
and on a tiny student only the <τ> decision changes."""

import numpy as np
import pytest
import torch

from tests.conftest import V, CountingTeacher, tiny_t5
from tw_rl.models.student import Student
from tw_rl.oracle import kl_teacher_student
from tw_rl.refit import GateFit, GateStates, collect_states, fit_gate, refit_gate, ridge, write_gate


def test_ridge_without_penalty_is_least_squares():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = F @ torch.tensor([0.5, -0.2, 3.0, 0.0, 1.0]) + 0.7 + 0.1 * torch.randn(200, generator=g)
    beta, c = ridge(F, y, l2=0.0)
    A = np.c_[F.double().numpy(), np.ones(200)]
    sol = np.linalg.lstsq(A, y.double().numpy(), rcond=None)[0]
    np.testing.assert_allclose(beta.numpy(), sol[:-1], rtol=1e-7, atol=1e-9)
    assert c == pytest.approx(sol[-1], rel=1e-7)


def test_ridge_penalty_matches_the_closed_form_on_standardised_columns():
    g = torch.Generator().manual_seed(1)
    F = torch.randn(100, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2])
    y = torch.randn(100, generator=g)
    l2 = 0.3
    beta, c = ridge(F, y, l2)
    Fd, yd = F.double().numpy(), y.double().numpy()
    mu, sd = Fd.mean(0), Fd.std(0)
    Z = (Fd - mu) / sd
    bz = np.linalg.solve(Z.T @ Z / 100 + l2 * np.eye(3), Z.T @ (yd - yd.mean()) / 100)
    np.testing.assert_allclose(beta.numpy(), bz / sd, rtol=1e-9)
    # the penalty shrinks: |β ⊙ σ| is smaller than without it
    assert np.linalg.norm(beta.numpy() * sd) < np.linalg.norm(ridge(F, y, 0.0)[0].numpy() * sd)
    assert c == pytest.approx(yd.mean() - mu @ (bz / sd))


def _states(n: int = 400, d: int = 16, a: float = -1.5, seed: int = 0) -> tuple[GateStates, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    log_conf = -torch.rand(n, generator=g) * 3
    w = torch.randn(d, generator=g)
    kl = x @ w + a * log_conf + 0.4
    return GateStates(x, log_conf, kl, calls=0), w


def test_fit_gate_recovers_a_linear_kl_and_its_call_rate():
    states, w = _states()
    fit = fit_gate(states, call_rate=0.2, l2=0.0)
    np.testing.assert_allclose(fit.weight.numpy(), w.numpy(), atol=1e-6)
    assert fit.coef_conf == pytest.approx(-1.5, abs=1e-6)
    assert fit.intercept == pytest.approx(0.4, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    rate = float((fit.predict(states.x, states.log_conf) > fit.threshold).double().mean())
    assert rate == pytest.approx(0.2, abs=0.01)


def test_fit_gate_rejects_a_fit_the_gate_cannot_represent():
    states, _ = _states(a=+1.0)
    with pytest.raises(ValueError, match="log-confidence is .* ≥ 0"):
        fit_gate(states, call_rate=0.2, l2=0.0)
    with pytest.raises(ValueError, match="too few"):
        fit_gate(GateStates(states.x[:5], states.log_conf[:5], states.target[:5], 0), call_rate=0.2, l2=0.0)


def _gate_student(seed: int = 2) -> Student:
    base = tiny_t5(V, seed=seed)
    base.resize_token_embeddings(V + 1)
    return Student(base, tau_id=V, tau_head="gate").eval()


def test_written_gate_calls_exactly_where_the_fitted_kl_exceeds_the_threshold():
    """``u(s) − log max π_S(v|s) = (KL̂(s) − q)/(−a)``: the greedy call at offset κ is ``KL̂ > q + a·κ``."""
    student = _gate_student()
    lm = student.model.get_output_embeddings()
    d = lm.weight.shape[1]
    g = torch.Generator().manual_seed(5)
    fit = GateFit(weight=torch.randn(d, generator=g).double(), coef_conf=-0.7, intercept=0.3, threshold=0.9, r2=1.0,
                  positions=0, raw_usage_before=0.0)
    token_rows = lm.weight[:V].clone()
    write_gate(student, fit)
    assert torch.equal(lm.weight[:V], token_rows)
    seen = []
    hook = lm.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    src = torch.randint(2, V, (4, 6), generator=g)
    dec = torch.randint(2, V, (4, 5), generator=g)
    with torch.no_grad():
        q = student(src, torch.ones_like(src, dtype=torch.bool), dec, torch.zeros_like(dec, dtype=torch.bool))
    hook.remove()
    log_conf = torch.log_softmax(q[..., :V], -1).amax(-1)
    pred = fit.predict(seen[-1].reshape(-1, d), log_conf.reshape(-1)).reshape(log_conf.shape)
    margin = (q[..., V] - q[..., :V].amax(-1)).double()  # Q(<τ>) − max_v Q(v)
    torch.testing.assert_close(margin, (pred - fit.threshold) / 0.7, atol=1e-4, rtol=1e-4)
    for kappa in (-1.0, 0.0, 0.5):
        calls = (margin + kappa > 0)
        assert torch.equal(calls, pred > fit.threshold + fit.coef_conf * kappa)


def test_write_gate_needs_the_gate_head(toy):
    with pytest.raises(ValueError, match="tau_head=gate"):
        write_gate(toy["student"], GateFit(torch.zeros(16), -1.0, 0.0, 0.0, 1.0, 0, 0.0))


def test_refit_on_a_tiny_student_changes_only_the_tau_decision(toy):
    """A random teacher and student on random inputs, where the fit's confidence coefficient comes out negative
    (its sign is a property of the data; on the trained toy pair it is positive and the refit refuses)."""
    from tw_rl.envs.token_mdp import Example
    from tests.conftest import EOS, tiny_t5
    from tw_rl.teacher import Teacher

    student = _gate_student(seed=7)
    teacher = Teacher(tiny_t5(V, d_model=32, seed=1), vocab_size=V)
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(6):
        src = torch.randint(2, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() + [EOS]
        examples.append(Example(teacher_src=src, student_src={b: [2 + int(10 * b)] + src for b in (0.0, 0.2, 0.5)}))
    examples = examples * 20
    before = {k: v.clone() for k, v in student.state_dict().items()}
    states = collect_states(student, teacher, examples, [0.2, 0.5], max_len=8, eos_id=toy["eos"])
    assert len(states) > 50 and torch.isfinite(states.target).all() and (states.target >= -1e-5).all()
    assert (states.log_conf <= 0).all()
    fit = refit_gate(student, teacher, examples, [0.0, 0.2, 0.5], l2=1e-3, max_len=8, eos_id=toy["eos"])
    assert fit.coef_conf < 0 and fit.positions == len(states)
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {"model.shared.weight", "model.lm_head.weight", "gate_bias",
                       "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    lm = student.model.get_output_embeddings().weight
    torch.testing.assert_close(lm[:V], before["model.lm_head.weight"][:V] if "model.lm_head.weight" in before
                               else before["model.shared.weight"][:V], atol=0, rtol=0)
    # the raw student (κ = 0) calls at about the mean positive budget (0.35) on the states it was fitted on
    pred = fit.predict(states.x, states.log_conf)
    assert float((pred > fit.threshold).double().mean()) == pytest.approx(0.35, abs=0.02)


def test_collect_states_kl_matches_a_direct_teacher_forced_computation(toy):
    student = _gate_student(seed=3)
    teacher, ex = toy["teacher"], toy["examples"][:2]
    states = collect_states(student, teacher, ex, [0.2], max_len=6, eos_id=toy["eos"])
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch
    ids, mask = pad_batch([e.student_src[0.2] for e in ex], 0)
    d = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=teacher,
               teacher_src=[e.teacher_src for e in ex], allow_tau=True)
    kls = []
    for j, e in enumerate(ex):
        n = int(d.lengths[j])
        toks = torch.as_tensor(d.tokens[j:j + 1, :n])
        tm = torch.as_tensor(d.teacher_mask[j:j + 1, :n])
        dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), toks[:, :-1]], 1)
        dtm = torch.cat([torch.zeros(1, 1, dtype=torch.bool), tm[:, :-1]], 1)
        src = torch.as_tensor([e.student_src[0.2]])
        with torch.no_grad():
            logits = student(src, torch.ones_like(src, dtype=torch.bool), dec, dtm)
        t = teacher.distributions([e.teacher_src], [toks[0].tolist()])
        kls.append(kl_teacher_student(t[0, :n], logits[0, :n]))
    torch.testing.assert_close(states.target, torch.cat(kls), atol=1e-4, rtol=1e-4)


def _mixed_caller() -> Student:
    """A gate student whose random ``<τ>`` row makes it call at some of its states and not at others (with
    :func:`_other_teacher`, on the toy examples)."""
    student = _gate_student(seed=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        lm = student.model.get_output_embeddings().weight
        lm[V] = 3 * torch.randn(lm.shape[1], generator=g)
        student.gate_bias.fill_(0.0)
    return student


def _other_teacher():
    """A toy teacher whose greedy tokens vary (the session's toy pair mostly emits token 0, where calls change
    nothing)."""
    from tw_rl.teacher import Teacher

    return Teacher(tiny_t5(V, d_model=32, seed=4), vocab_size=V)


def _env_return(student, teacher, ex, budget, max_len, eos, flip_t):
    """SPEC §3's return of one greedy episode stepped through the token MDP by hand (full forward, no cache), the
    ``<τ>`` decision at step ``flip_t`` taken the other way; also whether the unflipped policy called there."""
    from tw_rl.envs.token_mdp import TokenMDPBatch

    env = TokenMDPBatch(teacher, tau_id=V, eos_id=eos, max_len=max_len)
    env.reset([ex], [budget], lam=0.0)
    src = torch.as_tensor([ex.student_src[budget]])
    ret, t, policy_called = 0.0, 0, None
    while not env.done[0]:
        dec = torch.as_tensor([[0] + env.tokens[0, :t].tolist()])
        dtm = torch.as_tensor([[False] + env.teacher_mask[0, :t].tolist()])
        with torch.no_grad():
            q = student(src, torch.ones_like(src, dtype=torch.bool), dec, dtm)[0, -1]
        a = int(q.argmax())
        if t == flip_t:
            policy_called = a == V
            a = int(q[:V].argmax()) if a == V else V
        r, *_ = env.step([a])
        ret += float(r[0])
        t += 1
    return ret, policy_called


def test_call_advantages_equal_returns_of_hand_stepped_episodes(toy):
    """``A[i, t] = R(call at t) − R(no call at t)``, each return summed from the token MDP's own rewards (λ = 0)."""
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch
    from tw_rl.refit import call_advantages

    student, teacher = _mixed_caller(), _other_teacher()
    ex = toy["examples"][:3]
    ids, mask = pad_batch([e.student_src[0.5] for e in ex], 0)
    src = [e.teacher_src for e in ex]
    base = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=teacher, teacher_src=src)
    adv = call_advantages(student, teacher, ids, mask, src, base, max_len=6, eos_id=toy["eos"], flip_batch=5)
    seen_called = set()
    for j, e in enumerate(ex):
        r_base, _ = _env_return(student, teacher, e, 0.5, 6, toy["eos"], flip_t=-1)
        for t in range(int(base.lengths[j])):
            r_flip, called = _env_return(student, teacher, e, 0.5, 6, toy["eos"], flip_t=t)
            assert called == bool(base.teacher_mask[j, t])
            seen_called.add(called)
            want = (r_base - r_flip) if called else (r_flip - r_base)
            assert float(adv[j, t]) == pytest.approx(want, abs=1e-4)
        assert torch.all(adv[j, int(base.lengths[j]):] == 0)
    assert seen_called == {True, False}  # both sides of the decision were checked
    assert float(adv.abs().max()) > 0.1  # and the branches' returns differ


def test_collect_states_with_advantages_lines_up_with_the_visited_states(toy):
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch
    from tw_rl.refit import call_advantages

    student, teacher = _mixed_caller(), _other_teacher()
    ex = toy["examples"][:4]
    states = collect_states(student, teacher, ex, [0.5], max_len=6, eos_id=toy["eos"], target="advantage")
    kl_states = collect_states(student, teacher, ex, [0.5], max_len=6, eos_id=toy["eos"])
    torch.testing.assert_close(states.x, kl_states.x)  # the same states, only the label differs
    torch.testing.assert_close(states.log_conf, kl_states.log_conf)
    ids, mask = pad_batch([e.student_src[0.5] for e in ex], 0)
    src = [e.teacher_src for e in ex]
    base = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=teacher, teacher_src=src)
    adv = call_advantages(student, teacher, ids, mask, src, base, max_len=6, eos_id=toy["eos"])
    valid = torch.arange(adv.shape[1])[None, :] < torch.as_tensor(base.lengths)[:, None]
    torch.testing.assert_close(states.target, adv[valid])
    assert states.calls == int(base.teacher_mask.sum()) > 0
    with pytest.raises(ValueError, match="target='value'"):
        collect_states(student, teacher, ex, [0.5], max_len=6, eos_id=toy["eos"], target="value")


def test_flip_with_replay_decodes_the_same_paths_with_fewer_teacher_requests(toy):
    """``decode(flip_at=, replay=)`` repeats the unflipped path up to the flip without asking the teacher for the
    tokens it already gave there; the flipped paths equal those decoded from scratch, and differ from the base
    path exactly from the flip on."""
    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch

    student, teacher = _mixed_caller(), _other_teacher()
    ex = toy["examples"][:4]
    ids, mask = pad_batch([e.student_src[0.5] for e in ex], 0)
    src = [e.teacher_src for e in ex]
    base = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=teacher, teacher_src=src)
    for t in range(3):
        flip = torch.full((len(ex),), t)
        plain, replayed = CountingTeacher(teacher), CountingTeacher(teacher)
        a = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=plain, teacher_src=src, flip_at=flip)
        b = decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=replayed, teacher_src=src, flip_at=flip,
                   replay=(torch.as_tensor(base.tokens), torch.as_tensor(base.teacher_mask)))
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.teacher_mask, b.teacher_mask)
        np.testing.assert_array_equal(a.teacher_mask[:, :t], base.teacher_mask[:, :t])
        assert (a.teacher_mask[:, t] != base.teacher_mask[:, t]).all()  # the decision at t is flipped
        saved = int(base.teacher_mask[:, :t].sum())
        assert plain.rows - replayed.rows == saved
    assert saved > 0
    with pytest.raises(ValueError, match="replay needs flip_at"):
        decode(student, ids, mask, max_len=6, eos_id=toy["eos"], teacher=teacher, teacher_src=src,
               replay=(torch.as_tensor(base.tokens), torch.as_tensor(base.teacher_mask)))
