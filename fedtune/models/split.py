"""Cutting a Llama-architecture model at decoder layer ``k`` (split learning).

The client half is the token embeddings and decoder layers ``[0, k)``; the server half is layers
``[k, n)``, the final norm and the head (LM head or classification ``score``). Both halves run the
model's own modules exactly as its ``forward`` does, so split training computes the same gradients
as the whole model (tested).

A tied LM head (``lm_head.weight is embed_tokens.weight``) is one tensor on both sides of the cut:
:func:`tied_head` finds it, and ``server_forward(head_weight=...)`` runs the head with a copy the
server received instead of the live shared tensor, so the head's gradient lands on that copy (and
can be sent back to the side that owns the weight) rather than on the client's embedding.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from fedtune.errors import ConfigError

_LAYER = re.compile(r"layers\.(\d+)\.")


# base_of and decoder_of return Any: their callers use the transformers modules' own attributes
# (lm_head, score, config, loss_function, layers ...), which nn.Module.__getattr__ types as Tensor | Module.


def base_of(model: torch.nn.Module) -> Any:
    """The transformers model under a peft wrapper (``LlamaForCausalLM`` / ``...ForSequenceClassification``)."""
    # get_base_model is a peft method; nn.Module types unknown attributes as Tensor | Module
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


def decoder_of(model: torch.nn.Module) -> Any:
    """The decoder stack (``LlamaModel``: embed_tokens, layers, norm, rotary_emb), or a ConfigError."""
    decoder = getattr(base_of(model), "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ConfigError(f"{type(base_of(model)).__name__}: splitting needs a Llama-architecture model "
                          "(embed_tokens, layers, norm, rotary_emb); use model=tiny or a Llama-family model")
    return decoder


def num_layers(model: torch.nn.Module) -> int:
    return len(decoder_of(model).layers)


def on_client(name: str, split_layer: int) -> bool:
    """Whether a parameter (by name) lives in the client half."""
    if "embed_tokens" in name:
        return True
    m = _LAYER.search(name)
    return m is not None and int(m.group(1)) < split_layer


def tied_head(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The trainable weight shared by the input embeddings and the LM head, if the model ties them."""
    head = getattr(base_of(model), "lm_head", None)
    weight = getattr(head, "weight", None)
    embed: torch.nn.Parameter = decoder_of(model).embed_tokens.weight
    if weight is embed and embed.requires_grad and type(head) is torch.nn.Linear:
        return embed
    return None


def _context(decoder: Any, hidden: torch.Tensor, attention_mask: torch.Tensor):
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    return mask, position_ids, decoder.rotary_emb(hidden, position_ids=position_ids)


def _layers(decoder, hidden, attention_mask, layers):
    mask, position_ids, rope = _context(decoder, hidden, attention_mask)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
    return hidden


def client_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Embeddings and layers [0, k): the activations the client sends."""
    decoder = decoder_of(model)
    return _layers(decoder, decoder.embed_tokens(input_ids), attention_mask, decoder.layers[:k])


def server_forward(
    model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, k: int,
    *, head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layers [k, n), norm, head and the loss, from received activations (the server never sees tokens).

    ``head_weight``: run the LM head with this tensor (the received copy of a tied weight, see
    :func:`tied_head`) instead of the model's own.
    """
    base, decoder = base_of(model), decoder_of(model)
    hidden = decoder.norm(_layers(decoder, hidden, attention_mask, decoder.layers[k:]))
    if hasattr(base, "score"):  # sequence classification: the last non-padding position (right padding)
        logits = base.score(hidden)
        last = attention_mask.sum(-1) - 1
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return base.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=base.config)
    logits = base.lm_head(hidden) if head_weight is None else F.linear(hidden, head_weight, base.lm_head.bias)
    return base.loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)
