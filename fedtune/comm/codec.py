"""What goes on the wire: codecs turn a tensor dict into an encoded tensor dict + small metadata.

A codec is lossless (``none``) or lossy (casts). ``decode(encode(x))`` returns tensors with the
original dtypes. Codecs never see bytes; the channel serializes what they return.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedtune.errors import ConfigError

Tensors = dict[str, torch.Tensor]


class Codec(Protocol):
    name: str

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]: ...

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors: ...


class Identity:
    """fp32 (or whatever the tensors are): sent as is."""

    name = "none"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        return tensors, {}

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        return tensors


class Cast:
    """Floating tensors cast to a narrower float dtype for the wire, cast back on receipt."""

    def __init__(self, *, dtype: torch.dtype, name: str) -> None:
        self.dtype, self.name = dtype, name

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        out, dtypes = {}, {}
        for key, t in tensors.items():
            if t.is_floating_point() and t.dtype != self.dtype:
                dtypes[key] = str(t.dtype).removeprefix("torch.")
                t = t.to(self.dtype)
            out[key] = t
        return out, dtypes

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        return {k: t.to(getattr(torch, meta[k])) if k in meta else t for k, t in tensors.items()}


CODECS = {
    "none": Identity,
    "fp32": Identity,
    "fp16": lambda: Cast(dtype=torch.float16, name="fp16"),
    "bf16": lambda: Cast(dtype=torch.bfloat16, name="bf16"),
}


def make_codec(spec: str, *, key: str = "comm") -> Codec:
    """A codec from its config name (``none``/``fp32``, ``fp16``, ``bf16``)."""
    if spec not in CODECS:
        raise ConfigError(f"{key}={spec}: unknown codec; choose one of {', '.join(CODECS)}")
    return CODECS[spec]()
