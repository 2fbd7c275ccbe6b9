"""Model builders: plain functions from config values to a ``transformers`` model."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.models.quant import quantize_built


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

    A causal LM, or with ``num_labels`` a sequence classifier (``score`` head on the last token);
    ``quant`` (the quant node) quantizes its linear layers after the random init.
    """
    # num_labels is a PreTrainedConfig property passed through **kwargs; the dataclass signature lacks it
    config = LlamaConfig(  # type: ignore[call-arg]
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
    return quantize_built(cls(config).to(getattr(torch, dtype)), quant)


def tiny_gpt2(
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
    """A small GPT-2 built from config (random init: seed torch first), same knobs as :func:`tiny_llama`.

    Its attention and MLP layers are ``Conv1D`` (weights stored in x out), the layout LoRA must
    be told about with ``fan_in_fan_out``; it exists so that path is exercised without the hub.
    """
    config = GPT2Config(  # type: ignore[call-arg]  # num_labels: as in tiny_llama
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_inner=intermediate_size,
        n_positions=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=num_labels or 2,
    )
    cls = GPT2ForSequenceClassification if num_labels else GPT2LMHeadModel
    return quantize_built(cls(config).to(getattr(torch, dtype)), quant)
