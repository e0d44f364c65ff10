"""TokenMDPEnv and its batched form against independent computations (SPEC §2, §3, §5)."""

import numpy as np
import pytest
import torch

from tw_rl.envs.token_mdp import TokenMDPBatch, TokenMDPEnv
from tests.conftest import TOY_BUDGETS, check_toy, greedy_reference, toy_properties
from tw_rl.decoding import decode

MAX_LEN, MAX_SRC = 8, 10


def make_env(toy, lam=0.0):
    env = TokenMDPEnv(toy["examples"], toy["teacher"], n_actions=toy["V"] + 1, eos_id=toy["eos"],
                      budgets=[0.0, 0.2, 0.5], max_len=MAX_LEN, max_src_len=MAX_SRC)
    env.set_lambda(lam)
    return env


def teacher_logprobs(toy, src, out):
    """log π_T(y_t | x, y_<t) straight from the model's full forward pass, no caches."""
    m = toy["teacher"].model
    dec = torch.tensor([[0] + out[:-1]])
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([src]), decoder_input_ids=dec).logits[0]
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(out)), torch.tensor(out)].numpy(), lp


def test_reward_is_teacher_logprob_and_tau_appends_greedy_token(toy):
    env = make_env(toy)
    obs, info = env.reset(seed=0, options={"example": 1, "budget": 0.2})
    src = toy["examples"][1].teacher_src
    tau = toy["V"]
    actions = [5, tau, 7, tau]
    rewards = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        rewards.append(r)
        if term or trunc:
            break
    out = obs["prefix"][:obs["step"]].tolist()
    ref, lp = teacher_logprobs(toy, src, out)
    np.testing.assert_allclose(rewards, ref[:len(rewards)], atol=1e-5)
    # <τ> steps carry the teacher's greedy token, marked in X_in; student steps carry the student's token
    assert out[0] == 5 and out[2] == 7
    assert out[1] == int(lp[1].argmax()) and out[3] == int(lp[3].argmax())
    assert obs["teacher_mask"][:4].tolist() == [0, 1, 0, 1]
    assert info["teacher_calls"] == 2 and info["usage"] == pytest.approx(0.5)


def test_lagrangian_reward(toy):
    lam = 0.7
    env0, env1 = make_env(toy), make_env(toy, lam)
    for env in (env0, env1):
        env.reset(seed=0, options={"example": 2, "budget": 0.2})
    tau = toy["V"]
    for a in [tau, 4]:
        _, r0, *_ = env0.step(a)
        _, r1, *_ = env1.step(a)
        c = float(a == tau)
        assert r1 == pytest.approx(r0 - lam * (c - 0.2))


def test_termination_and_truncation(toy):
    env = make_env(toy)
    env.reset(seed=0, options={"example": 0, "budget": 0.0})
    _, _, term, trunc, _ = env.step(toy["eos"])
    assert term and not trunc
    env.reset(seed=0, options={"example": 0, "budget": 0.0})
    for t in range(MAX_LEN):
        _, _, term, trunc, _ = env.step(3)
    assert trunc and not term


def test_batched_form_equals_single_envs(toy):
    rng = np.random.default_rng(0)
    n = 5
    ex_idx = rng.integers(len(toy["examples"]), size=n)
    budgets = rng.choice([0.0, 0.2, 0.5], size=n)
    batch = TokenMDPBatch(toy["teacher"], tau_id=toy["V"], eos_id=toy["eos"], max_len=MAX_LEN)
    batch.reset([toy["examples"][i] for i in ex_idx], budgets, lam=0.3)
    envs = [make_env(toy, 0.3) for _ in range(n)]
    for e, i, b in zip(envs, ex_idx, budgets):
        e.reset(seed=0, options={"example": int(i), "budget": float(b)})
    done = np.zeros(n, bool)
    for t in range(MAX_LEN):
        actions = rng.integers(1, toy["V"] + 1, size=n)  # includes EOS (1) and <τ> (V)
        r, term, trunc, _ = batch.step(actions)
        for k, e in enumerate(envs):
            if done[k]:
                assert r[k] == 0.0
                continue
            obs, rk, tk, uk, _ = e.step(int(actions[k]))
            assert rk == pytest.approx(r[k], abs=1e-5)
            assert (tk, uk) == (bool(term[k]), bool(trunc[k]))
            np.testing.assert_array_equal(obs["prefix"], batch.tokens[k])
            np.testing.assert_array_equal(obs["teacher_mask"], batch.teacher_mask[k])
        done |= term | trunc
        if done.all():
            break


def _student_inputs(toy, budget, idx):
    srcs = [toy["examples"][i].student_src[budget] for i in idx]
    S = max(map(len, srcs))
    ids = torch.zeros(len(srcs), S, dtype=torch.long)
    mask = torch.zeros(len(srcs), S, dtype=torch.bool)
    for k, s in enumerate(srcs):
        ids[k, :len(s)], mask[k, :len(s)] = torch.tensor(s), True
    return ids, mask


def test_toy_pair_is_informative(toy):
    """The shared toy pair (tests/conftest.py) does what the tests that use it need: greedy outputs that differ across
    inputs and end with EOS, no calls at b = 0, calls on some but not all steps at b > 0, more at the larger budget."""
    props = toy_properties(toy, MAX_LEN)
    check_toy(props, len(toy["examples"]))
    assert [props[b]["rows_calling"] for b in TOY_BUDGETS] == [0, len(toy["examples"]), len(toy["examples"])]


@pytest.mark.parametrize("budget", TOY_BUDGETS)
def test_greedy_decoding_equals_a_first_principles_argmax(toy, budget):
    """The KV-cached decoder at temperature 0, teacher calls included, equals the argmax of full forwards without
    caches, the teacher's token taken from its model's own full forward."""
    idx = list(range(len(toy["examples"])))
    ids, mask = _student_inputs(toy, budget, idx)
    out = decode(toy["student"], ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], teacher=toy["teacher"],
                 teacher_src=[toy["examples"][i].teacher_src for i in idx])
    for k in idx:
        ex = toy["examples"][k]
        actions, tokens, called = greedy_reference(toy["student"], toy["teacher"].model, ex.student_src[budget],
                                                   ex.teacher_src, MAX_LEN, toy["eos"])
        n = out.lengths[k]
        assert out.actions[k, :n].tolist() == actions and out.tokens[k, :n].tolist() == tokens
        assert out.teacher_mask[k, :n].tolist() == called
        assert bool(out.terminated[k]) == (tokens[-1] == toy["eos"])


@pytest.mark.parametrize("budget", [0.0, 0.5])
def test_tau_masked_is_plain_greedy(toy, budget):
    """allow_tau=False is Hugging Face greedy generation with <τ> suppressed — also at b = 0.5, where the student's
    own argmax would often be <τ>."""
    idx = list(range(len(toy["examples"])))
    ids, mask = _student_inputs(toy, budget, idx)
    out = decode(toy["student"], ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], allow_tau=False)
    ref = toy["student"].model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=MAX_LEN,
                                        do_sample=False, num_beams=1, suppress_tokens=[toy["V"]])
    outs = []
    for k in idx:
        want = ref[k, 1:].tolist()
        want = want[:want.index(toy["eos"]) + 1] if toy["eos"] in want else want
        outs.append(tuple(out.tokens[k, :out.lengths[k]].tolist()))
        assert list(outs[-1]) == want
        assert not out.teacher_mask[k].any() and (out.actions[k, :out.lengths[k]] != toy["V"]).all()
    assert len(set(outs)) >= 3 and out.terminated.mean() >= 0.5  # varied outputs that end: the comparison bites
    unmasked = decode(toy["student"], ids, mask, max_len=MAX_LEN, eos_id=toy["eos"], teacher=toy["teacher"],
                      teacher_src=[toy["examples"][i].teacher_src for i in idx])
    assert unmasked.teacher_mask.any() == (budget > 0)  # at b = 0.5 the mask is what keeps <τ> out


class Lockstep:
    """An action piece, last in :func:`decode_with`'s list, that steps a :class:`TokenMDPBatch` with the actions the
    loop is about to take, after checking that the env's state equals the loop's (``X_out``, calls) at every step."""

    def __init__(self, env: TokenMDPBatch):
        self.env, self.rewards = env, []

    def __call__(self, step, a):
        t = step.t
        np.testing.assert_array_equal(self.env.tokens[:, :t], step.prefix.numpy())
        np.testing.assert_array_equal(self.env.calls, step.calls.numpy())
        assert (self.env.t == np.where(self.env.done, self.env.t, t)).all()  # live rows are at step t
        self.rewards.append(self.env.step(a.numpy())[0])
        return a


LOCKSTEP_MODES = {
    "greedy": {},
    "sampled": {"temperature": 1.0},
    "row_temperatures": {"temperature": torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0])},
    "cap_and_bias": {"temperature": 1.0, "call_cap": torch.full((6,), 1), "tau_bias": torch.full((6,), 1.5)},
    "forced_every_3rd": {"temperature": 1.0, "allow_tau": False,
                         "tau_rule": lambda t, logits, calls: torch.full((logits.shape[0],), t % 3 == 1)},
    "flip": {"flip_at": torch.tensor([0, 1, 2, 3, -1, 1])},
}


@pytest.mark.parametrize("mode", list(LOCKSTEP_MODES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decoding_loop_and_env_take_the_same_transitions_step_by_step(toy, mode, seed):
    """The transition is written twice (``TokenMDPBatch.step`` in numpy with rewards, :func:`decode_with`'s loop in
    torch); stepped in lockstep with the loop's actions the env holds the loop's ``X_out``, calls, teacher marks,
    lengths and ends at every step, at every budget of a mixed batch, and its rewards are the teacher's scores of
    the loop's outputs minus λ (c_t − b)."""
    from tw_rl.decoding import decode_with, pieces

    rng = np.random.default_rng(seed)
    n, lam = 6, 0.3
    idx = rng.permutation(len(toy["examples"]))[:n]
    budgets = rng.choice(TOY_BUDGETS, size=n)
    examples = [toy["examples"][i] for i in idx]
    srcs = [ex.student_src[b] for ex, b in zip(examples, budgets)]
    S = max(map(len, srcs))
    ids, mask = torch.zeros(n, S, dtype=torch.long), torch.zeros(n, S, dtype=torch.bool)
    for k, s in enumerate(srcs):
        ids[k, :len(s)], mask[k, :len(s)] = torch.tensor(s), True
    tsrc = [ex.teacher_src for ex in examples]
    env = TokenMDPBatch(toy["teacher"], tau_id=toy["V"], eos_id=toy["eos"], max_len=MAX_LEN)
    env.reset(examples, budgets, lam=lam)
    kw = dict(LOCKSTEP_MODES[mode])
    steps = pieces(generator=torch.Generator().manual_seed(seed), **kw)
    lockstep = Lockstep(env)
    steps.actions.append(lockstep)
    out = decode_with(toy["student"], ids, mask, steps, max_len=MAX_LEN, eos_id=toy["eos"], teacher=toy["teacher"],
                      teacher_src=tsrc)
    T = out.tokens.shape[1]
    np.testing.assert_array_equal(env.t, out.lengths)
    np.testing.assert_array_equal(env.tokens[:, :T], out.tokens)
    np.testing.assert_array_equal(env.teacher_mask[:, :T], out.teacher_mask)
    assert (env.tokens[:, T:] == 0).all() and env.done.all()
    np.testing.assert_array_equal(env.calls, out.teacher_mask.sum(1))
    terminated = np.array([env.tokens[k, env.t[k] - 1] == toy["eos"] for k in range(n)])
    np.testing.assert_array_equal(terminated, out.terminated)
    assert out.teacher_mask.any() and (out.lengths < MAX_LEN).any()  # calls made, some rows end before the limit
    scores = toy["teacher"].score(tsrc, [out.tokens[k, :out.lengths[k]].tolist() for k in range(n)])
    rewards = np.stack(lockstep.rewards, 1)
    for k in range(n):
        L = out.lengths[k]
        want = scores[k] - lam * (out.teacher_mask[k, :L] - budgets[k])
        np.testing.assert_allclose(rewards[k, :L], want, atol=1e-5)
        assert (rewards[k, L:] == 0).all()


def test_registered_env_passes_gymnasium_checker():
    import time

    import gymnasium
    from gymnasium.utils.env_checker import check_env

    import tw_rl.envs  # noqa: F401  (registers tw_rl/TokenMDP-v0)

    t0 = time.perf_counter()
    env = gymnasium.make("tw_rl/TokenMDP-v0")
    assert time.perf_counter() - t0 < 30
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0, options={"budget": 0.2})
    assert obs["budget"][0] == np.float32(0.2) and info["teacher_calls"] == 0
    tau = env.action_space.n - 1
    obs, r, term, trunc, info = env.step(tau)
    assert info["teacher_calls"] == 1 and obs["teacher_mask"][0] == 1 and isinstance(info["text"], str)


def test_per_row_temperature_zero_rows_are_greedy(toy):
    """A temperature of 0 in a per-row tensor decodes that row greedily while the others sample."""
    idx = list(range(len(toy["examples"])))
    ids, mask = _student_inputs(toy, 0.5, idx)
    tsrc = [toy["examples"][i].teacher_src for i in idx]
    args = dict(max_len=MAX_LEN, eos_id=toy["eos"], teacher=toy["teacher"], teacher_src=tsrc)
    greedy = decode(toy["student"], ids, mask, **args)
    calls = sum(int(greedy.teacher_mask[k, :greedy.lengths[k]].sum()) for k in idx)
    assert 0 < calls < int(greedy.lengths.sum())  # the greedy rows call the teacher at some steps, not all
    temps = torch.tensor([0.0, 1.0] * (len(idx) // 2))
    mixed = decode(toy["student"], ids, mask, temperature=temps, generator=torch.Generator().manual_seed(1), **args)
    sampled_rows_differ = False
    for k in idx:
        a = mixed.tokens[k, :mixed.lengths[k]].tolist()
        b = greedy.tokens[k, :greedy.lengths[k]].tolist()
        if temps[k] == 0:
            ex = toy["examples"][k]
            ref_actions, ref_tokens, _ = greedy_reference(toy["student"], toy["teacher"].model, ex.student_src[0.5],
                                                          ex.teacher_src, MAX_LEN, toy["eos"])
            assert a == b == ref_tokens
            assert mixed.actions[k, :mixed.lengths[k]].tolist() == ref_actions
        else:
            sampled_rows_differ |= a != b
    assert sampled_rows_differ
