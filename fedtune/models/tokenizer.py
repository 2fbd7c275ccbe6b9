"""Tokenizers fedtune builds itself (no files, no hub)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_level(*, texts: Iterable[str], max_vocab: int = 8000, min_count: int = 1) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts`` (whitespace + punctuation split).

    Ids are assigned by descending frequency, ties alphabetically, so the same texts always give
    the same tokenizer. Words outside the ``max_vocab`` most frequent map to ``<unk>``.

    Args:
        texts: the corpus (the run passes its training prompts, responses and prompt template).
        max_vocab: cap on the vocabulary, special tokens included.
        min_count: drop words seen fewer times than this.
    """
    split = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in split.pre_tokenize_str(text))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words[: max(0, max_vocab - len(SPECIAL_TOKENS))]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = split
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
