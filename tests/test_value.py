"""PCL that bootstraps (rl.value=learned): the value head V_φ and the cost value V_C (SPEC §4, §5).

Closed forms on a tabular token MDP with priced <τ> calls, and tiny learners that must recover known values."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_pcl import GRUStudent, HORIZON, PAD, START, VOCAB, depth_offsets, exact_kl, random_teacher, \
    sample_episodes
from tw_rl.algos.pcl import PCLLearner, cost_value_loss, lagrangian_rewards, pcl_consistency, pcl_loss, usage_costs
from tw_rl.batch import Episode, EpisodeBatch
from tw_rl.budget import BudgetMultipliers
from tw_rl.config import Config, RLConfig, load_config, training_budgets
from tw_rl.models.value import ValueHead


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# a tabular token MDP with <τ>: the state is the sequence of (token, from_teacher) pairs
# --------------------------------------------------------------------------------------------------------------
TOK, H = 3, 3  # tokens 0..2, action 3 = <τ>
TAU = TOK


def teacher_table(rng: np.random.Generator) -> dict[tuple[int, ...], np.ndarray]:
    """log π_T(· | X_out) for every output prefix of tokens (the teacher sees X_out only, SPEC §2)."""
    table = {}
    for k in range(H):
        for p in itertools.product(range(TOK), repeat=k):
            z = 1.5 * rng.normal(size=TOK)
            table[p] = z - np.logaddexp.reduce(z)
    return table


def step(state: tuple, a: int, log_pt: dict, lam: float, b: float) -> tuple[tuple, float, int, float]:
    """(next state, token, reward with the Lagrangian, log π_T of the token)."""
    out = tuple(t for t, _ in state)
    lp = log_pt[out]
    if a == TAU:
        w = int(np.argmax(lp))
        return state + ((w, True),), float(lp[w]) - lam * (1 - b), w, float(lp[w])
    return state + ((a, False),), float(lp[a]) - lam * (0 - b), a, float(lp[a])


def soft_optimum(log_pt: dict, lam: float, b: float, alpha: float, gamma: float) -> tuple[dict, dict]:
    """Exact Q*(s, ·) and V*(s) by soft value iteration over every reachable state; V* = 0 at depth H."""
    q, v = {}, {}

    def solve(state: tuple) -> float:
        if len(state) == H:
            v[state] = 0.0
            return 0.0
        qs = np.zeros(TOK + 1)
        for a in range(TOK + 1):
            nxt, r, _, _ = step(state, a, log_pt, lam, b)
            qs[a] = r + gamma * solve(nxt)
        q[state] = qs
        v[state] = float(alpha * np.logaddexp.reduce(qs / alpha))
        return v[state]

    solve(())
    return q, v


def paths(log_pt: dict, lam: float, b: float, rng: np.random.Generator, n: int) -> list[tuple[Episode, list]]:
    """``n`` episodes with uniformly random actions (any path: consistency holds off-policy) and their states."""
    out = []
    for _ in range(n):
        state, states, actions, tokens, tlp = (), [()], [], [], []
        for _ in range(H):
            a = int(rng.integers(TOK + 1))
            state, _, y, lp = step(state, a, log_pt, lam, b)
            actions.append(a), tokens.append(y), tlp.append(lp), states.append(state)
        # a <τ> whose teacher token is y is stored as action TAU, token y (Episode.teacher_mask = actions != tokens)
        out.append((Episode(src_ids=np.array([0]), actions=np.array(actions), tokens=np.array(tokens),
                            teacher_logprobs=np.array(tlp, np.float32), behavior_logprobs=np.zeros(H, np.float32),
                            budget=b, terminated=True), states))
    return out


@pytest.mark.parametrize("alpha,gamma", [(1.0, 1.0), (0.7, 0.9)])
def test_learned_value_residuals_vanish_at_the_soft_optimum_with_priced_calls(alpha, gamma) -> None:
    """λ > 0: the optimum is not π_T and V* ≠ 0; with V = V* and Q = Q* every residual of every window is ~0 on
    random paths, and clearly not with a perturbed value."""
    rng = np.random.default_rng(0)
    log_pt, lam, b = teacher_table(rng), 0.8, 0.2
    q_star, v_star = soft_optimum(log_pt, lam, b, alpha, gamma)
    assert max(abs(x) for x in v_star.values()) > 0.1  # priced calls: V* is not the zero of SPEC §3
    eps = paths(log_pt, lam, b, rng, 16)
    batch = EpisodeBatch.collate([e for e, _ in eps])
    q = torch.tensor(np.stack([[q_star.get(s, np.zeros(TOK + 1)) for s in states] for _, states in eps]))
    v = torch.tensor([[v_star[s] for s in states] for _, states in eps])
    rewards = lagrangian_rewards(batch, torch.full((len(eps),), lam))
    args = (batch.actions, rewards, batch.mask, batch.lengths, batch.terminated, alpha, gamma)
    for window in (1, 2, 0):
        c = pcl_consistency(q, None, *args, window=window, value="learned", v=v, v_target=v)
        assert c.abs().max() < 1e-5, (window, c)
        noisy = v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        c_bad = pcl_consistency(q, None, *args, window=window, value="learned", v=noisy, v_target=noisy)
        assert c_bad.abs().mean() > 0.05


def _default_learner(seed: int = 0) -> tuple[PCLLearner, EpisodeBatch]:
    off = depth_offsets(VOCAB, HORIZON)
    log_pt = random_teacher(VOCAB, HORIZON, np.random.default_rng(7))
    learner = PCLLearner(RLConfig(), GRUStudent(VOCAB, seed=seed), START, PAD, max_len=HORIZON)
    batch = EpisodeBatch.collate(sample_episodes(learner.student, log_pt, 16, torch.Generator().manual_seed(0),
                                                 off), pad_id=PAD)
    with torch.no_grad():  # a value head that predicts something (a fresh one predicts 0 everywhere)
        for head in (learner.value, learner.value_target):
            torch.manual_seed(3)
            nn.init.normal_(head.net[-1].weight, std=0.5)
    return learner, batch


def test_default_loss_bootstraps_target_gamma_and_window_change_it() -> None:
    """The default PCL (rl.value=learned, multi-step mix) depends on the Polyak target, on γ and on the window —
    with value=zero and single-step none of them would."""
    assert RLConfig().value == "learned" and RLConfig().multi_step_weight > 0
    learner, batch = _default_learner()
    lam = torch.zeros(len(batch))

    def loss() -> float:
        with torch.no_grad():
            return float(learner.compute_loss(batch, lam)[0])

    base = loss()
    with torch.no_grad():
        learner.value_target.net[-1].bias.add_(1.0)  # perturb the target network only
    assert abs(loss() - base) > 1e-3
    with torch.no_grad():
        learner.value_target.net[-1].bias.sub_(1.0)
    assert loss() == pytest.approx(base, abs=1e-7)
    for change in (dict(gamma=0.5), dict(window=2)):
        learner.cfg = RLConfig(**change)
        assert abs(loss() - base) > 1e-4, change
    learner.cfg = RLConfig()


def test_value_head_recovers_the_soft_value_of_a_fixed_policy() -> None:
    """Warm start = regression on Monte-Carlo soft returns: with α = 1 and rewards log π_T, the soft value of the
    start state is −KL(π ‖ π_T) exactly (SPEC §3), which the head must recover."""
    off = depth_offsets(VOCAB, HORIZON)
    log_pt = random_teacher(VOCAB, HORIZON, np.random.default_rng(4), scale=1.5)
    net = GRUStudent(VOCAB, seed=0)
    learner = PCLLearner(RLConfig(value_lr=3e-3), net, START, PAD, max_len=HORIZON)
    batch = EpisodeBatch.collate(sample_episodes(net, log_pt, 4096, torch.Generator().manual_seed(0), off),
                                 pad_id=PAD)
    stats = learner.warm_start(batch, torch.zeros(len(batch)), None, steps=400)
    assert stats["value/warm_start_loss_last"] < stats["value/warm_start_loss_first"]
    kl = exact_kl(net, log_pt, off)
    with torch.no_grad():
        _, h = net(batch.src_ids[:1], batch.src_mask[:1], torch.full((1, 1), START), torch.zeros(1, 1, dtype=bool),
                   return_hidden=True)
        v0 = float(learner.value(h, torch.zeros(1))[0, 0, 0])
    assert kl > 0.5
    assert v0 == pytest.approx(-kl, abs=0.1), (v0, -kl)


def _calling_episodes(rng: np.random.Generator, n: int, budget: float, length: int = 6) -> list[Episode]:
    """Episodes that call <τ> (action VOCAB) at each step with probability ``budget``: expected usage = budget."""
    out = []
    for _ in range(n):
        tok = rng.integers(0, VOCAB, size=length)
        act = np.where(rng.random(length) < budget, VOCAB, tok)
        out.append(Episode(src_ids=np.array([0]), actions=act, tokens=tok,
                           teacher_logprobs=np.zeros(length, np.float32), behavior_logprobs=np.zeros(length, np.float32),
                           budget=budget, terminated=True))
    return out


def test_cost_value_learns_each_budgets_usage_by_consistency() -> None:
    """V_C trained by its consistency (SPEC §5) on episodes that call at rate b recovers V_C(s_0) ≈ b per budget."""
    rng = np.random.default_rng(0)
    net = GRUStudent(VOCAB, seed=0)
    learner = PCLLearner(RLConfig(value_lr=1e-2, target_update_rate=0.2), net, START, PAD, max_len=8)
    for _ in range(500):
        eps = _calling_episodes(rng, 32, 0.1) + _calling_episodes(rng, 32, 0.4)
        cb = EpisodeBatch.collate(eps, pad_id=PAD)
        loss, _ = learner.cost_loss(cb)
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        learner.optimizer.step()
        learner.polyak_update()
    src, mask = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)
    v0 = learner.start_cost_values(src, mask, torch.tensor([0.1, 0.4]))
    assert v0.tolist() == pytest.approx([0.1, 0.4], abs=0.04), v0
    # the per-step cost sums to each episode's usage
    cb = EpisodeBatch.collate(_calling_episodes(rng, 4, 0.3), pad_id=PAD)
    assert usage_costs(cb).sum(1).tolist() == pytest.approx(
        [float(m.sum()) / 6 for m in cb.teacher_mask], abs=1e-6)


def test_cost_value_control_variate_is_unbiased_and_cuts_variance() -> None:
    """û_b = mean_prompts V_C(s_0) + mean_episodes (u − V_C(s_0)): with a V_C that predicts per-prompt usage the
    variance ratio is small; with V_C ≡ 0 it is the plain count."""
    from tw_rl.train import cost_value_usage

    class Fake:
        pad_id = 0

        def __init__(self, table):
            self.table = table

        def start_cost_values(self, ids, mask, budgets):
            return torch.tensor([self.table.get(int(r[0]), 0.0) for r in ids], dtype=torch.float64)

    rng = np.random.default_rng(1)
    rates = {p: float(rng.uniform(0.05, 0.6)) for p in range(2, 40)}  # prompt id → its usage
    eps = []
    for p in rng.choice(list(rates), size=12):
        n = 20
        calls = int(round(rates[p] * n))
        act = np.array([VOCAB] * calls + [0] * (n - calls))
        eps.append(Episode(src_ids=np.array([p]), actions=act, tokens=np.zeros(n, dtype=np.int64),
                           teacher_logprobs=np.zeros(n, np.float32), behavior_logprobs=np.zeros(n, np.float32),
                           budget=0.2, terminated=True))
    prompts = {0.2: [[p] for p in rates]}
    est, stats = cost_value_usage(Fake({p: r for p, r in rates.items()}), eps, prompts)
    truth = float(np.mean([round(r * 20) / 20 for r in rates.values()]))
    assert est[0.2] == pytest.approx(truth, abs=0.03)
    assert stats["dual/variance_ratio"] < 0.05
    est0, stats0 = cost_value_usage(Fake({}), eps, prompts)
    assert est0[0.2] == pytest.approx(np.mean([e.usage() for e in eps]))
    assert stats0["dual/variance_ratio"] == pytest.approx(1.0)


def test_value_head_save_load_round_trip(tmp_path) -> None:
    head = ValueHead(8, hidden=5, max_len=10)
    with torch.no_grad():
        head.net[-1].weight.normal_()
    head.save(tmp_path)
    back = ValueHead.load(tmp_path)
    h, b = torch.randn(2, 3, 8), torch.tensor([0.1, 0.3])
    assert torch.equal(head(h, b), back(h, b))
    with pytest.raises(FileNotFoundError, match="no value head"):
        ValueHead.load(tmp_path / "missing")


def test_learned_value_state_dict_round_trip_gives_identical_next_update(tmp_path) -> None:
    a, batch = _default_learner(seed=0)
    lam = torch.full((len(batch),), 0.3)
    a.update(batch, lam)
    b, _ = _default_learner(seed=5)
    b.load_state_dict(a.state_dict())
    assert any(k.startswith("value.") for k in a.state_dict())
    assert a.update(batch, lam) == b.update(batch, lam)


# --------------------------------------------------------------------------------------------------------------
# budgets off the grid
# --------------------------------------------------------------------------------------------------------------
def test_multipliers_interpolate_between_levels_and_refuse_outside() -> None:
    m = BudgetMultipliers([0.0, 0.2, 0.5], lr=1.0, init=0.0)
    m.update({0.2: 1.2, 0.5: 0.5})  # λ_0.2 = 1.0, λ_0.5 = 0.0
    lam = m.for_episodes(torch.tensor([0.2, 0.1, 0.35, 0.5]))
    assert lam.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert 0.2 in m and 0.15 not in m
    with pytest.raises(ValueError, match="outside the grid"):
        m.for_episodes(torch.tensor([0.6]))


def test_continuous_budget_sampling_covers_every_percent() -> None:
    cfg = load_config(None, ["budget_sampling=continuous", "budgets=[0,0.1,0.5]"])
    bs = training_budgets(cfg)
    assert len(set(bs)) == 51 and bs[0] == 0.0 and bs[-1] == 0.5 and 0.15 in bs
    assert 0.4 < sum(b in (0.0, 0.1, 0.5) for b in bs) / len(bs) < 0.6  # the levels carry about half the draws
    assert training_budgets(Config()) == Config().budgets


def test_gate_head_refuses_alpha_other_than_one() -> None:
    from tw_rl.config import ConfigError

    with pytest.raises(ConfigError, match="rl.alpha") as e:
        load_config(None, ["student.tau_head=gate", "rl.alpha=0.5"])
    assert "student.tau_head" in str(e.value)
    with pytest.raises(ConfigError, match="rl.dual_estimator"):
        load_config(None, ["rl.value=zero", "rl.dual_estimator=cost_value"])


# --------------------------------------------------------------------------------------------------------------
# the prompt_gate head: the gate plus a read-out of the input
# --------------------------------------------------------------------------------------------------------------
def _prompt_gate_student(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    from tw_rl.models.student import Student

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=20, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg)
    model.resize_token_embeddings(21, mean_resizing=False)
    student = Student(model, tau_id=20, tau_head="prompt_gate").eval()
    with torch.no_grad():
        student.reader.query.normal_()
        student.reader.weight.normal_()
    return student


def test_prompt_gate_acting_equals_training_forward_and_reads_the_input(tmp_path) -> None:
    from tw_rl.models.student import Student

    student = _prompt_gate_student()
    src = torch.randint(2, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[0, 3:] = False
    dec = torch.randint(2, 20, (3, 4), generator=torch.Generator().manual_seed(2))
    tm = torch.zeros_like(dec, dtype=torch.bool)
    tm[:, 2] = True
    with torch.no_grad():
        full = student(src, mask, dec, tm)
        acting = student.start(src, mask)
        steps = torch.stack([student.step(acting, dec[:, t], tm[:, t]) for t in range(4)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # the reader moves only the <τ> logit, by an amount that depends on the input
    with torch.no_grad():
        other = src.clone()
        other[:, 0] = (other[:, 0] + 1) % 18 + 2  # another first ("prompt") token
        plain = student(other, mask, dec, tm)
        w = student.reader.weight.clone()
        student.reader.weight.zero_()
        no_read = student(src, mask, dec, tm)
        student.reader.weight.copy_(w)
    assert not torch.allclose(plain[..., 20], full[..., 20])
    torch.testing.assert_close(no_read[..., :20], full[..., :20])
    assert (no_read[..., 20] - full[..., 20]).abs().max() > 1e-3
    student.set_trainable("tau")
    assert student.reader.query.requires_grad and not student.delta.requires_grad
    student.save(tmp_path)
    back, _ = Student.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(src, mask, dec, tm), full)


# --------------------------------------------------------------------------------------------------------------
# the Lagrangian teaches the student itself to obey (a tiny task)
# --------------------------------------------------------------------------------------------------------------
def test_pcl_with_the_lagrangian_moves_raw_usage_toward_each_budget(toy) -> None:
    """A budget-blind start: an untrained student (its own tokens are poor, so calls pay: unconstrained it would
    call almost everywhere) behind a zero gate, at budgets 0.2 and 0.5 told apart only by a prompt token. PCL with
    one multiplier per level (dual ascent on the usage of the sampled episodes; only the <τ> decision trains) must
    bring each level's usage toward its own budget, so that they end apart and in the right order. (Greedy usage
    on this toy flips between 0 and 1 — its gate barely varies across states — so the test reads the policy's
    own, sampled usage.)"""
    from tests.conftest import EOS, FIRST_CONTENT, PROMPT, V, tiny_t5
    from tw_rl.envs.token_mdp import Example
    from tw_rl.models.student import Student
    from tw_rl.rollout import RolloutWorker

    g = torch.Generator().manual_seed(5)
    examples = []
    for _ in range(48):
        src = torch.randint(FIRST_CONTENT, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        src = src + [EOS]
        examples.append(Example(teacher_src=src, student_src={b: [PROMPT[b]] + src for b in (0.2, 0.5)}))
    model = tiny_t5(V, seed=2)
    model.resize_token_embeddings(V + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[V].zero_()
    student = Student(model, V, tau_head="gate", gate_bias=0.0).eval()
    student.set_trainable("tau")
    learner = PCLLearner(RLConfig(lr=3e-2, value_lr=3e-3, window=4), student, start_id=0, pad_id=0, max_len=8)
    worker = RolloutWorker(student, toy["teacher"], examples, [0.2, 0.5], max_len=8, eos_id=EOS,
                           temperature=1.0, batch_size=128, seed=0)
    multipliers = BudgetMultipliers([0.2, 0.5], lr=1.0, init=0.0, equality=True)

    def by_budget(eps) -> dict:
        by = {}
        for e in eps:
            by.setdefault(e.budget, []).append(e.usage())
        return {b: float(np.mean(u)) for b, u in by.items()}

    before = by_budget(worker.sample(seed=10_000).episodes)
    assert abs(before[0.2] - before[0.5]) < 0.1 and before[0.2] > 0.5, before  # blind, and over both budgets
    for it in range(40):
        worker.set_weights(student.state_dict(), it)
        eps = worker.sample(seed=it).episodes
        multipliers.update(by_budget(eps))
        onpolicy = EpisodeBatch.collate(eps)
        if it == 0:
            learner.warm_start(onpolicy, multipliers.for_episodes(onpolicy.budgets), None, steps=100)
        for _ in range(2):
            learner.update(onpolicy, multipliers.for_episodes(onpolicy.budgets))
    worker.set_weights(student.state_dict(), 99)
    after = by_budget(worker.sample(seed=10_000).episodes)
    assert after[0.5] > after[0.2] + 0.08, (before, after)  # apart, in the right order
    assert after[0.2] < before[0.2] - 0.1 and abs(after[0.5] - 0.5) < 0.1, (before, after)


def test_reference_usage_is_the_students_own_greedy_usage_and_a_control_variate(toy) -> None:
    """rl.dual_estimator=reference: the phase-1 student's greedy usage of each held-out prompt, decoded as the
    rollout workers decode their greedy rows, equals the usage of the same decode row by row; as a control variate
    for episodes of that same policy it leaves no variance and returns the pool's mean exactly."""
    from types import SimpleNamespace

    from tw_rl.decoding import decode
    from tw_rl.examples import pad_batch
    from tw_rl.train import ReferenceUsage, control_variate_usage, start_prompts

    from tests.conftest import EOS, TOY_BUDGETS, TOY_MAX_LEN

    student, examples = toy["student"], toy["examples"]
    run = SimpleNamespace(pad_id=0, eos_id=EOS, start_id=0, teacher=toy["teacher"],
                          cfg=SimpleNamespace(data=SimpleNamespace(max_tgt_tokens=TOY_MAX_LEN)))
    prompts = start_prompts(examples, list(TOY_BUDGETS))
    ref = ReferenceUsage.decode(run, student, examples, list(TOY_BUDGETS), batch_size=4)
    episodes = []
    for b in TOY_BUDGETS:
        ids, mask = pad_batch(prompts[b], 0)
        d = decode(student, ids, mask, max_len=TOY_MAX_LEN, eos_id=EOS, teacher=toy["teacher"],
                   teacher_src=[e.teacher_src for e in examples], start_id=0, pad_id=0)
        for k, src in enumerate(prompts[b]):
            n = int(d.lengths[k])
            assert ref.usage[b][tuple(src)] == pytest.approx(float(d.teacher_mask[k, :n].sum()) / n)
            episodes.append(Episode(src_ids=np.array(src), actions=d.actions[k, :n], tokens=d.tokens[k, :n],
                                    teacher_logprobs=np.zeros(n, np.float32),
                                    behavior_logprobs=np.zeros(n, np.float32), budget=b, terminated=True))
    assert ref.pool_mean(0.5) > ref.pool_mean(0.0)  # the toy student calls more at b = 0.5
    sub = [e for i, e in enumerate(episodes) if i % 2 == 0]  # a draw of the prompts, as one iteration sees
    est, stats = control_variate_usage(sub, ref.predict, ref.pool_mean)
    for b in TOY_BUDGETS:
        assert est[b] == pytest.approx(ref.pool_mean(b), abs=1e-9)  # the pool's mean, not the draw's
    assert stats["dual/var_control_variate"] == pytest.approx(0.0, abs=1e-12)
    assert stats["dual/var_count"] > 0.0
