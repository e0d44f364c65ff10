"""The pluggable learners' pure losses against closed forms and hand computations, and the registry."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from tw_rl.algos import ALGORITHMS, get_algorithm
from tw_rl.algos.gkd import call_advantage, generalized_jsd, gkd_loss
from tw_rl.algos.ppo import baseline_advantages, ppo_clip_loss, returns_to_go
from tw_rl.config import ConfigError, load_config


def _logp(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_registry_rejects_unknown_names_with_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown algorithm 'nope'.*'gkd'.*'pcl'.*'ppo'.*'rllib_ppo'"):
        get_algorithm("nope")
    with pytest.raises(ConfigError, match=r"algo='nope' is unknown; allowed values: \[.*'gkd'"):
        load_config(None, ["algo=nope"])
    for name in ALGORITHMS:  # every registered module imports and has an entry point
        mod = get_algorithm(name)
        assert hasattr(mod, "make_learner") or hasattr(mod, "run_phase2"), name


# ---- GKD ---------------------------------------------------------------------------------------------------------
P_T, P_S = _logp([0.7, 0.2, 0.1], [0.1, 0.3, 0.6]), _logp([0.2, 0.5, 0.3], [0.25, 0.25, 0.5])


def kl(p, q):  # brute force, probabilities
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_jsd_endpoints_are_the_two_kl_directions():
    t, s = P_T.exp().tolist(), P_S.exp().tolist()
    fwd = generalized_jsd(P_S, P_T, beta=0.0)
    rev = generalized_jsd(P_S, P_T, beta=1.0)
    for i in range(2):
        assert float(fwd[i]) == pytest.approx(kl(t[i], s[i]), rel=1e-9)
        assert float(rev[i]) == pytest.approx(kl(s[i], t[i]), rel=1e-9)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_jsd_matches_brute_force_mixture(beta):
    t, s = P_T.exp().tolist(), P_S.exp().tolist()
    got = generalized_jsd(P_S, P_T, beta=beta)
    for i in range(2):
        m = [beta * a + (1 - beta) * b for a, b in zip(t[i], s[i])]
        assert float(got[i]) == pytest.approx(beta * kl(t[i], m) + (1 - beta) * kl(s[i], m), rel=1e-9)
    if beta == 0.5:  # symmetric, bounded by log 2, zero iff equal
        torch.testing.assert_close(got, generalized_jsd(P_T, P_S, beta=0.5))
        assert float(got.max()) < math.log(2)
        assert float(generalized_jsd(P_T, P_T, beta=0.5).abs().max()) < 1e-12


def test_jsd_handles_zero_probabilities():
    s = torch.log(torch.tensor([[1.0, 0.0]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    assert float(generalized_jsd(s, t, 1.0)) == pytest.approx(math.log(2))
    assert torch.isfinite(generalized_jsd(s, t, 0.5)).all()


def test_call_advantage_and_its_optimum_by_hand():
    # teacher greedy log-prob log 0.7; the student's own token is worth Σ S log T
    s, t = P_S[:1, None], P_T[:1, None]  # [B=1, T=1, V]
    lam = torch.tensor([0.3], dtype=torch.float64)
    expected = math.log(0.7) - (0.2 * math.log(0.7) + 0.5 * math.log(0.2) + 0.3 * math.log(0.1)) - 0.3
    assert float(call_advantage(s, t, lam)) == pytest.approx(expected)
    # the decision term alone is minimised (gradient 0) where p_τ = σ(A/α)
    alpha = 0.5
    logits_v = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    p_star = 1 / (1 + math.exp(-expected / alpha))
    tau_logit = math.log(p_star / (1 - p_star))  # logsumexp(logits_v) = 0
    logits = torch.cat([logits_v, torch.tensor([tau_logit])]).float()[None, None].requires_grad_(True)
    loss, stats = gkd_loss(logits, t.float(), torch.ones(1, 1, dtype=torch.bool), lam.float(), beta=0.5,
                           alpha=alpha, tau_weight=1.0)
    loss.backward()
    assert stats["gkd/call_prob"] == pytest.approx(p_star, abs=1e-5)
    assert float(logits.grad[0, 0, -1]) == pytest.approx(0.0, abs=1e-5)  # the JSD term has no <τ> gradient


def test_gkd_loss_ignores_padding_and_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    t_logp = torch.log_softmax(torch.randn(2, 3, 5), -1)
    logits = torch.cat([t_logp, torch.full((2, 3, 1), -1e4)], -1)  # S = T, never calls
    mask = torch.tensor([[True, True, False], [True, False, False]])
    big = torch.tensor([1e4, 1e4])  # λ so high that calling is never worth it: target p_τ ≈ 0
    loss, stats = gkd_loss(logits, t_logp, mask, big, beta=0.5, alpha=1.0, tau_weight=1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    junk = logits.clone()
    junk[~mask] = torch.randn_like(junk[~mask]) * 10
    loss2, _ = gkd_loss(junk, t_logp, mask, big, beta=0.5, alpha=1.0, tau_weight=1.0)
    assert float(loss2) == pytest.approx(float(loss), abs=1e-6)


# ---- PPO ---------------------------------------------------------------------------------------------------------
def test_ppo_clipped_loss_by_hand():
    # ratios 1.5, 0.5, 1.1, 2.0 with advantages +1, +1, -2, -1; ε = 0.2; the 4th step is padding
    ratio = torch.tensor([[1.5, 0.5, 1.1, 2.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[True, True, True, False]])
    behavior = torch.log(torch.tensor([[0.2, 0.4, 0.5, 0.1]]))
    logp = (behavior + torch.log(ratio)).requires_grad_(True)
    loss, stats = ppo_clip_loss(logp, behavior, adv, mask, clip=0.2)
    # min(1.5·1, 1.2·1) = 1.2;  min(0.5·1, 0.8·1) = 0.5;  min(1.1·−2, 1.1·−2) = −2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, abs=1e-6)
    assert stats["ppo/clip_fraction"] == pytest.approx(2 / 3)
    loss.backward()
    # gradient flows only where the unclipped term is the minimum: d(−ρA/3)/dlogp = −ρA/3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 3, 2.2 / 3, 0.0]]))


def test_returns_to_go_and_baseline_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    g = returns_to_go(r, mask, gamma=0.5)
    torch.testing.assert_close(g, torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0], [4 + 2.5, 5.0, 0.0]]))
    adv = baseline_advantages(g, mask, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[2.75 - 4.625, 3.5 - 4.25, 0.0], [6.5 - 4.625, 0.75, 0.0]]))
    w = baseline_advantages(g, mask)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[mask].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


# ---- the RLlib adapter -------------------------------------------------------------------------------------------
def test_student_rl_module_reads_the_env_observation_as_the_student_would(toy):
    """The RLModule's logits for an observation of TokenMDPEnv equal the student's own training forward at that
    state (prefix with teacher tokens marked); values have one entry per observation."""
    import numpy as np
    from ray.rllib.core.columns import Columns

    from tw_rl.envs.token_mdp import TokenMDPEnv
    from tw_rl.distributed.rllib_ppo import _module_class

    import copy

    student, V = copy.deepcopy(toy["student"]), toy["V"]  # a copy: the RLModule must not touch the session's toy
    env = TokenMDPEnv(toy["examples"], toy["teacher"], n_actions=V + 1, eos_id=toy["eos"], budgets=[0.0, 0.2, 0.5],
                      max_len=6, max_src_len=8)
    module = _module_class()(observation_space=env.observation_space, action_space=env.action_space,
                             model_config={"arch": {"d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2,
                                                    "num_layers": 1, "num_decoder_layers": 1}})
    module.student = student  # the toy student (its <τ> is likely, so teacher tokens appear)
    obs, _ = env.reset(seed=0, options={"example": 1, "budget": 0.2})
    observations = [obs]
    for a in [V, 5, V, 7]:
        obs, *_ = env.step(a)
        observations.append(obs)
    batch = {Columns.OBS: {k: torch.as_tensor(np.stack([np.asarray(o[k]) for o in observations]))
                           for k in observations[0]}}
    with torch.no_grad():
        logits = module._forward(batch)[Columns.ACTION_DIST_INPUTS]
        values = module.compute_values(batch)
        src = torch.as_tensor(toy["examples"][1].student_src[0.2])[None]
        tokens = torch.as_tensor(env.core.tokens[0, :4])[None]
        tmask = torch.as_tensor(env.core.teacher_mask[0, :4])[None]
        dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), tokens], 1)
        dec_mask = torch.cat([torch.zeros(1, 1, dtype=torch.bool), tmask], 1)
        ref = student(src, torch.ones_like(src, dtype=torch.bool), dec, dec_mask)[0]  # [5, A]
    assert bool(tmask.any())  # a teacher token is in the prefix: δ matters
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert values.shape == (5,)


# ---- the Learner protocol ----------------------------------------------------------------------------------------
class _TinyStudent(torch.nn.Module):
    """An autoregressive stand-in: embedding → linear, logits over V ∪ {<τ>} (4 tokens + <τ>)."""

    def __init__(self, actions: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(8, 6)
        self.head = torch.nn.Linear(6, actions)

    hidden_size = 6  # what PCL's value head reads

    def forward(self, src_ids, src_mask, dec_tokens, dec_teacher_mask, return_hidden=False):
        h = self.embed(dec_tokens)
        return (self.head(h), h) if return_hidden else self.head(h)


class _RecordingTeacher:
    """Answers ``distributions`` with a fixed distribution and records the teacher inputs it was asked about."""

    def __init__(self):
        self.asked: list[list[list[int]]] = []

    def distributions(self, src, outputs):
        self.asked.append([list(s) for s in src])
        T = max(len(o) for o in outputs)
        return torch.log_softmax(torch.arange(4.0).repeat(len(src), T, 1), dim=-1)


def _episodes():
    from tw_rl.batch import Episode

    def ep(src, teacher_src, actions, tokens, b):
        n = len(actions)
        return Episode(src_ids=np.array(src), actions=np.array(actions), tokens=np.array(tokens),
                       teacher_logprobs=np.full(n, -0.5, np.float32), behavior_logprobs=np.full(n, -1.0, np.float32),
                       budget=b, terminated=True, policy_version=0, teacher_src=np.array(teacher_src))
    return [ep([7, 1, 2], [1, 2], [1, 4, 3], [1, 2, 3], 0.2), ep([6, 3], [3], [2, 3], [2, 3], 0.0)]


def test_every_registered_learner_conforms_to_the_protocol():
    """Each registry entry builds a Learner that declares how it is driven; the ones the driver's loop feeds take
    one update on a batch with exactly the inputs they declare (tw_rl/algos/learner.py)."""
    from tw_rl.algos.learner import COST_BATCH, TEACHER_SRC, Learner
    from tw_rl.batch import EpisodeBatch
    from tw_rl.config import Config

    eps = _episodes()
    batch = EpisodeBatch.collate(eps, pad_id=0)
    for name in ALGORITHMS:
        learner = get_algorithm(name).make_learner(Config(), _TinyStudent(), 0, 0, teacher=_RecordingTeacher())
        assert isinstance(learner, Learner), name
        assert isinstance(learner.owns_loop, bool) and learner.inputs <= {COST_BATCH, TEACHER_SRC}, name
        if learner.owns_loop:
            continue
        extra = {TEACHER_SRC: [e.teacher_src.tolist() for e in eps]} if TEACHER_SRC in learner.inputs else {}
        before = [p.detach().clone() for p in learner.student.parameters()]
        stats = learner.update(batch, torch.tensor([0.5, 0.0]), **extra)
        assert stats and all(isinstance(v, float) for v in stats.values()), name
        assert any(not torch.equal(a, p) for a, p in zip(before, learner.student.parameters())), name
        state = learner.state_dict()
        learner.load_state_dict(state)
        learner.close()
        with pytest.raises(NotImplementedError, match="does not own its loop"):
            learner.run(None, None, False)


def test_gkd_asks_the_teacher_about_the_teacher_inputs_it_is_given():
    """The teacher inputs come with the batch (no map from the student's prompted ids back to x)."""
    from tw_rl.batch import EpisodeBatch
    from tw_rl.config import Config

    teacher = _RecordingTeacher()
    learner = get_algorithm("gkd").make_learner(Config(), _TinyStudent(), 0, 0, teacher=teacher)
    batch = EpisodeBatch.collate(_episodes(), pad_id=0)
    learner.update(batch, torch.zeros(2), teacher_src=[[1, 2], [3]])
    assert teacher.asked == [[[1, 2], [3]]]
    with pytest.raises(ValueError, match="1 teacher inputs for a batch of 2"):
        learner.update(batch, torch.zeros(2), teacher_src=[[1, 2]])


def test_the_driver_passes_each_learner_what_it_declares():
    from tw_rl.algos.learner import COST_BATCH, TEACHER_SRC
    from tw_rl.train import learner_inputs

    class Wants:
        def __init__(self, inputs):
            self.inputs = frozenset(inputs)

    eps, rng = _episodes(), np.random.default_rng(0)
    assert learner_inputs(Wants(()), eps, eps, 4, rng, 0) == {}
    got = learner_inputs(Wants({TEACHER_SRC, COST_BATCH}), eps, eps[:1], 4, rng, 0)
    assert got[TEACHER_SRC] == [[1, 2], [3]] and len(got[COST_BATCH]) == 1
    assert COST_BATCH not in learner_inputs(Wants({COST_BATCH}), eps, [], 4, rng, 0)  # no greedy episodes yet
    eps[1].teacher_src = None
    with pytest.raises(ValueError, match="1 sampled episodes carry none"):
        learner_inputs(Wants({TEACHER_SRC}), eps, [], 4, rng, 0)
