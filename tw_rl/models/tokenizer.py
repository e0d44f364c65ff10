"""A subword tokenizer trained offline on the task, with T5 conventions.

BPE over whitespace-separated words (SentencePiece-style ``▁`` word starts, so decoding restores the spaces),
trained with Hugging Face ``tokenizers`` in well under a second. Special tokens follow T5: ``<pad>`` = 0 (also the
decoder start), ``</s>`` = 1 (appended to every encoded sequence), ``<unk>`` = 2.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2


def budget_prompt_texts(prompt: str) -> list[str]:
    """The budget prompt for every whole percentage 0..100 (``Config.budget_prompt`` formatted)."""
    from tw_rl.prompt import budget_prompt

    return [budget_prompt(prompt, pct / 100) for pct in range(101)]


def train_tokenizer(texts: Sequence[str], vocab_size: int, extra_texts: Sequence[str] = ()
                    ) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts`` (+ ``extra_texts``) and wrap it as a ``PreTrainedTokenizerFast``.

    ``extra_texts`` (e.g. :func:`budget_prompt_texts`) are few but must tokenize compactly, so they are repeated
    until they weigh about 5 % of the corpus. The result has pad id 0, eos id 1, unk id 2 and appends
    ``</s>`` to every encoded sequence. Deterministic for fixed inputs.
    """
    texts = list(texts)
    extra = list(extra_texts)
    if not texts and not extra:
        raise ValueError("train_tokenizer: no texts to train on")
    repeat = max(1, len(texts) // (20 * len(extra))) if extra else 0
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted({c for t in texts + extra for c in t if not c.isspace()})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    corpus: Iterable[str] = texts + extra * repeat
    tok.train_from_iterator(corpus, trainer=trainer, length=len(texts) + len(extra) * repeat)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=1024)
