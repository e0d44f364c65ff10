"""Phase-1 oracle: KL ranking, marks, traces and the BC loss."""

import numpy as np
import pytest
import torch

from tw_rl.oracle import Reference, bc_loss, kl_teacher_student, mark_positions, oracle_episode
from tw_rl.envs.token_mdp import Example


def test_kl_matches_closed_form():
    t = torch.log_softmax(torch.randn(5, 7), -1)
    s = torch.randn(5, 8)  # one extra action (<τ>) that the oracle ignores
    ps = torch.softmax(s[:, :7], -1)
    want = (t.exp() * (t - ps.log())).sum(-1)
    torch.testing.assert_close(kl_teacher_student(t, s), want)
    assert torch.all(kl_teacher_student(t, torch.cat([t, torch.zeros(5, 1)], -1)) < 1e-6)  # KL(p‖p) = 0


@pytest.mark.parametrize("b, k", [(0.0, 0), (0.2, 2), (0.25, 2), (0.5, 5), (1.0, 10)])
def test_marks_are_top_round_bT(b, k):
    kl = np.array([0.1, 3.0, 0.2, 2.0, 0.2, 0.0, 5.0, 0.2, 1.0, 0.3], dtype=np.float32)
    marks = mark_positions(kl, b)
    assert marks.sum() == k == round(b * 10)
    if k:
        assert kl[marks].min() >= kl[~marks].max() if k < 10 else True
    # ties go to the earlier position
    assert mark_positions(np.ones(4, np.float32), 0.5).tolist() == [True, True, False, False]


def test_oracle_episode_is_a_valid_trace():
    ref = Reference(tokens=np.array([5, 6, 7, 1]), teacher_logprobs=np.array([-.1, -.2, -.3, -.4], np.float32),
                    kl=np.array([0.1, 2.0, 0.3, 0.0], np.float32), terminated=True)
    ex = Example(teacher_src=[3, 1], student_src={0.5: [9, 3, 1]})
    e = oracle_episode(ex, ref, 0.5, tau_id=10)
    assert e.actions.tolist() == [5, 10, 10, 1] and e.tokens.tolist() == [5, 6, 7, 1]
    assert e.teacher_mask.tolist() == [False, True, True, False] and e.usage() == 0.5
    assert e.src_ids.tolist() == [9, 3, 1] and e.terminated and e.policy_version == -1


def test_bc_loss_hand_computed():
    logits = torch.randn(1, 3, 4)  # A = 4, V = 3, <τ> = 3
    actions = torch.tensor([[0, 3, 2]])
    mask = torch.tensor([[True, True, False]])
    tmask = torch.tensor([[False, True, False]])
    t_logp = torch.log_softmax(torch.randn(1, 3, 3), -1)
    loss, stats = bc_loss(logits, actions, mask, tmask, t_logp, distill_weight=0.5)
    lp = torch.log_softmax(logits, -1)[0]
    ce = -(lp[0, 0] + lp[1, 3]) / 2
    kd = -(t_logp[0, 0].exp() * lp[0, :3]).sum()  # only the unmarked valid position 0
    torch.testing.assert_close(loss, ce + 0.5 * kd)
    assert stats["loss/bc_ce"] == pytest.approx(float(ce), rel=1e-5)


def test_wrong_first_marks_the_students_errors_before_high_kl_positions():
    kl = np.array([0.1, 3.0, 0.2, 2.0, 0.5], dtype=np.float32)
    wrong = np.array([True, False, False, False, True])
    assert mark_positions(kl, 0.4, wrong).tolist() == [True, False, False, False, True]  # both errors, KL ignored
    assert mark_positions(kl, 0.2, wrong).tolist() == [False, False, False, False, True]  # higher-KL error first
    assert mark_positions(kl, 0.6, wrong).tolist() == [True, True, False, False, True]  # then by KL
    ref = Reference(tokens=np.array([5, 6, 7, 8, 1]), teacher_logprobs=np.zeros(5, np.float32), kl=kl,
                    terminated=True, student_wrong=wrong)
    ex = Example(teacher_src=[3, 1], student_src={0.4: [9, 3, 1]})
    assert oracle_episode(ex, ref, 0.4, tau_id=10, rank="wrong_first").actions.tolist() == [10, 6, 7, 8, 10]
    assert oracle_episode(ex, ref, 0.4, tau_id=10, rank="kl").actions.tolist() == [5, 10, 7, 10, 1]
    with pytest.raises(ValueError, match="known"):
        oracle_episode(ex, ref, 0.4, tau_id=10, rank="entropy")
    with pytest.raises(ValueError, match="student_wrong"):
        oracle_episode(ex, Reference(ref.tokens, ref.teacher_logprobs, kl, True), 0.4, 10, rank="wrong_first")


def test_build_references_flags_the_students_greedy_errors():
    from tw_rl.oracle import build_references

    class Teacher:  # always the same distribution over V = 4; greedy path [2, 1] (1 = EOS)
        def generate(self, src, max_len, eos_id):
            return [[2, 1] for _ in src]

        def distributions(self, src, outs):
            return torch.log_softmax(torch.tensor([[0., 0., 3., 0.], [0., 3., 0., 0.]]), -1).expand(len(src), 2, 4)

    class Student(torch.nn.Module):  # greedy 2 then 3: right at t = 0, wrong at t = 1; an encoder-decoder
        config = type("Config", (), {"is_encoder_decoder": True})()

        def forward(self, input_ids, attention_mask, decoder_input_ids, **kw):
            logits = torch.tensor([[0., 0., 5., 0.], [0., 0., 0., 5.]]).expand(len(input_ids), 2, 4)
            return type("Out", (), {"logits": logits, "encoder_last_hidden_state": None})()

    refs = build_references([Example(teacher_src=[3, 1], student_src={})], Teacher(), Student(), max_len=4, eos_id=1)
    assert refs[0].student_wrong.tolist() == [False, True] and refs[0].terminated
    assert refs[0].kl[1] > refs[0].kl[0] > 0


def test_corpus_quota_marks_the_hardest_positions_of_the_whole_corpus():
    from tw_rl.oracle import corpus_thresholds

    kl = [np.array([5.0, 0.1, 0.2, 0.3], dtype=np.float32), np.array([4.0, 3.0, 2.0, 0.4, 0.5, 1.0], dtype=np.float32)]
    refs = [Reference(np.arange(2, 2 + len(k)), np.zeros(len(k), np.float32), k, True) for k in kl]
    th = corpus_thresholds(refs, [0.0, 0.2, 0.5])
    assert set(th) == {0.2, 0.5}  # b = 0 never marks
    ex = Example(teacher_src=[3, 1], student_src={b: [9, 3, 1] for b in (0.0, 0.2, 0.5)})
    marked = [[oracle_episode(ex, r, b, 99, threshold=th.get(b)).actions == 99 for r in refs] for b in (0.0, 0.2, 0.5)]
    # 10 positions: b = 0.2 marks the 2 largest KLs (5.0 and 4.0), b = 0.5 the 5 largest (5, 4, 3, 2, 1) —
    # the hard second sequence gets 4 of them, the easy first one only 1 (a per-sequence quota would give 2 + 3)
    assert [m.sum() for m in marked[0]] == [0, 0]
    assert [m.tolist() for m in marked[1]] == [[True, False, False, False], [True] + [False] * 5]
    assert [m.tolist() for m in marked[2]] == [[True, False, False, False],
                                               [True, True, True, False, False, True]]


def test_bc_loss_with_gradients_warns_nothing():
    import warnings

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(2, 3, 4), -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad warns (oracle.py, issue 16)
        loss, stats = bc_loss(logits, torch.zeros(2, 3, dtype=torch.long), mask, ~mask, t_logp, distill_weight=1.0)
    loss.backward()
    assert stats["loss/bc_distill"] > 0 and logits.grad is not None
