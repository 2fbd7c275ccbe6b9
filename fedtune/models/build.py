"""Model builders: plain functions from config values to a ``transformers`` model."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def tiny_llama(
    *,
    tokenizer: PreTrainedTokenizerBase,
    quant: dict | None = None,
    num_labels: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
) -> PreTrainedModel:
    """A small Llama built from config (random init: seed torch first).

    A causal LM, or with ``num_labels`` a sequence classifier (``score`` head on the last token).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=num_labels or 2,
    )
    cls = LlamaForSequenceClassification if num_labels else LlamaForCausalLM
    return cls(config).to(getattr(torch, dtype))
