"""The embedded task: a seeded, fully offline translation-like task whose difficulty varies inside each output.

Description
    A source sentence is drawn from a small grammar over a pseudo-word lexicon::

        S  -> NP VERB [NP] [PREP NP]        (the object is present with probability ``p_object``)
        NP -> DET [ADJ] NOUN                (the adjective is present with probability ``p_adjective``)

    Inside each word class (NOUN, ADJ, VERB, and the small closed classes DET and PREP) words are drawn with Zipf
    frequencies ``p(rank r) ∝ r^-zipf_a``. A content class ranks its ``common`` words first and its ``rare`` words
    after them, so every rare word is less frequent than every common word of its class; the share of rare words
    follows from ``zipf_a`` and the lexicon sizes (:meth:`EmbeddedTask.rare_mass`).

    The target is a word-by-word translation through a fixed random bijection of the lexicon into target
    pseudo-words, plus three reordering rules (the target language is head-final):

    1. a noun phrase is mirrored: ``DET ADJ NOUN -> NOUN' ADJ' DET'``;
    2. a preposition becomes a postposition: ``PREP NP -> NP' PREP'``;
    3. the verb moves to the end of the sentence: ``NP1 VERB NP2 PP -> NP1' NP2' PP' VERB'``.

    Common content words are two syllables on both sides (determiners and prepositions one), so a tokenizer
    trained on the task keeps them whole (one token each, except some of the least frequent). Rare words are
    ``rare_syllables`` syllables long on both sides and, because each is seen only a few times, the tokenizer spells
    them with several pieces. Translating a rare word is therefore pure memorisation of an arbitrary piece sequence
    -> piece sequence mapping, which takes capacity a tiny student lacks; the grammar, the reordering and the common
    words are cheap. The student's shortfall sits at the rare-word pieces (``docs/results.md``, phase 0).

Determinism
    Everything is a function of ``task_seed`` (and the sizes): the lexicon, the mapping and the splits. The test
    split is drawn first, then validation, then train, each sentence distinct from all earlier ones, so test and
    validation are disjoint from train and do not change when ``n_train`` changes.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from functools import cached_property

from tw_rl.data import DataError, Pair

SPLITS = ("train", "validation", "test")

# Source and target share one syllable inventory (CV and CVC): a subword vocabulary serves both sides.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "nrs"
_POS = ("NOUN", "ADJ", "VERB")
# share of each content class in the common and the rare lexicon
_POS_SHARE = {"NOUN": 0.5, "ADJ": 0.3, "VERB": 0.2}


@dataclass(frozen=True)
class Word:
    """A lexicon entry: a source pseudo-word and its fixed translation."""

    source: str
    target: str
    pos: str  # NOUN | ADJ | VERB | DET | PREP
    rare: bool
    rank: int  # 1-based frequency rank inside its word class (common words first)


@dataclass(frozen=True)
class Sentence:
    """One sampled sentence: source words in source order and their target order (indices into ``words``)."""

    words: tuple[Word, ...]
    target_order: tuple[int, ...]

    @property
    def source(self) -> str:
        return " ".join(w.source for w in self.words)

    @property
    def target(self) -> str:
        return " ".join(self.words[i].target for i in self.target_order)


def _zipf_cdf(n: int, a: float) -> list[float]:
    """Cumulative (unnormalised) Zipf weights ``r^-a`` for ranks 1..n."""
    return list(itertools.accumulate(r ** -a for r in range(1, n + 1)))


class EmbeddedTask:
    """The seeded task of ``cfg`` (:class:`tw_rl.config.EmbeddedTaskConfig`).

    ``split(name)`` returns the pairs of "train", "validation" or "test"; ``texts()`` the training texts (both
    sides) for tokenizer training; ``lexicon`` and ``sentences(name)`` expose the structure for analysis and tests.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        n_det, n_prep = cfg.n_determiners, cfg.n_prepositions
        if cfg.n_common - n_det - n_prep < 3:
            raise DataError(f"embedded task: n_common={cfg.n_common} leaves no content words after "
                            f"{n_det} determiners and {n_prep} prepositions")

    # ---------------------------------------------------------------------------------------------------------
    # lexicon
    # ---------------------------------------------------------------------------------------------------------
    @cached_property
    def lexicon(self) -> dict[str, list[Word]]:
        """Words by class (pos), in frequency-rank order: common words first, then rare words."""
        cfg = self.cfg
        rng = random.Random(f"tw-rl/embedded/{cfg.task_seed}/lexicon")
        syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
        syllables += [c + v + k for c in _CONSONANTS for v in _VOWELS for k in _CODAS]
        taken: set[str] = set()

        def fresh(n_syll: int) -> str:
            for _ in range(10_000):
                w = "".join(rng.choice(syllables) for _ in range(n_syll))
                if w not in taken:
                    taken.add(w)
                    return w
            raise DataError(f"embedded task: ran out of distinct {n_syll}-syllable words; lower n_common/n_rare")

        def counts(total: int) -> dict[str, int]:
            c = {p: int(round(total * _POS_SHARE[p])) for p in _POS}
            c["NOUN"] += total - sum(c.values())
            return c

        n_content = cfg.n_common - cfg.n_determiners - cfg.n_prepositions
        common, rare = counts(n_content), counts(cfg.n_rare)
        lex: dict[str, list[Word]] = {}
        for pos, n in (("DET", cfg.n_determiners), ("PREP", cfg.n_prepositions)):
            lex[pos] = [Word(fresh(1), fresh(1), pos, False, r + 1) for r in range(n)]
        for pos in _POS:
            # the source and target strings of a word are drawn independently: the mapping is arbitrary
            words = [Word(fresh(2), fresh(2), pos, False, r + 1) for r in range(common[pos])]
            words += [Word(fresh(cfg.rare_syllables), fresh(cfg.rare_syllables), pos, True, len(words) + r + 1)
                      for r in range(rare[pos])]
            lex[pos] = words
        return lex

    @cached_property
    def _cdfs(self) -> dict[str, list[float]]:
        return {k: _zipf_cdf(len(v), self.cfg.zipf_a) for k, v in self.lexicon.items() if v}

    @cached_property
    def by_source(self) -> dict[str, Word]:
        """Every word of the lexicon by its source string."""
        return {w.source: w for ws in self.lexicon.values() for w in ws}

    def rare_mass(self) -> float:
        """Expected share of rare words among content words (NOUN, ADJ, VERB; rare words live only there)."""
        cfg = self.cfg
        n_np = 1.0 + cfg.p_object + cfg.p_pp  # noun phrases per sentence
        slots = {"NOUN": n_np, "ADJ": n_np * cfg.p_adjective, "VERB": 1.0}
        rare = 0.0
        for pos in _POS:
            cdf, words = self._cdfs[pos], self.lexicon[pos]
            n_common = sum(not w.rare for w in words)
            rare += slots[pos] * (1.0 - cdf[n_common - 1] / cdf[-1] if n_common else 1.0)
        return rare / sum(slots.values())

    # ---------------------------------------------------------------------------------------------------------
    # sentences
    # ---------------------------------------------------------------------------------------------------------
    def _word(self, rng: random.Random, pos: str) -> Word:
        cdf = self._cdfs[pos]
        return self.lexicon[pos][min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), len(cdf) - 1)]

    def _noun_phrase(self, rng: random.Random) -> list[Word]:
        np_ = [self._word(rng, "DET")]
        if rng.random() < self.cfg.p_adjective:
            np_.append(self._word(rng, "ADJ"))
        np_.append(self._word(rng, "NOUN"))
        return np_

    def _sentence(self, rng: random.Random) -> Sentence:
        cfg = self.cfg
        words: list[Word] = []
        target: list[int] = []

        def add_np() -> None:
            start = len(words)
            words.extend(self._noun_phrase(rng))
            target.extend(reversed(range(start, len(words))))  # rule 1: mirrored noun phrase

        add_np()
        verb = len(words)
        words.append(self._word(rng, "VERB"))
        if rng.random() < cfg.p_object:
            add_np()
        if rng.random() < cfg.p_pp:
            prep = len(words)
            words.append(self._word(rng, "PREP"))
            add_np()
            target.append(prep)  # rule 2: postposition
        target.append(verb)  # rule 3: verb-final
        return Sentence(tuple(words), tuple(target))

    @cached_property
    def _splits(self) -> dict[str, list[Sentence]]:
        cfg = self.cfg
        rng = random.Random(f"tw-rl/embedded/{cfg.task_seed}/sentences")
        seen: set[str] = set()
        out: dict[str, list[Sentence]] = {}
        for name, n in (("test", cfg.n_test), ("validation", cfg.n_validation), ("train", cfg.n_train)):
            sents: list[Sentence] = []
            tries = 0
            while len(sents) < n:
                tries += 1
                if tries > 20 * n + 1000:
                    raise DataError(f"embedded task: could not draw {n} distinct {name} sentences "
                                    f"(the grammar and lexicon are too small for the requested sizes)")
                s = self._sentence(rng)
                if s.source in seen:
                    continue
                seen.add(s.source)
                sents.append(s)
            out[name] = sents
        return out

    def sentences(self, name: str) -> list[Sentence]:
        if name not in SPLITS:
            raise DataError(f"embedded task has no split {name!r}; valid splits: {list(SPLITS)}")
        return self._splits[name]

    def split(self, name: str) -> list[Pair]:
        """The pairs of split ``name`` ("train", "validation" or "test"); origin ``embedded[name]#i``."""
        return [Pair(s.source, s.target, f"embedded[{name}]#{i}") for i, s in enumerate(self.sentences(name))]

    def texts(self) -> list[str]:
        """Training sources and targets, for tokenizer training (held-out splits are not looked at)."""
        train = self.sentences("train")
        return [s.source for s in train] + [s.target for s in train]
