"""Text metrics as pure functions."""

from __future__ import annotations

import math

import sacrebleu


def perplexity(mean_nll: float) -> float:
    """exp of the mean token negative log-likelihood (inf past float range)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0..100) of detokenized hypotheses against one reference each."""
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
