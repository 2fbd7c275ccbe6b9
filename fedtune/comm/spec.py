"""Codec specs: ``comm.up=topk0.01+int8`` -> a codec (grammar in :mod:`fedtune.comm.codec`).

The parser sits above the codecs it builds (``codec`` primitives <- ``quantize``/``sparse``/``lowbit`` <- ``spec``),
so the package's imports run one way.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

from fedtune.comm.codec import ByName, Cast, Codec, Compose, Identity
from fedtune.comm.lowbit import LowBit
from fedtune.comm.quantize import FourBit, Int8
from fedtune.comm.sparse import RandomK, TopK
from fedtune.errors import ConfigError

GRAMMAR = ("none|fp32|fp16|bf16|int8[@B]|nf4[@B]|fp4[@B]|sign[s][@B]|tern[s][@B]|int2[s][@B]|int3[s][@B] "
           "(B: block size; s: stochastic rounding), topkF|randkF (0<F<=1, kept fraction), "
           "or topkF+<one of those> (e.g. topk0.01+int8); per tensor: <codec>|<pattern>:<codec>... "
           "(e.g. randk0.75+sign|classifier:int3: tensors whose name contains the pattern take its codec)")

_VALUE = re.compile(r"(none|fp32|fp16|bf16)|(int8|nf4|fp4|sign|tern|int2|int3)(s?)(?:@(\d+))?")
_PATTERN = re.compile(r"[\w.*?\-]+")
_SPARSE = re.compile(r"(topk|randk)((?:\d+\.?\d*|\.\d+)(?:e-?\d+)?)")


def _value_codec(text: str, seed: int = 0) -> Codec | None:
    m = _VALUE.fullmatch(text)
    if m is None:
        return None
    if m[1] in ("none", "fp32"):
        return Identity()
    if m[1]:
        return Cast(dtype=torch.float16 if m[1] == "fp16" else torch.bfloat16, name=m[1])
    block_size = int(m[4]) if m[4] is not None else None
    if block_size is not None and block_size < 1 or m[3] and m[2] in ("int8", "nf4", "fp4"):
        return None
    if m[2] in ("sign", "tern", "int2", "int3"):
        return LowBit(kind=m[2], block_size=block_size, stochastic=bool(m[3]), seed=seed)
    if m[2] == "int8":
        return Int8(block_size=block_size or 256)
    return FourBit(quant_type=m[2], block_size=block_size or 64)


def _sparse_codec(text: str, seed: int) -> Codec | None:
    m = _SPARSE.fullmatch(text)
    if m is None or not 0 < Fraction(m[2]) <= 1:
        return None
    return TopK(fraction=m[2]) if m[1] == "topk" else RandomK(fraction=m[2], seed=seed)


def make_codec(spec: str, *, key: str = "comm", seed: int = 0) -> Codec:
    """A codec from its spec (see the module docstring for the grammar).

    Args:
        spec: e.g. ``none``, ``bf16``, ``int8@64``, ``nf4``, ``topk0.01+int8``, ``randk0.1``, or per tensor
            ``randk0.75+sign|classifier:int3`` (a :class:`~fedtune.comm.codec.ByName`: the first rule whose
            pattern occurs in a tensor's name picks its codec; the first codec takes the rest).
        key: the config key it came from, named in the error message.
        seed: mixed into random-k's and stochastic rounding's draws (which also depend on each tensor's
            name and content).

    Raises:
        ConfigError: unknown or malformed spec (one line naming ``key`` and listing the grammar).
    """
    text = str(spec).strip()
    if "|" not in text:
        return _single_codec(text.lower(), spec, key, seed)
    default, *rules = text.split("|")
    parsed = []
    for rule in rules:
        pattern, colon, sub = rule.rpartition(":")
        if not colon or _PATTERN.fullmatch(pattern) is None:
            raise ConfigError(f"{key}={spec}: per-tensor rule {rule!r} must be <pattern>:<codec> (pattern: letters, "
                              f"digits, . _ - and the wildcards * ?), e.g. {key}=randk0.75+sign|classifier:int3")
        parsed.append((pattern, _single_codec(sub.strip().lower(), spec, key, seed)))
    codecs = [_single_codec(default.strip().lower(), spec, key, seed), *(c for _, c in parsed)]
    if all(isinstance(c, Identity) for c in codecs):
        return codecs[0]
    return ByName(codecs[0], parsed, name=text)


def _single_codec(text: str, spec: str, key: str, seed: int) -> Codec:
    first, plus, rest = text.partition("+")
    codec = _value_codec(first, seed) if not plus else None
    if codec is None:
        sparse = _sparse_codec(first, seed)
        second = _value_codec(rest, seed) if plus else None
        if sparse is not None and not plus:
            codec = sparse
        elif sparse is not None and second is not None:
            codec = sparse if isinstance(second, Identity) else Compose(sparse, second)
    if codec is None:
        for part in (first, rest):
            m = _SPARSE.fullmatch(part)
            if m is not None and not 0 < Fraction(m[2]) <= 1:
                raise ConfigError(f"{key}={spec}: the {m[1]} fraction {m[2]} must be in (0, 1] (the share of "
                                  f"each tensor's values sent, e.g. {m[1]}0.01 sends 1%)")
        raise ConfigError(f"{key}={spec}: unknown codec; use {GRAMMAR}")
    codec.name = text if not isinstance(codec, Identity) else codec.name
    return codec
