"""What goes on the wire: codecs turn a tensor dict into an encoded tensor dict + small metadata.

A codec is lossless (``none``) or lossy (casts, blockwise quantizers, sparsifiers).
``decode(encode(x))`` returns tensors with the original names, shapes and dtypes. Codecs never see
bytes: the channel serializes what they return (safetensors) and puts ``meta`` in its header, so
everything the receiver needs is in the encoded tensors or in ``meta`` -- nothing stays with the sender.

The spec grammar (``comm.up=...``, ``comm.down=...``) is parsed by :func:`fedtune.comm.spec.make_codec`::

    spec   := value | sparse | sparse '+' value
    value  := none | fp32 | fp16 | bf16 | int8['@'B] | nf4['@'B] | fp4['@'B] | lowbit['s']['@'B]
    lowbit := sign | tern | int2 | int3   (1, 1.6, 2, 3 bits a value; 's': stochastic rounding)
    sparse := topk F | randk F            (0 < F <= 1: the kept fraction, per tensor)

``int8`` is blockwise absmax (B=256 by default), ``nf4``/``fp4`` are 4-bit (two codes a byte, B=64);
the low-bit codecs are in :mod:`fedtune.comm.lowbit` (B=256, stochastic B=128).
In ``topk0.01+int8`` the sparsifier's kept values (and the tensors it left alone) go through the
value codec. Encoded names are derived (``w::values``, ``w::idx``, ``w::absmax``).

``meta`` is one flat namespace shared by the stages of a composition: a stage's keys are either the
name of a tensor it transformed or ``@<codec>`` for its own parameters, and each stage's ``decode``
acts only on the tensors it finds, so stages never read each other's keys.

Small tensors: quantizers and sparsifiers send floating tensors with fewer than :data:`MIN_NUMEL`
(256) elements as they are; casts still cast them. Measured through the channel: each extra encoded
tensor costs one more safetensors header entry (~60 bytes plus its name), so int8, nf4 or top-k make a
tensor's payload *larger* below ~25 elements (1-letter names) to ~65 (LoRA-length names); at 256
elements int8 already halves it. 256 leaves a margin above break-even, and keeps tiny 1-D tensors
(norms, biases of toy models) exact for a few hundred bytes; the default tiny model's LoRA matrices
(8 x 128 and up) are compressed.
"""

from __future__ import annotations

from typing import Protocol

import torch

Tensors = dict[str, torch.Tensor]
MIN_NUMEL = 256  # quantizers and sparsifiers leave smaller floating tensors as they are

class Codec(Protocol):
    name: str

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]: ...

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors: ...


def compressible(t: torch.Tensor, min_numel: int = MIN_NUMEL) -> bool:
    """Whether a quantizer/sparsifier should touch ``t`` (floating, at least ``min_numel`` elements)."""
    return t.is_floating_point() and t.numel() >= min_numel


def shape_str(shape: torch.Size) -> str:
    return "x".join(map(str, shape))


def parse_shape(text: str) -> list[int]:
    return [int(d) for d in text.split("x")] if text else []


def derived(tensors: Tensors, name: str, suffix: str) -> str:
    """``name::suffix``, asserting it does not clash with a tensor already being sent."""
    out = f"{name}::{suffix}"
    assert out not in tensors, f"encoded name {out!r} clashes with a tensor of the message"
    return out


class Identity:
    """fp32 (or whatever the tensors are): sent as is."""

    name = "none"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        return tensors, {}

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        return tensors


class Cast:
    """Floating tensors cast to a narrower float dtype for the wire, cast back on receipt.

    meta: ``{name: original dtype}`` for each tensor it cast.
    """

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


class Compose:
    """A sparsifier, then a value codec on what it outputs (its kept values and untouched tensors)."""

    def __init__(self, first: Codec, second: Codec) -> None:
        self.first, self.second = first, second
        self.name = f"{first.name}+{second.name}"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        mid, meta1 = self.first.encode(tensors)
        out, meta2 = self.second.encode(mid)
        assert not meta1.keys() & meta2.keys(), f"meta keys clash: {meta1.keys() & meta2.keys()}"
        return out, {**meta1, **meta2}

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        return self.first.decode(self.second.decode(tensors, meta), meta)
