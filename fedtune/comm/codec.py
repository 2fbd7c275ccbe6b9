"""What goes on the wire: codecs turn a tensor dict into an encoded tensor dict + small metadata.

A codec is lossless (``none``) or lossy (casts, blockwise quantizers, sparsifiers).
``decode(encode(x))`` returns tensors with the original names, shapes and dtypes. Codecs never see
bytes: the channel serializes what they return (safetensors) and puts ``meta`` in its header, so
everything the receiver needs is in the encoded tensors or in ``meta`` -- nothing stays with the sender.

The spec grammar (``comm.up=...``, ``comm.down=...``) is parsed by :func:`fedtune.comm.spec.make_codec`::

    spec   := codec ('|' PATTERN ':' codec)*    (per-tensor rules, see ByName)
    codec  := value | sparse | sparse '+' value
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

from fnmatch import fnmatchcase
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


class ByName:
    """Per-tensor codecs: each tensor goes through the codec of the first rule whose pattern occurs in its
    name (``fnmatch`` wildcards: ``*`` any run of characters, ``?`` one), the rest through ``default``.

    ``randk0.75+sign|classifier:int3`` codes the classification head at 3 bits and everything else as
    random-k + sign. The receiver routes by the same rules: an encoded tensor by its name before ``::``,
    a meta key likewise, and a codec's own ``@`` parameters carry the rule's number (``@int3/1``), so two
    rules with the same codec kind never share a key. Nothing extra goes on the wire.
    """

    def __init__(self, default: Codec, rules: list[tuple[str, Codec]], name: str = "") -> None:
        assert rules, "ByName needs at least one rule"
        self.codecs = [default, *(codec for _, codec in rules)]
        self.patterns = [pattern for pattern, _ in rules]
        self.name = name or "|".join([default.name, *(f"{p}:{c.name}" for p, c in rules)])
        self._routes: dict[str, int] = {}

    def route(self, name: str) -> int:
        """0 for the default codec, else the number of the first rule that matches ``name``."""
        base = name.split("::", 1)[0]
        if base not in self._routes:
            self._routes[base] = next(
                (i for i, p in enumerate(self.patterns, 1) if fnmatchcase(base, f"*{p}*")), 0)
        return self._routes[base]

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        parts: list[Tensors] = [{} for _ in self.codecs]
        for key, t in tensors.items():
            parts[self.route(key)][key] = t
        out: Tensors = {}
        meta: dict[str, str] = {}
        for i, (codec, part) in enumerate(zip(self.codecs, parts)):
            if not part:
                continue
            encoded, part_meta = codec.encode(part)
            assert not out.keys() & encoded.keys(), f"encoded names clash: {out.keys() & encoded.keys()}"
            out.update(encoded)
            meta.update({f"{k}/{i}" if k.startswith("@") and i else k: v for k, v in part_meta.items()})
        by_tensor: dict[str, list[str]] = {}
        for key in out:
            by_tensor.setdefault(key.split("::", 1)[0], []).append(key)
        order = [key for name in tensors for key in by_tensor.pop(name, [])]  # the sender's order, not the rules'
        return {key: out[key] for key in [*order, *(k for keys in by_tensor.values() for k in keys)]}, meta

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        parts: list[Tensors] = [{} for _ in self.codecs]
        metas: list[dict[str, str]] = [{} for _ in self.codecs]
        for key, t in tensors.items():
            parts[self.route(key)][key] = t
        for key, value in meta.items():
            if key.startswith("@"):
                base, slash, rule = key.rpartition("/")
                i = int(rule) if slash and rule.isdigit() else 0
                metas[i][base if i else key] = value
            else:
                metas[self.route(key)][key] = value
        out: Tensors = {}
        for codec, part, part_meta in zip(self.codecs, parts, metas):
            if part:
                out.update(codec.decode(part, part_meta))
        order = dict.fromkeys(key.split("::", 1)[0] for key in tensors)  # the order they arrived in
        return {key: out[key] for key in order if key in out} | out
