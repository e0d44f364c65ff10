"""Teacher.next_tokens: the incremental path (a decoder KV cache per sequence) answers exactly as the batched one."""

import pickle

import numpy as np
import pytest
import torch

from tests.conftest import EOS, V, tiny_t5
from tw_rl.decoding import decode
from tw_rl.teacher import Teacher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    # an output layer wider than |V| (hub models pad it): normalise over all of it, choose from V
    return tiny_t5(V + 6, d_model=32, seed=1)


def pair(model, **kwargs):
    """The same model answered incrementally (whatever the request size) and batched (no KV cache)."""
    return (Teacher(model, vocab_size=V, incremental_max_rows=10 ** 6, **kwargs),
            Teacher(model, vocab_size=V, incremental_max_rows=0))


def same(inc, bat, src, prefixes):
    wi, li = inc.next_tokens(src, prefixes)
    wb, lb = bat.next_tokens(src, prefixes)
    assert wi == wb
    assert all(0 <= w < V for w in wi)
    np.testing.assert_allclose(li, lb, atol=1e-5, rtol=0)
    return wi


def random_sources(g, n):
    return [torch.randint(2, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() + [EOS]
            for _ in range(n)]


def test_incremental_equals_batched_over_interleaved_calls(model):
    """Random calls with growing prefixes on several sources, interleaved, with two episodes running on one source
    at the same time (rows of one request), repeated prefixes and requests of several rows."""
    inc, bat = pair(model)
    g = torch.Generator().manual_seed(0)
    srcs = random_sources(g, 4)
    srcs.append(srcs[0])  # a second episode on source 0, decoded at the same time
    seqs = [torch.randint(2, V, (20,), generator=g).tolist() for _ in srcs]
    lens = [0] * len(srcs)
    for _ in range(40):
        rows = torch.randperm(len(srcs), generator=g)[:int(torch.randint(1, 4, (1,), generator=g))].tolist()
        for r in rows:
            lens[r] = min(20, lens[r] + int(torch.randint(0, 4, (1,), generator=g)))  # 0: the same prefix again
        same(inc, bat, [srcs[r] for r in rows], [seqs[r][:lens[r]] for r in rows])
    assert inc.stats["incremental_rows"] == inc.stats["rows"] and inc.stats["batched_rows"] == 0
    assert bat.stats["batched_rows"] == bat.stats["rows"] and bat.stats["incremental_rows"] == 0
    assert inc.stats["state_misses"] == 5  # one state per episode, never rebuilt
    # every episode's decoder positions were fed once: start token + its longest prefix
    assert inc.stats["incremental_positions"] == sum(n + 1 for n in lens)


def test_teacher_tokens_fed_back(model):
    """The teacher's own greedy tokens extend the prefix (teacher-alone greedy decoding through next_tokens): one
    decoder position per call."""
    inc, bat = pair(model)
    src = random_sources(torch.Generator().manual_seed(1), 1)
    prefix = []
    for _ in range(10):
        prefix += same(inc, bat, src, [prefix])
    assert inc.stats["incremental_positions"] == 10


def test_prefix_that_does_not_extend_the_cached_one(model):
    """A new episode on the same source (shorter, or diverging) is answered from a fresh state, correctly."""
    inc, bat = pair(model, states_per_source=1)
    g = torch.Generator().manual_seed(2)
    src = random_sources(g, 1)
    a, b = (torch.randint(2, V, (12,), generator=g).tolist() for _ in range(2))
    for n in (3, 7, 12):
        same(inc, bat, src, [a[:n]])
    assert inc.stats["state_misses"] == 1
    same(inc, bat, src, [a[:5]])  # shorter than what was fed: a new episode that agrees so far
    same(inc, bat, src, [b[:6]])  # diverges
    same(inc, bat, src, [b[:9]])  # ... and is then extended
    same(inc, bat, src, [[]])  # a new episode's first call
    assert inc.stats["state_misses"] == 4 and inc.stats["state_hits"] == 3
    assert inc.num_decoder_states == 1 and inc.stats["state_evictions"] == 3


def test_reuse_prefixes_crops_a_kept_state_back_to_the_common_start(model):
    """``reuse_prefixes``: a prefix that does not extend the kept state reuses it, cropped to their longest common
    start (at most all but the prefix's last token), instead of reading everything again — same answers, fewer
    positions fed. Another decode of the same input (calibration, the baselines) starts from the kept input."""
    g = torch.Generator().manual_seed(2)
    src = random_sources(g, 1)
    a, b = (torch.randint(2, V, (12,), generator=g).tolist() for _ in range(2))
    b[:3] = a[:3]  # b agrees with a on its first 3 tokens, then diverges
    d = [2 + (a[0] - 1) % (V - 2)] + a[1:4]  # differs from a at once
    plain, _ = pair(model, states_per_source=1)
    inc, bat = pair(model, states_per_source=1, reuse_prefixes=True)
    for prefix in (a[:3], a[:7], a[:12], a[:5], b[:6], b[:9], [], a[:2], d):
        same(inc, bat, src, [prefix])
        same(plain, bat, src, [prefix])
    # a[:5] crops to 5 (+ start) and feeds a[4]; b[:6] crops to the 3 shared (+ start) and feeds 3; b[:9] extends;
    # [] is a first call (a crop could keep nothing it needs: a fresh state, the other evicted); a[:2] extends it;
    # d crops it back to the start (the input) and feeds 4
    assert inc.stats["state_crops"] == 3 and inc.stats["state_hits"] == 4 and inc.stats["state_misses"] == 2
    assert plain.stats["state_crops"] == 0 and plain.stats["state_misses"] == 5
    fed = [13, 1, 3, 3, 1, 2, 4]  # start + a[:12]; a[4]; b[3:6]; b[6:9]; the start; a[:2]; d
    assert inc.stats["incremental_positions"] == sum(fed) < plain.stats["incremental_positions"]


def test_lru_eviction_bound(model):
    inc, bat = pair(model, decoder_cache_size=3, states_per_source=2)
    g = torch.Generator().manual_seed(3)
    srcs = random_sources(g, 5)
    seqs = [torch.randint(2, V, (10,), generator=g).tolist() for _ in srcs]
    for n in (2, 4):
        for s, q in zip(srcs, seqs):
            same(inc, bat, [s], [q[:n]])
            assert inc.num_decoder_states <= 3
    assert inc.stats["state_evictions"] == 2 + 5  # 5 states made in round 1, 3 kept; round 2 misses on all 5
    assert inc.stats["state_misses"] == 10
    # the 3 most recently used sources are kept: extending them hits
    for s, q in zip(srcs[2:], seqs[2:]):
        same(inc, bat, [s], [q[:6]])
    assert inc.stats["state_hits"] == 3 and inc.num_decoder_states == 3
    # at most states_per_source episodes per source
    for k in range(3):
        same(inc, bat, [srcs[4]], [[2 + k] * 3])
    assert len(inc._states[tuple(srcs[4])]) == 2 and inc.num_decoder_states == 3


def test_clear_cache(model):
    inc, bat = pair(model)
    g = torch.Generator().manual_seed(4)
    srcs = random_sources(g, 2)
    seq = torch.randint(2, V, (8,), generator=g).tolist()
    same(inc, bat, srcs, [seq[:3], seq[:4]])
    assert inc.num_decoder_states == 2 and len(inc._enc_cache) == 2
    inc.clear_cache()
    assert inc.num_decoder_states == 0 and len(inc._enc_cache) == 0
    misses = inc.stats["encoder_misses"], inc.stats["state_misses"]
    same(inc, bat, srcs, [seq[:5], seq[:5]])  # everything is computed again, and still right
    assert (inc.stats["encoder_misses"], inc.stats["state_misses"]) == (misses[0] + 2, misses[1] + 2)


def test_positions_fed_are_the_prefix_length_not_calls_times_length(model):
    inc, bat = pair(model)
    src = random_sources(torch.Generator().manual_seed(5), 1)
    seq = list(range(2, 2 + 20))
    calls = (2, 5, 9, 14, 14, 19)
    for n in calls:
        same(inc, bat, src, [seq[:n]])
    assert inc.stats["incremental_positions"] == 19 + 1  # the start token and the 19 prefix tokens, once each
    assert bat.stats["batched_positions"] == sum(n + 1 for n in calls)  # 69: every call re-reads its prefix


def test_request_size_chooses_the_path(model):
    t = Teacher(model, vocab_size=V, incremental_max_rows=2)
    g = torch.Generator().manual_seed(6)
    srcs = random_sources(g, 3)
    t.next_tokens(srcs[:2], [[3], [4, 5]])
    t.next_tokens(srcs, [[3], [4], []])
    assert (t.stats["incremental_rows"], t.stats["batched_rows"]) == (2, 3)
    assert t.stats["batched_positions"] == 3 * 2  # padded B × (L + 1)
    with pytest.raises(ValueError):
        Teacher(model, vocab_size=V, decoder_cache_size=0)


def test_pickles_without_its_caches(model):
    inc, bat = pair(model)
    src = random_sources(torch.Generator().manual_seed(7), 1)
    same(inc, bat, src, [[3, 4]])
    copy = pickle.loads(pickle.dumps(inc))
    assert copy.num_decoder_states == 0 and len(copy._enc_cache) == 0
    same(copy, bat, src, [[3, 4, 5]])


def test_decode_batch_size_one_with_forced_calls(toy, model):
    """decode() at batch size 1 with <τ> forced every 3rd step: the same output whichever path answers."""
    inc, bat = pair(model)
    ex = toy["examples"][2]
    ids = torch.tensor([ex.student_src[0.2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    rule = lambda t, logits, calls: torch.full((1,), t % 3 == 1)  # noqa: E731
    outs = [decode(toy["student"], ids, mask, max_len=12, eos_id=-1, teacher=t, teacher_src=[ex.teacher_src],
                   allow_tau=False, tau_rule=rule) for t in (inc, bat)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].actions, outs[1].actions)
    assert outs[0].teacher_mask.sum() == 4 and inc.stats["incremental_rows"] == 4
    assert inc.stats["incremental_positions"] == 10 + 1  # last call at t = 10: prefix of 10 tokens


def test_a_failed_forward_forgets_the_state(model, monkeypatch):
    inc, bat = pair(model)
    src = random_sources(torch.Generator().manual_seed(8), 1)
    same(inc, bat, src, [[3, 4]])

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(model, "forward", boom)
        with pytest.raises(RuntimeError):
            inc.next_tokens(src, [[3, 4, 5]])
    assert inc.num_decoder_states == 0
    same(inc, bat, src, [[3, 4, 5, 6]])
    assert inc.num_decoder_states == 1
