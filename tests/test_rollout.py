"""RolloutWorker in local mode (no Ray) against the token-MDP environment and the teacher (SPEC §2, §3)."""

import copy

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tw_rl.envs.token_mdp import TokenMDPEnv
from tests.conftest import greedy_reference, tiny_t5
from tw_rl.batch import EpisodeBatch
from tw_rl.models.student import Student
from tw_rl.rollout import RolloutWorker

MAX_LEN = 8
BUDGETS = [0.0, 0.2, 0.5]


def make_worker(toy, student=None, seed=0, worker_index=0, batch_size=12, temperature=1.0):
    return RolloutWorker(student if student is not None else copy.deepcopy(toy["student"]), toy["teacher"],
                         toy["examples"], BUDGETS, max_len=MAX_LEN, eos_id=toy["eos"], temperature=temperature,
                         batch_size=batch_size, seed=seed, worker_index=worker_index, num_threads=1)


def other_student(toy, seed=7):
    base = tiny_t5(toy["V"], seed=seed)
    base.resize_token_embeddings(toy["V"] + 1)
    return Student(base, tau_id=toy["V"]).eval()


def test_episodes_replay_exactly_in_the_env(toy):
    """Stepping TokenMDPEnv with an episode's actions gives its tokens, teacher marks, end and rewards."""
    worker = make_worker(toy, batch_size=16)
    res = worker.sample()
    eps = res.episodes
    assert len(eps) == 16 and res.stats.episodes == 16
    assert any(e.teacher_mask.any() for e in eps), "the toy student should call the teacher sometimes"
    assert any((~e.teacher_mask).any() for e in eps)
    env = TokenMDPEnv(toy["examples"], toy["teacher"], n_actions=toy["V"] + 1, eos_id=toy["eos"], budgets=BUDGETS,
                      max_len=MAX_LEN, max_src_len=10)
    by_src = {tuple(ex.student_src[b]): (i, b) for i, ex in enumerate(toy["examples"]) for b in BUDGETS}
    for e in eps:
        i, b = by_src[tuple(e.src_ids.tolist())]
        assert b == e.budget
        env.reset(options={"example": i, "budget": b})
        rewards = []
        for a in e.actions:
            obs, r, term, trunc, info = env.step(int(a))
            rewards.append(r)
        n = len(e)
        assert obs["prefix"][:n].tolist() == e.tokens.tolist()
        assert obs["teacher_mask"][:n].astype(bool).tolist() == e.teacher_mask.tolist()
        assert (term, trunc) == (e.terminated, not e.terminated)
        np.testing.assert_allclose(e.teacher_logprobs, rewards, atol=1e-5)
        # the reward is exactly what the teacher's score says for the final output
        score = toy["teacher"].score([toy["examples"][i].teacher_src], [e.tokens.tolist()])[0]
        np.testing.assert_allclose(e.teacher_logprobs, score, atol=1e-6)
        assert e.policy_version == 0 and e.source == "onpolicy"
        assert e.behavior_logprobs.dtype == np.float32 and (e.behavior_logprobs <= 0).all()
    # the worker's stats add up
    assert res.stats.tokens == sum(len(e) for e in eps)
    assert res.stats.teacher_calls == sum(int(e.teacher_mask.sum()) for e in eps)
    assert 1 <= res.stats.teacher_requests <= MAX_LEN
    assert res.stats.tokens_per_s > 0
    EpisodeBatch.collate(eps)  # the data contract holds


def test_behavior_logprobs_are_the_students(toy):
    """log μ(a_t|s_t) recorded while acting equals the training forward's log-softmax at temperature 1."""
    worker = make_worker(toy, batch_size=6)
    student = worker.student
    for e in worker.sample().episodes:
        src = torch.as_tensor(e.src_ids)[None]
        dec = torch.as_tensor(np.concatenate([[0], e.tokens[:-1]]))[None]
        tm = torch.as_tensor(np.concatenate([[False], e.teacher_mask[:-1]]))[None]
        with torch.no_grad():
            lp = torch.log_softmax(student(src, src > 0, dec, tm)[0], -1)
        want = lp[torch.arange(len(e)), torch.as_tensor(e.actions)].numpy()
        np.testing.assert_allclose(e.behavior_logprobs, want, atol=1e-4)


def test_budgets_and_examples_are_drawn_uniformly(toy):
    worker = make_worker(toy, batch_size=300)
    eps = worker.sample().episodes
    counts = np.array([sum(e.budget == b for e in eps) for b in BUDGETS])
    assert counts.sum() == 300 and counts.min() > 60  # expected 100 each
    assert len({tuple(e.src_ids.tolist()) for e in eps}) == len(toy["examples"]) * len(BUDGETS)


def test_set_weights_changes_policy_and_version(toy):
    worker = make_worker(toy)
    before = worker.sample(seed=5).episodes
    assert worker.sample(seed=5).episodes[0].actions.tolist() == before[0].actions.tolist()  # seeded call
    new = other_student(toy)
    worker.set_weights(new.state_dict(), version=3)
    after = worker.sample(seed=5).episodes
    assert all(e.policy_version == 3 for e in after)
    # same examples and budgets (same call seed), different policy
    assert [e.src_ids.tolist() for e in after] == [e.src_ids.tolist() for e in before]
    assert [e.actions.tolist() for e in after] != [e.actions.tolist() for e in before]
    # the replica now acts exactly like the new student
    ref = make_worker(toy, student=new).sample(seed=5).episodes
    assert [e.actions.tolist() for e in after] == [e.actions.tolist() for e in ref]
    np.testing.assert_allclose(np.concatenate([e.behavior_logprobs for e in after]),
                               np.concatenate([e.behavior_logprobs for e in ref]), atol=1e-6)


def test_seeding_per_worker(toy):
    a0, b0 = make_worker(toy, seed=1), make_worker(toy, seed=1)
    a1 = make_worker(toy, seed=1, worker_index=1)
    ea, eb, e1 = a0.sample().episodes, b0.sample().episodes, a1.sample().episodes
    assert [e.actions.tolist() for e in ea] == [e.actions.tolist() for e in eb]
    assert [e.src_ids.tolist() for e in ea] != [e.src_ids.tolist() for e in e1]
    # the worker's own stream moves on between calls
    assert [e.src_ids.tolist() for e in a0.sample().episodes] != [e.src_ids.tolist() for e in ea]


def test_temperature_zero_is_greedy(toy):
    """Temperature 0: each row is the student's greedy path (the argmax of full forwards, the teacher's argmax on
    a call); a row that never picked <τ> is plain generate."""
    student = copy.deepcopy(toy["student"])
    res = RolloutWorker(student, toy["teacher"], toy["examples"], BUDGETS, max_len=MAX_LEN, eos_id=toy["eos"],
                        temperature=0.0, batch_size=24, seed=0).sample()
    src_of = {tuple(ex.student_src[b]): ex for ex in toy["examples"] for b in BUDGETS}
    for e in res.episodes:
        actions, tokens, called = greedy_reference(student, toy["teacher"].model, e.src_ids.tolist(),
                                                   src_of[tuple(e.src_ids.tolist())].teacher_src, MAX_LEN, toy["eos"])
        assert (e.actions.tolist(), e.tokens.tolist(), e.teacher_mask.tolist()) == (actions, tokens, called)
        assert e.terminated == (tokens[-1] == toy["eos"]) and (e.behavior_logprobs <= 0).all()
        assert e.teacher_mask.any() == (e.budget > 0)  # the toy calls at b > 0 only
    plain = [e for e in res.episodes if not e.teacher_mask.any()]
    assert plain and len(plain) < len(res.episodes)
    assert len({tuple(e.tokens.tolist()) for e in plain}) >= 3
    for e in plain:
        gen = student.model.generate(input_ids=torch.as_tensor(e.src_ids)[None], max_new_tokens=MAX_LEN,
                                     do_sample=False, num_beams=1)[0, 1:].tolist()
        if toy["eos"] in gen:
            gen = gen[:gen.index(toy["eos"]) + 1]
        assert e.tokens.tolist() == gen


def test_from_student_dir(toy, tmp_path):
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(toy["V"])}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1", unk_token="w2")
    toy["student"].save(tmp_path / "student", tok)
    worker = RolloutWorker.from_student_dir(tmp_path / "student", toy["teacher"], toy["examples"], BUDGETS,
                                            max_len=MAX_LEN, eos_id=toy["eos"], temperature=1.0, batch_size=8,
                                            seed=0)
    ref = make_worker(toy, batch_size=8)
    assert [e.actions.tolist() for e in worker.sample().episodes] == [e.actions.tolist() for e in ref.sample().episodes]


def test_rejects_a_budget_without_prompt(toy):
    with pytest.raises(ValueError, match="no student input for budgets"):
        RolloutWorker(toy["student"], toy["teacher"], toy["examples"], [0.3], max_len=MAX_LEN, eos_id=toy["eos"],
                      temperature=1.0, batch_size=4, seed=0)


def test_sampled_actions_follow_the_policy(toy):
    """Sampling at temperature T draws a_0 from softmax(logits / T) (decode's Gumbel-max sampler)."""
    from tw_rl.decoding import decode

    student = toy["student"]
    src = torch.as_tensor(toy["examples"][0].student_src[0.2])
    n = 20000
    ids, mask = src.repeat(n, 1), torch.ones(n, len(src), dtype=torch.bool)
    with torch.no_grad():
        start = torch.zeros(1, 1, dtype=torch.long)
        logits = student(src[None], mask[:1], start, start.bool())[0, 0]
    for T in (1.0, 2.0):
        out = decode(student, ids, mask, max_len=1, eos_id=toy["eos"], allow_tau=False, temperature=T,
                     generator=torch.Generator().manual_seed(0))
        p = torch.softmax(logits[:toy["V"]] / T, -1).numpy()
        freq = np.bincount(out.actions[:, 0], minlength=toy["V"] + 1) / n
        assert freq[toy["V"]] == 0  # <τ> masked
        # total variation: ~0.01 from noise; ignoring T would give 0.19 here
        assert 0.5 * np.abs(freq[:toy["V"]] - p).sum() < 0.02
        lp = torch.log_softmax(logits[:toy["V"]] / T, -1).numpy()
        np.testing.assert_allclose(out.behavior_logprobs[:, 0], lp[out.actions[:, 0]], atol=1e-5)


def test_greedy_rows_decode_held_out_inputs(toy):
    """With greedy_examples, the greedy rows draw their inputs from them (source "greedy_heldout"), decode
    greedily, and the sampled rows still draw from the training examples."""
    train, held = toy["examples"][:3], toy["examples"][3:]
    assert held, "the toy needs more than 3 examples"
    worker = RolloutWorker(copy.deepcopy(toy["student"]), toy["teacher"], train, BUDGETS, max_len=MAX_LEN,
                           eos_id=toy["eos"], temperature=1.0, batch_size=20, seed=0, greedy_fraction=0.5,
                           greedy_examples=held)
    eps = worker.sample(seed=3).episodes
    src_of = lambda exs: {tuple(ex.student_src[b]) for ex in exs for b in BUDGETS}  # noqa: E731
    assert [e.source for e in eps] == ["greedy_heldout"] * 10 + ["onpolicy"] * 10
    assert all(tuple(e.src_ids.tolist()) in src_of(held) for e in eps[:10])
    assert all(tuple(e.src_ids.tolist()) in src_of(train) for e in eps[10:])
    again = worker.sample(seed=3).episodes
    assert [e.tokens.tolist() for e in again[:10]] == [e.tokens.tolist() for e in eps[:10]]
    # greedy rows are the temperature-0 path (argmax of full forwards); sampled rows are not all their greedy path
    teacher_src = {tuple(ex.student_src[b]): ex.teacher_src for ex in toy["examples"] for b in BUDGETS}
    sampled_differ = 0
    for k, e in enumerate(eps):
        src = e.src_ids.tolist()
        actions, tokens, called = greedy_reference(worker.student, toy["teacher"].model, src, teacher_src[tuple(src)],
                                                   MAX_LEN, toy["eos"])
        if k < 10:
            assert (e.actions.tolist(), e.tokens.tolist(), e.teacher_mask.tolist()) == (actions, tokens, called)
        else:
            sampled_differ += e.actions.tolist() != actions
    assert sampled_differ >= 3, sampled_differ
    assert any(e.teacher_mask.any() for e in eps[:10])  # the greedy rows include calls


def test_dual_usage_follows_the_chosen_episodes():
    from tw_rl.batch import Episode
    from tw_rl.train import dual_episodes, usage_by_budget

    def ep(source, calls):  # a call: the action (<τ> = 9) differs from the token appended
        return Episode(src_ids=np.array([1]), actions=np.array([9 if c else 1 for c in calls]),
                       tokens=np.ones(len(calls), np.int64), teacher_logprobs=np.zeros(len(calls), np.float32),
                       behavior_logprobs=np.zeros(len(calls), np.float32), budget=0.2, terminated=True,
                       policy_version=0, source=source)

    eps = [ep("greedy_heldout", [1, 0, 0, 0]), ep("greedy", [1, 1, 0, 0]), ep("onpolicy", [1, 1, 1, 1])]
    assert [e.source for e in dual_episodes(eps, "heldout")] == ["greedy_heldout"]
    assert [e.source for e in dual_episodes(eps, "greedy")] == ["greedy"]
    assert len(dual_episodes(eps, "all")) == 3
    assert len(dual_episodes(eps[1:], "heldout")) == 2  # none of the chosen kind: all of them
    assert usage_by_budget(dual_episodes(eps, "heldout"))[0.2] == pytest.approx(0.25)
