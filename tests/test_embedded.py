"""The embedded task: determinism, disjoint splits, rare words as several pieces, Zipf counts, reordering."""

import collections
import dataclasses
import math

import pytest

from tw_rl.config import EmbeddedTaskConfig, load_config
from tw_rl.prompt import budget_prompt
from tw_rl.data import DataError, load_split
from tw_rl.data.embedded import EmbeddedTask
from tw_rl.models.tokenizer import budget_prompt_texts, train_tokenizer

SMALL = EmbeddedTaskConfig(n_common=120, n_rare=400, n_train=3000, n_validation=100, n_test=100)


@pytest.fixture(scope="module")
def task():
    return EmbeddedTask(SMALL)


@pytest.fixture(scope="module")
def default_task_and_tokenizer():
    cfg = load_config(None, [])
    task = EmbeddedTask(cfg.data.embedded)
    tok = train_tokenizer(task.texts(), cfg.tokenizer.vocab_size, budget_prompt_texts(cfg.budget_prompt))
    return cfg, task, tok


def test_deterministic_given_seed(task):
    again = EmbeddedTask(dataclasses.replace(SMALL))
    for name in ("train", "validation", "test"):
        assert again.split(name) == task.split(name)


def test_different_seed_differs(task):
    other = EmbeddedTask(dataclasses.replace(SMALL, task_seed=SMALL.task_seed + 1))
    assert other.split("test")[:20] != task.split("test")[:20]
    assert other.lexicon["NOUN"][0] != task.lexicon["NOUN"][0]


def test_splits_sizes_disjoint_and_origins(task):
    splits = {n: task.split(n) for n in ("train", "validation", "test")}
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [3000, 100, 100]
    sources = {n: {p.source for p in ps} for n, ps in splits.items()}
    assert len(sources["train"]) == 3000  # no duplicates inside a split either
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]
    assert splits["train"][17].origin == "embedded[train]#17"
    assert splits["test"][0].origin == "embedded[test]#0"


def test_held_out_splits_do_not_depend_on_train_size(task):
    bigger = EmbeddedTask(dataclasses.replace(SMALL, n_train=4000))
    assert bigger.split("test") == task.split("test")
    assert bigger.split("validation") == task.split("validation")


def test_unknown_split_lists_valid_ones(task):
    with pytest.raises(DataError, match=r"'dev'.*\['train', 'validation', 'test'\]"):
        task.split("dev")


def test_load_split_dispatches_to_embedded():
    cfg = load_config(None, ["data.embedded.n_train=50", "data.embedded.n_test=10", "data.embedded.n_validation=10"])
    pairs = load_split(cfg.data, "test")
    assert len(pairs) == 10 and pairs[3].origin == "embedded[test]#3"


def test_reordering_rules_on_a_hand_checked_example(task):
    # source  DET ADJ NOUN VERB DET NOUN PREP DET ADJ NOUN
    # target  NOUN' ADJ' DET' | NOUN' DET' | NOUN' ADJ' DET' PREP' | VERB'
    pattern = ["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PREP", "DET", "ADJ", "NOUN"]
    sent = next(s for s in task.sentences("train") if [w.pos for w in s.words] == pattern)
    src = sent.source.split()
    t = [task.by_source[w].target for w in src]
    expected = [t[2], t[1], t[0], t[5], t[4], t[9], t[8], t[7], t[6], t[3]]
    pair = task.split("train")[task.sentences("train").index(sent)]
    assert pair.source == sent.source
    assert pair.target.split() == expected


def test_every_sentence_is_a_word_by_word_translation(task):
    for p in task.split("validation"):
        src, tgt = p.source.split(), p.target.split()
        assert sorted(task.by_source[w].target for w in src) == sorted(tgt)
        assert task.by_source[src[0]].pos == "DET"  # sentences start with a noun phrase
        verb = next(w for w in src if task.by_source[w].pos == "VERB")
        assert tgt[-1] == task.by_source[verb].target  # verb-final


def test_zipf_like_counts(task):
    counts = collections.Counter(w.source for s in task.sentences("train") for w in s.words if w.pos == "NOUN")
    nouns = task.lexicon["NOUN"]
    c = [counts[w.source] for w in nouns]
    # least-squares slope of log count on log rank over the well-sampled head: about -zipf_a
    pts = [(math.log(r + 1), math.log(c[r])) for r in range(40) if c[r] > 0]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    assert -SMALL.zipf_a - 0.3 < slope < -SMALL.zipf_a + 0.3
    # every rare word is at most as frequent as a common word of its class, in expectation: check the bulk
    n_common = sum(not w.rare for w in nouns)
    assert sum(c[:n_common]) / n_common > 5 * sum(c[n_common:]) / (len(c) - n_common)
    # the rare share matches the analytic value
    content = [w for s in task.sentences("train") for w in s.words if w.pos in ("NOUN", "ADJ", "VERB")]
    share = sum(w.rare for w in content) / len(content)
    assert abs(share - task.rare_mass()) < 0.03


def test_rare_targets_span_several_tokens_and_common_ones_one(default_task_and_tokenizer):
    cfg, task, tok = default_task_and_tokenizer
    words = [w for s in task.sentences("test") for w in s.words]
    rare = [w for w in words if w.rare]
    common = [w for w in words if not w.rare]
    assert len(rare) > 0.15 * len(words)  # rare words do appear
    rare_pieces = [len(tok.tokenize(w.target)) for w in rare]
    common_pieces = [len(tok.tokenize(w.target)) for w in common]
    assert sum(n >= 2 for n in rare_pieces) / len(rare) > 0.95
    assert sum(rare_pieces) / len(rare) >= 2.8
    assert sum(n == 1 for n in common_pieces) / len(common) > 0.85


def test_default_task_fits_the_token_limits(default_task_and_tokenizer):
    cfg, task, tok = default_task_and_tokenizer
    prompt = max(len(tok(budget_prompt(cfg.budget_prompt, p / 100), add_special_tokens=False)["input_ids"])
                 for p in range(101))
    assert prompt <= 6  # the prompts were in the tokenizer's training texts
    for name in ("train", "test"):
        pairs = task.split(name)
        src = max(len(ids) for ids in tok([p.source for p in pairs])["input_ids"])
        tgt = max(len(ids) for ids in tok([p.target for p in pairs])["input_ids"])
        assert src + prompt <= cfg.data.max_src_tokens
        assert tgt <= cfg.data.max_tgt_tokens <= 32
