"""FedCyBGD's download compression for already-updated blocks: magnitude pruning, sent sparse.

Pure functions over tensors. A matrix (``ndim >= 2``) loses its ``floor(ratio * numel)``
smallest-magnitude entries (ties broken by position, so it is deterministic); vectors (norm weights,
biases) are never pruned: zeroing a norm weight kills a channel. A pruned tensor travels as

    ``<name>::kept``    the kept values, in row-major order (the tensor's dtype), and
    ``<name>::bitmap``  which positions were kept, one bit each, packed 8 to a uint8 (MSB first),

when that is fewer bytes than the dense tensor (``kept * itemsize + ceil(numel / 8) <
numel * itemsize``: above a ratio of 1/32 in fp32); otherwise it is sent dense, zeros included. The
receiver needs the shape, which it takes from its own copy of the architecture.
"""

from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]
KEPT, BITMAP = "kept", "bitmap"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def num_pruned(numel: int, ratio: float) -> int:
    return math.floor(ratio * numel)


def prunable(t: torch.Tensor, ratio: float) -> bool:
    return ratio > 0 and t.dim() >= 2 and t.is_floating_point()


def magnitude_mask(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask (shape of ``t``) keeping all but the ``floor(ratio * numel)`` smallest ``|t|``."""
    keep = t.numel() - num_pruned(t.numel(), ratio)
    order = torch.argsort(t.detach().abs().flatten(), descending=True, stable=True)
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(t.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 of ``ceil(numel / 8)`` bytes (MSB first, zero padded)."""
    flat = mask.flatten().to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (flat * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 1
    return bits.flatten()[:numel].bool()


def sparse_is_smaller(numel: int, kept: int, itemsize: int) -> bool:
    return kept * itemsize + math.ceil(numel / 8) < numel * itemsize


def encode_pruned(name: str, t: torch.Tensor, ratio: float) -> Tensors:
    """The wire form of ``t`` magnitude-pruned at ``ratio`` (dense when pruning does not apply or pay)."""
    if not prunable(t, ratio):
        return {name: t}
    mask = magnitude_mask(t, ratio)
    kept = t.numel() - num_pruned(t.numel(), ratio)
    if sparse_is_smaller(t.numel(), kept, t.element_size()):
        return {f"{name}::{KEPT}": t.flatten()[mask.flatten()].contiguous(), f"{name}::{BITMAP}": pack_bits(mask)}
    return {name: t * mask}


def decode_pruned(tensors: Tensors, shapes: dict[str, torch.Size]) -> Tensors:
    """Dense tensors from a mix of dense and ``::kept``/``::bitmap`` entries (shapes from the receiver)."""
    out: Tensors = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition("::")
        if part == BITMAP:
            continue
        if part != KEPT:
            out[key] = t
            continue
        numel = math.prod(shapes[name])
        mask = unpack_bits(tensors[f"{name}::{BITMAP}"], numel)
        dense = torch.zeros(numel, dtype=t.dtype)
        dense[mask] = t
        out[name] = dense.view(shapes[name])
    return out
