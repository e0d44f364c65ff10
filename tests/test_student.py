"""The student: <τ> as the last action, the offset δ on teacher tokens, save → load identity."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_t5
from tw_rl.models.student import TAU_TOKEN, Student


def word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_student():
    tok = word_tokenizer([f"w{i}" for i in range(13)])
    model = tiny_t5(len(tok))
    student = Student.from_base(model, tok)
    with torch.no_grad():
        student.delta.normal_()
    return student.eval(), tok


def test_tau_is_the_last_action():
    student, tok = make_student()
    assert student.tau_id == len(tok) - 1 == tok.convert_tokens_to_ids(TAU_TOKEN)
    assert student.n_actions == 17
    ids = torch.tensor([[3, 4, 1]])
    logits = student(ids, ids > 0, torch.tensor([[0, 5]]), torch.tensor([[False, False]]))
    assert logits.shape == (1, 2, 17)


def test_delta_changes_only_teacher_positions():
    student, _ = make_student()
    src = torch.tensor([[3, 4, 5, 1]])
    dec = torch.tensor([[0, 6, 7, 8]])
    plain = student(src, src > 0, dec, torch.zeros_like(dec, dtype=torch.bool))
    marked = student(src, src > 0, dec, torch.tensor([[False, False, True, False]]))
    # causal decoder: positions before the marked token are unchanged, from it on they differ
    torch.testing.assert_close(plain[:, :2], marked[:, :2])
    assert (plain[:, 2:] - marked[:, 2:]).abs().max() > 1e-4
    student.use_delta = False
    torch.testing.assert_close(student(src, src > 0, dec, torch.tensor([[False, False, True, False]])), plain)


def test_incremental_step_equals_full_forward():
    student, _ = make_student()
    src = torch.tensor([[3, 4, 5, 1], [6, 7, 1, 0]])
    smask = src > 0
    dec = torch.tensor([[0, 6, 7, 8], [0, 9, 10, 11]])
    tmask = torch.tensor([[False, True, False, True], [False, False, True, True]])
    full = student(src, smask, dec, tmask)
    enc, cache = student.encode(src, smask), student.new_cache()
    steps = torch.stack([student.step(enc, smask, dec[:, t], tmask[:, t], cache) for t in range(4)], 1)
    torch.testing.assert_close(full, steps, atol=1e-5, rtol=1e-5)


def test_save_load_identical_logits(tmp_path):
    student, tok = make_student()
    student.save(tmp_path / "s", tok)
    loaded, tok2 = Student.load(tmp_path / "s")
    loaded.eval()
    assert loaded.tau_id == student.tau_id and tok2.convert_tokens_to_ids(TAU_TOKEN) == student.tau_id
    src = torch.tensor([[3, 4, 5, 1]])
    dec = torch.tensor([[0, 6, 7, 8]])
    tm = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(student(src, src > 0, dec, tm), loaded(src, src > 0, dec, tm), atol=0, rtol=0)


def test_load_rejects_a_plain_model_dir(tmp_path):
    tiny_t5(10).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved tw-rl student"):
        Student.load(tmp_path)
