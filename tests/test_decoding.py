"""The pieces of one decoding step (tw_rl/decoding.py) against closed forms, alone and inside the loop."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import CountingTeacher, _pad
from tw_rl.decoding import (Flip, ForcedCalls, Greedy, HardCap, MaskTau, Pieces, Replay, RowSample, Sample, Step,
                            TauBias, decode, decode_with)

B, A = 6, 9  # rows, actions: V = 0..7, <τ> = 8
TAU = A - 1


def make_step(t: int = 0, seed: int = 0, calls=None) -> Step:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, A, generator=g) * 2
    calls = torch.zeros(B, dtype=torch.long) if calls is None else torch.as_tensor(calls)
    return Step(t, TAU, logits, calls, torch.zeros(B, t, dtype=torch.long))


def toy_batch(toy, budget):
    ex = toy["examples"]
    ids, mask = _pad([e.student_src[budget] for e in ex])
    return ids, mask, [e.teacher_src for e in ex]


# ---------------------------------------------------------------------------------------------------------------
# logit pieces: in place, closed forms


def test_tau_bias_shifts_the_call_probability_to_a_sigmoid():
    step = make_step()
    before, storage = step.logits.clone(), step.logits.data_ptr()
    bias = torch.linspace(-3, 3, B)
    TauBias(bias)(step)
    assert step.logits.data_ptr() == storage  # edited in place, no copy
    want = torch.sigmoid(before[:, TAU] + bias - torch.logsumexp(before[:, :TAU], dim=-1))
    torch.testing.assert_close(torch.softmax(step.logits, -1)[:, TAU], want)
    # the tokens of V keep their ratios
    torch.testing.assert_close(torch.log_softmax(step.logits[:, :TAU], -1), torch.log_softmax(before[:, :TAU], -1))


def test_mask_tau_gives_the_call_probability_zero_and_leaves_v_alone():
    step = make_step()
    before = step.logits.clone()
    MaskTau()(step)
    assert (torch.softmax(step.logits, -1)[:, TAU] == 0).all()
    assert torch.equal(step.logits[:, :TAU], before[:, :TAU])


def test_hard_cap_masks_exactly_the_rows_at_their_cap():
    calls = torch.tensor([0, 1, 2, 3, 4, 5])
    step = make_step(calls=calls)
    before = step.logits.clone()
    HardCap(torch.full((B,), 3))(step)
    at_cap = calls >= 3
    assert torch.isneginf(step.logits[at_cap, TAU]).all()
    assert torch.equal(step.logits[~at_cap], before[~at_cap]) and torch.equal(step.logits[:, :TAU], before[:, :TAU])


def test_hard_cap_is_never_exceeded_in_decoding(toy):
    """A student pushed to call at every step (a large ``<τ>`` bias) stops calling at exactly its cap."""
    ids, mask, tsrc = toy_batch(toy, 0.5)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher=toy["teacher"], teacher_src=tsrc,
              tau_bias=torch.full((len(tsrc),), 20.0))
    free = decode(toy["student"], ids, mask, **kw)
    assert (free.teacher_mask[:, 0]).all()  # without the cap every row calls from the start
    cap = torch.tensor([0, 1, 2, 3, 1, 2])
    capped = decode(toy["student"], ids, mask, call_cap=cap, **kw)
    calls = capped.teacher_mask.sum(1)
    assert (calls <= cap.numpy()).all()
    for k in range(len(tsrc)):  # the first cap[k] steps call, none after
        n = capped.lengths[k]
        want = [j < cap[k] for j in range(n)]
        assert capped.teacher_mask[k, :n].tolist() == want


# ---------------------------------------------------------------------------------------------------------------
# samplers: the acting distribution and the random draws


def test_greedy_is_the_argmax_with_softmax_logprobs():
    step = make_step()
    logp, a = Greedy()(step.logits)
    assert torch.equal(a, step.logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(step.logits, -1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_is_gumbel_max_of_one_uniform_draw_per_step(temperature):
    step = make_step()
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    logp, a = Sample(temperature, g)(step.logits)
    u = torch.rand((B, A), generator=ref)
    want = torch.log_softmax(step.logits / temperature, -1)
    torch.testing.assert_close(logp, want)
    assert torch.equal(a, (want - torch.log(-torch.log(u))).argmax(-1))
    assert torch.equal(g.get_state(), ref.get_state())  # exactly one torch.rand([B, A]) per step


def test_sample_draws_from_softmax_of_logits_over_temperature():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).repeat(40000, 1)
    T = 0.7
    _, a = Sample(T, torch.Generator().manual_seed(0))(logits)
    p = torch.softmax(logits[0] / T, -1).numpy()
    freq = np.bincount(a.numpy(), minlength=5) / len(a)
    np.testing.assert_allclose(freq, p, atol=4 * math.sqrt(0.25 / len(a)))


def test_row_sample_rows_at_zero_are_greedy_and_the_others_sample_at_their_temperature():
    step = make_step()
    temps = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0, 0.0])
    g, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    logp, a = RowSample(temps, g)(step.logits)
    u = torch.rand((B, A), generator=ref)
    for i in range(B):
        if temps[i] == 0:
            assert a[i] == step.logits[i].argmax()
            torch.testing.assert_close(logp[i], torch.log_softmax(step.logits[i], -1))
        else:
            lp = torch.log_softmax(step.logits[i] / temps[i], -1)
            torch.testing.assert_close(logp[i], lp)
            assert a[i] == (lp - torch.log(-torch.log(u[i]))).argmax()
    assert torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------------------------------------------------------
# action pieces


def test_forced_calls_put_tau_on_the_rules_rows_and_hand_it_a_copy_of_the_calls():
    step = make_step(t=2, calls=[0, 1, 0, 2, 0, 0])
    seen = {}

    def rule(t, logits, calls):
        seen["t"], seen["logits"] = t, logits
        calls += 100  # a rule cannot change the decoder's counts
        return torch.tensor([True, False, True, False, False, True])

    a = torch.tensor([3, 8, 4, 5, 8, 1])
    out = ForcedCalls(rule)(step, a)
    assert out.tolist() == [TAU, 8, TAU, 5, 8, TAU]
    assert seen["t"] == 2 and seen["logits"] is step.logits and step.calls.tolist() == [0, 1, 0, 2, 0, 0]

    class Prefixed:
        reads_prefix = True

        def __call__(self, t, logits, calls, prefix):
            seen["prefix"] = prefix
            return torch.zeros(B, dtype=torch.bool)

    assert torch.equal(ForcedCalls(Prefixed())(step, a), a) and seen["prefix"] is step.prefix


def test_flip_takes_the_other_side_at_its_step_only():
    a = torch.tensor([TAU, 2, TAU, 5, 1, TAU])
    flip_at = torch.tensor([3, 3, -1, 3, 0, 3])
    for t in range(5):
        step = make_step(t=t)
        out = Flip(flip_at)(step, a)
        for i in range(B):
            if flip_at[i] != t:
                assert out[i] == a[i]
            elif a[i] == TAU:
                assert out[i] == step.logits[i, :TAU].argmax()  # its own most likely token of V
            else:
                assert out[i] == TAU


def test_flip_in_decoding_changes_one_decision_and_the_policy_acts_greedily_elsewhere(toy):
    """Along every flipped path the decision at each step is the student's greedy one on that path (one full
    forward, no cache), except at the flip, where it is the other side."""
    student, tau = toy["student"], toy["V"]
    ids, mask, tsrc = toy_batch(toy, 0.2)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher=toy["teacher"], teacher_src=tsrc)
    base = decode(student, ids, mask, **kw)
    flipped_rows = 0
    for t in range(4):
        flip = torch.full((len(tsrc),), t)
        out = decode(student, ids, mask, flip_at=flip, **kw)
        tok, tm = torch.as_tensor(out.tokens), torch.as_tensor(out.teacher_mask)
        dec = torch.cat([torch.zeros(len(tsrc), 1, dtype=torch.long), tok[:, :-1]], 1)
        dec_tm = torch.cat([torch.zeros(len(tsrc), 1, dtype=torch.bool), tm[:, :-1]], 1)
        with torch.no_grad():
            greedy = student(ids, mask, dec, dec_tm).float().argmax(-1)
        for k in range(len(tsrc)):
            n = int(out.lengths[k])
            if t >= base.lengths[k]:  # the row ended before the flip: the base path
                assert out.tokens[k, :n].tolist() == base.tokens[k, :base.lengths[k]].tolist()
                continue
            flipped_rows += 1
            calls = tm[k, :n].tolist()
            policy = (greedy[k, :n] == tau).tolist()
            assert [c != p for c, p in zip(calls, policy)] == [j == t for j in range(n)]
            assert out.tokens[k, :t].tolist() == base.tokens[k, :t].tolist()
    assert flipped_rows >= 2 * len(tsrc)


def test_replay_gives_the_known_tokens_until_its_step():
    tokens = torch.tensor([[3, 4, 5]] * B)
    called = torch.tensor([[False, True, False]] * B)
    until = torch.tensor([0, 1, 2, 3, 3, -1])
    a = torch.full((B,), 7)
    for t in range(4):
        step = make_step(t=t)
        out = Replay(tokens, called, until)(step, a)
        if t >= 3:  # past the known path: nothing given
            assert step.given is None and torch.equal(out, a)
            continue
        known, given = step.given
        assert known.tolist() == (t < until).tolist() and given.tolist() == [3 + t] * B
        want = TAU if called[0, t] else 3 + t
        assert out.tolist() == [want if t < until[i] else 7 for i in range(B)]


def test_replaying_a_whole_path_repeats_it_without_teacher_calls(toy):
    ids, mask, tsrc = toy_batch(toy, 0.5)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher_src=tsrc)
    base = decode(toy["student"], ids, mask, teacher=toy["teacher"], **kw)
    assert base.teacher_mask.sum() > 0
    teacher = CountingTeacher(toy["teacher"])
    never = torch.full((len(tsrc),), 8)  # repeat every step of the path (the flip is past the end)
    again = decode(toy["student"], ids, mask, teacher=teacher, flip_at=never,
                   replay=(torch.as_tensor(base.tokens), torch.as_tensor(base.teacher_mask)), **kw)
    assert teacher.rows == 0
    for f in ("actions", "tokens", "behavior_logprobs", "lengths", "terminated"):
        np.testing.assert_array_equal(getattr(again, f), getattr(base, f))


# ---------------------------------------------------------------------------------------------------------------
# the loop


def test_decode_is_decode_with_the_pieces_it_names(toy):
    ids, mask, tsrc = toy_batch(toy, 0.5)
    n = len(tsrc)
    kw = dict(max_len=8, eos_id=toy["eos"], teacher=toy["teacher"], teacher_src=tsrc)
    bias, cap = torch.full((n,), 0.7), torch.full((n,), 2)
    a = decode(toy["student"], ids, mask, temperature=1.0, generator=torch.Generator().manual_seed(2),
               tau_bias=bias, call_cap=cap, **kw)
    steps = Pieces([TauBias(bias), HardCap(cap)], Sample(1.0, torch.Generator().manual_seed(2)))
    b = decode_with(toy["student"], ids, mask, steps, **kw)
    for f in ("actions", "tokens", "behavior_logprobs", "lengths", "terminated"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    with pytest.raises(ValueError, match="needs a teacher"):
        decode(toy["student"], ids, mask, max_len=8, eos_id=toy["eos"])
    with pytest.raises(ValueError, match="needs a teacher"):  # a call with no teacher to answer it
        decode_with(toy["student"], ids, mask, Pieces(actions=[ForcedCalls(lambda t, lg, c: c == 0)]),
                    max_len=8, eos_id=toy["eos"])
