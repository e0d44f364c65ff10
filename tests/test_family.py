"""The two model families behind one interface (tw_rl/models/family.py): a causal LM's acting, teacher-forced and
teacher paths give the numbers of the same computation done from first principles, as the T5's do."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import EOS, TOY_BUDGETS, TOY_MAX_LEN, V, _pad, greedy_reference, tiny_causal, tiny_t5
from tw_rl.decoding import decode, decode_teacher
from tw_rl.evaluation.speculative import speculative_generate, speculative_greedy
from tw_rl.models.family import CAUSAL, SEQ2SEQ, InputTemplate, Stepper, family_of, forced, left_align
from tw_rl.teacher import Teacher

KINDS = ("t5", "llama", "qwen2", "gpt2")


def _model(kind: str, seed: int = 0):
    return tiny_t5(V, seed=seed) if kind == "t5" else tiny_causal(kind, V, seed=seed, layers=2)


def _ragged(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randint(8, V, (n,), generator=g).tolist() + [EOS] for n in (5, 2, 3)]
    dec = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(8, V, (3, 5), generator=g)], 1)
    return srcs, dec


def test_left_align_moves_tokens_right_and_keeps_their_order() -> None:
    ids, mask = _pad([[5, 6, 7], [8], [9, 10]])
    out, m = left_align(ids, mask)
    assert out.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert m.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    again, m2 = left_align(out, m)  # already left-aligned: unchanged
    assert torch.equal(again, out) and torch.equal(m2, m)


@pytest.mark.parametrize("kind", KINDS)
def test_stepper_equals_the_forced_forward_and_each_row_alone(kind: str) -> None:
    model = _model(kind)
    assert family_of(model) == (SEQ2SEQ if kind == "t5" else CAUSAL)
    srcs, dec = _ragged()
    ids, mask = _pad(srcs)
    full = forced(model, ids, mask, dec_ids=dec).logits  # [B, L, V]
    for i, s in enumerate(srcs):  # each row alone, unpadded: padding changes nothing
        alone = forced(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool), dec_ids=dec[i:i + 1]).logits
        torch.testing.assert_close(full[i], alone[0], atol=1e-5, rtol=1e-5)
    one = Stepper(model, ids, mask)  # one position at a time
    steps = torch.cat([one.feed(ids=dec[:, t:t + 1]) for t in range(dec.shape[1])], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    chunks = Stepper(model, ids, mask)  # the first feed with more than the start, then a chunk
    got = torch.cat([chunks.feed(ids=dec[:, :2]), chunks.feed(ids=dec[:, 2:])], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    chunks.crop(3)  # forget positions 3..5, feed other tokens there
    other = dec.clone()
    other[:, 3:] = (dec[:, 3:] + 1 - 8) % (V - 8) + 8
    torch.testing.assert_close(chunks.feed(ids=other[:, 3:]), forced(model, ids, mask, dec_ids=other).logits[:, 3:],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep 1"):
        chunks.crop(0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_forced_hidden_and_prompt_states(kind: str) -> None:
    model = _model(kind)
    srcs, dec = _ragged(1)
    ids, mask = _pad(srcs)
    out = forced(model, ids, mask, dec_ids=dec, hidden=True, prompt=True)
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden), out.logits, atol=1e-5, rtol=1e-5)
    short = forced(model, ids, mask, dec_ids=dec, hidden=True)  # the output layer on the output positions only
    assert short.prompt is None
    torch.testing.assert_close(short.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.hidden, out.hidden, atol=1e-5, rtol=1e-5)
    assert out.prompt.shape[:2] == ids.shape and out.prompt_mask.tolist() == left_align(ids, mask)[1].tolist()
    st = Stepper(model, ids, mask)
    st.feed(ids=dec[:, :1], read_prompt=True)
    torch.testing.assert_close(st.prompt, out.prompt, atol=1e-5, rtol=1e-5)


def test_causal_toy_decodes_as_the_first_principles_reference(causal_toy) -> None:
    """decode (KV caches, left padding, δ on called tokens, the teacher's per-sequence cache) equals greedy acting
    recomputed from full forwards, for every example and budget; the pair's outputs vary, end and call (checked by
    the fixture)."""
    st, teacher, ex = causal_toy["student"], causal_toy["teacher"], causal_toy["examples"]
    for b in TOY_BUDGETS:
        ids, mask = _pad([e.student_src[b] for e in ex])
        out = decode(st, ids, mask, max_len=TOY_MAX_LEN, eos_id=EOS, teacher=teacher,
                     teacher_src=[e.teacher_src for e in ex])
        for k, e in enumerate(ex):
            actions, tokens, _ = greedy_reference(st, teacher.model, e.student_src[b], e.teacher_src, TOY_MAX_LEN, EOS)
            n = out.lengths[k]
            assert out.actions[k, :n].tolist() == actions and out.tokens[k, :n].tolist() == tokens, (b, k)


def test_causal_teacher_paths_agree(causal_toy) -> None:
    teacher_model = causal_toy["teacher"].model
    ex = causal_toy["examples"]
    src = [e.teacher_src for e in ex]
    prefixes = [[9, 10, 11][:k % 4] for k in range(len(ex))]
    inc = Teacher(teacher_model, vocab_size=V, incremental_max_rows=1)
    bat = Teacher(teacher_model, vocab_size=V, incremental_max_rows=0)
    one = [inc.next_tokens([s], [p]) for s, p in zip(src, prefixes)]
    w, lp = bat.next_tokens(src, prefixes)
    assert [o[0][0] for o in one] == w
    assert [o[1][0] for o in one] == pytest.approx(lp, abs=1e-5)
    # a call after more tokens extends the kept state (one forward over the new tokens only)
    before = inc.stats["incremental_positions"]
    inc.next_tokens([src[0]], [prefixes[0] + [12, 13]])
    assert inc.stats["incremental_positions"] - before == 2 and inc.stats["state_hits"] == 1
    # scoring = the forced log-probs; generate = the teacher alone in tw-rl's loop
    gen = bat.generate(src, max_len=TOY_MAX_LEN, eos_id=EOS)
    ids, mask = _pad(src)
    alone = decode_teacher(teacher_model, ids, mask, max_len=TOY_MAX_LEN, eos_id=EOS, vocab_size=V)
    assert gen == [alone.tokens[k, :alone.lengths[k]].tolist() for k in range(len(ex))]
    assert all(g[-1] == EOS for g in gen)
    scores = bat.score(src, gen)
    for k, (s, g) in enumerate(zip(src, gen)):
        dec = torch.tensor([[0] + g[:-1]])
        lp_all = torch.log_softmax(forced(teacher_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool),
                                          dec_ids=dec).logits[0].float(), -1)
        assert scores[k].tolist() == pytest.approx(lp_all[torch.arange(len(g)), torch.tensor(g)].tolist(), abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_stacked_teacher_caches_agree_with_the_full_prefix_forward(kind) -> None:
    """Teacher(stack_caches=True): the rows' own KV caches, of different lengths, stacked into one forward over the
    new tokens only, answer what one padded forward over every full prefix answers (tokens exactly, log-probs to
    float rounding) over several rounds of growing prefixes: rows fresh and kept, rows advancing by different
    counts, a row asking again for what it holds, two rows asking the same thing, a row that went through the
    one-row incremental path in between."""
    model = tiny_causal(kind, V, d_model=32, seed=3, layers=2)
    torch.manual_seed(0)
    src = [torch.randint(2, V, (n,)).tolist() for n in (3, 7, 5, 9, 4)]
    out = [torch.randint(2, V, (12,)).tolist() for _ in src]
    stacked = Teacher(model, vocab_size=V, incremental_max_rows=0, stack_caches=True)
    full = Teacher(model, vocab_size=V, incremental_max_rows=0)
    reuse = Teacher(model, vocab_size=V, incremental_max_rows=0, stack_caches=True, reuse_prefixes=True)
    alt = [o[:3] + torch.randint(2, V, (9,)).tolist() for o in out]  # agrees with out for 3 tokens
    rounds = [  # (row, prefix length) per request
        [(0, 0), (1, 2), (2, 1), (3, 0)],
        [(0, 1), (1, 5), (2, 1), (3, 4), (4, 3)],  # row 2 asks again; row 4 is new
        [(0, 6), (1, 6), (1, 6), (4, 3), (2, 9)],  # a duplicate row
        [(0, 11), (3, 10), (4, 7), (1, 12), (2, 10)],
        [(0, -6), (1, -2), (2, -9), (3, -5), (4, -4)],  # another decode of the same inputs: alt[:n], diverging
    ]
    padded = 0  # the positions of the full-prefix forwards, padding included
    for k, request in enumerate(rounds):
        s = [src[r] for r, _ in request]
        p = [out[r][:n] if n >= 0 else alt[r][:-n] for r, n in request]
        padded += len(request) * max(len(a) + len(b) + 1 for a, b in zip(s, p))
        w, lp = stacked.next_tokens(s, p)
        w_full, lp_full = full.next_tokens(s, p)
        w_reuse, lp_reuse = reuse.next_tokens(s, p)
        assert w == w_full == w_reuse, (kind, k)
        assert lp == pytest.approx(lp_full, abs=1e-5) and lp_reuse == pytest.approx(lp_full, abs=1e-5), (kind, k)
        if k == 1:  # one row through the one-row incremental path: its state is extended there, then stacked again
            one = Teacher(model, vocab_size=V)
            stacked.incremental_max_rows = 1
            assert stacked.next_tokens([src[3]], [out[3][:7]])[0] == one.next_tokens([src[3]], [out[3][:7]])[0]
            stacked.incremental_max_rows = 0
    st = stacked.stats
    assert st["stacked_rows"] == sum(len(r) for r in rounds) and st["batched_rows"] == 0
    # each row's input is fed once; later requests feed the new tokens only (padded to the block's width)
    assert st["stacked_positions"] < padded / 2
    # the last round: stacked keeps its states (4 per source) and reads each input again; reuse_prefixes crops the
    # kept ones back to the start they share with alt (the input and up to 3 tokens) and feeds only the rest
    assert st["state_misses"] == 2 * len(src) and reuse.stats["state_misses"] == len(src)
    assert reuse.stats["state_crops"] == len(src)
    assert reuse.stats["stacked_positions"] < st["stacked_positions"]
    with pytest.raises(ValueError, match="stack_caches .*seq2seq"):
        Teacher(tiny_t5(V, d_model=16, seed=1), vocab_size=V, stack_caches=True)


def test_causal_speculative_decoding_is_lossless(causal_toy) -> None:
    teacher = causal_toy["teacher"]
    draft = tiny_causal("llama", V, d_model=32, seed=5, layers=1)  # an untrained draft: most tokens rejected
    for e in causal_toy["examples"]:
        want = teacher.generate([e.teacher_src], TOY_MAX_LEN, EOS)[0]
        s = speculative_greedy(teacher.model, draft, e.teacher_src, TOY_MAX_LEN, EOS, 0, draft_tokens=3)
        assert s.tokens == want and all(s.from_teacher) and 1 <= s.teacher_passes <= len(want)
        toks, passes = speculative_generate(teacher.model, draft, e.teacher_src, TOY_MAX_LEN, EOS)
        assert toks == want and passes >= 1


def _word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "user", "assistant", "hello", "budget", "5%:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_input_templates() -> None:
    plain = InputTemplate(_word_tokenizer(), CAUSAL)
    assert plain.inputs(["budget 5%: hello"]) == [[6, 7, 5, 1]]  # x then EOS, the separator
    assert plain.targets(["hello"]) == [[5, 1]]
    assert InputTemplate(_word_tokenizer(), SEQ2SEQ).inputs(["hello"]) == [[5]]  # the tokenizer's own specials
    chat = InputTemplate(_word_tokenizer(
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"), CAUSAL)
    assert chat.chat and chat.inputs(["budget 5%: hello"]) == [[3, 6, 7, 5, 4]]
    chat.check_keeps("budget 5%: hello")
    assert InputTemplate(chat.tokenizer, CAUSAL, use_chat_template=False).inputs(["hello"]) == [[5, 1]]
    dropping = InputTemplate(_word_tokenizer("{% for m in messages %}{{ m['role'] }} {% endfor %}assistant "),
                             CAUSAL)
    with pytest.raises(ValueError, match="does not keep the user message"):
        dropping.check_keeps("budget 5%: hello")


def test_make_examples_writes_each_role_by_its_template_with_the_task_prompt() -> None:
    from tw_rl.data import Pair
    from tw_rl.examples import make_examples

    tok = _word_tokenizer("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant {% endif %}")
    pairs = [Pair("hello", "hello")]
    seq2seq = make_examples(pairs, tok, [0.05], "budget {pct}%: ")  # the default: the tokenizer's own specials
    assert seq2seq[0].teacher_src == [5] and seq2seq[0].student_src[0.05] == [6, 7, 5]
    chat = InputTemplate(tok, CAUSAL)
    ex = make_examples(pairs, tok, [0.05], "budget {pct}%: ", InputTemplate(tok, CAUSAL, use_chat_template=False),
                       chat, task_prompt="hello ")
    assert ex[0].teacher_src == [5, 5, 1]  # task prompt, x, EOS (plain)
    assert ex[0].student_src[0.05] == [3, 6, 7, 5, 5, 4]  # user: budget prompt, task prompt, x; assistant
    assert ex[0].text == "hello"  # the raw text: prompts are added where an input is written
