"""Blockwise absmax quantizers: int8 (linear) and 4-bit (nf4/fp4 codebooks, two codes a byte).

A tensor is flattened (row-major) and cut into blocks of ``block_size`` elements; each block is scaled
by its absolute maximum. The absmax travels in the tensor's own dtype: it is one of the tensor's values,
so that is exact, and it tells the receiver which dtype to restore (no per-tensor dtype in meta).

Wire format for a tensor ``w`` (n elements, ``nb = ceil(n / block_size)`` blocks):

- int8: ``w`` int8 codes in the original shape (n bytes) + ``w::absmax`` (nb values);
  ``meta["@int8"] = block_size``. Decoded value ``q * absmax / 127``; error <= absmax / 254.
- nf4/fp4: ``w`` uint8, ``ceil(n / 2)`` bytes, first element in the high nibble (bitsandbytes'
  layout) + ``w::absmax``; ``meta[w] = shape``, ``meta["@nf4"] = block_size``. Decoded value
  ``codebook[code] * absmax``; each value is rounded to the nearest codebook entry, so the error is at
  most ``absmax * max_gap / 2`` (nf4: 0.152 absmax, between -1 and -0.696; fp4: 0.167 absmax).

Pure torch (same results on any device and without bitsandbytes); the codebooks are bitsandbytes'
``get_4bit_type`` values, and tests check our packed bytes decode identically with bitsandbytes.
Non-finite values survive as non-finite (NaN), so the server can still reject such an update.
"""

from __future__ import annotations

import torch

from fedtune.comm.codec import MIN_NUMEL, Tensors, compressible, derived, parse_shape, shape_str

# bitsandbytes.functional.get_4bit_type("nf4"/"fp4"): code i -> value in [-1, 1]
CODEBOOKS = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "fp4": (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25),
}


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 blocks (nb, block_size), zero-padded, and their absmax (nb,), NaN where a block has one."""
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    return blocks, blocks.abs().amax(dim=1)


def _normalized(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Blocks scaled to [-1, 1]; non-finite entries (and all-zero blocks) become 0."""
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    y = blocks / scale[:, None]
    return torch.where(torch.isfinite(y), y, torch.zeros_like(y))


def _expand(absmax: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Per-element fp32 absmax (n,)."""
    return absmax.float().repeat_interleave(block_size)[:n]


class Int8:
    """Blockwise absmax int8: ``round(127 * x / absmax)`` per block of ``block_size`` elements."""

    def __init__(self, *, block_size: int = 256, min_numel: int = MIN_NUMEL) -> None:
        self.block_size, self.min_numel = block_size, min_numel
        self.name = f"int8@{block_size}"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        out: Tensors = {}
        for name, t in tensors.items():
            if not compressible(t, self.min_numel):
                out[name] = t
                continue
            blocks, absmax = _blocks(t, self.block_size)
            q = torch.round(_normalized(blocks, absmax) * 127).to(torch.int8)
            out[name] = q.reshape(-1)[: t.numel()].reshape(t.shape)
            out[derived(tensors, name, "absmax")] = absmax.to(t.dtype)
        meta = {"@int8": str(self.block_size)} if len(out) > len(tensors) else {}
        return out, meta

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        out: Tensors = {}
        for name, t in tensors.items():
            absmax = tensors.get(f"{name}::absmax")
            if absmax is None:
                if not name.endswith("::absmax"):
                    out[name] = t
                continue
            scale = _expand(absmax, t.numel(), int(meta["@int8"])) / 127
            out[name] = (t.reshape(-1).float() * scale).reshape(t.shape).to(absmax.dtype)
        return out


class FourBit:
    """Blockwise absmax 4-bit: each value -> index of the nearest ``quant_type`` codebook entry."""

    def __init__(self, *, quant_type: str = "nf4", block_size: int = 64, min_numel: int = MIN_NUMEL) -> None:
        assert quant_type in CODEBOOKS, quant_type
        self.quant_type, self.block_size, self.min_numel = quant_type, block_size, min_numel
        self.name = f"{quant_type}@{block_size}"
        self.code = torch.tensor(CODEBOOKS[quant_type])
        self._order = torch.argsort(self.code, stable=True)
        ordered = self.code[self._order]
        self._midpoints = (ordered[1:] + ordered[:-1]) / 2

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        out: Tensors = {}
        meta: dict[str, str] = {}
        for name, t in tensors.items():
            if not compressible(t, self.min_numel):
                out[name] = t
                continue
            blocks, absmax = _blocks(t.cpu(), self.block_size)
            y = _normalized(blocks, absmax).reshape(-1)[: t.numel()]
            y = torch.nn.functional.pad(y, (0, t.numel() % 2))  # an even count; the padding codes 0.0
            codes = self._order[torch.bucketize(y, self._midpoints)].to(torch.uint8)
            out[name] = codes[0::2] << 4 | codes[1::2]
            out[derived(tensors, name, "absmax")] = absmax.to(t.dtype)
            meta[name] = shape_str(t.shape)
        if meta:
            meta[f"@{self.quant_type}"] = str(self.block_size)
        return out, meta

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        out: Tensors = {}
        for name, t in tensors.items():
            absmax = tensors.get(f"{name}::absmax")
            if absmax is None:
                if not name.endswith("::absmax"):
                    out[name] = t
                continue
            shape = parse_shape(meta[name])
            n = int(torch.Size(shape).numel())
            codes = torch.stack([t >> 4, t & 15], dim=1).reshape(-1)[:n].long()
            scale = _expand(absmax, n, int(meta[f"@{self.quant_type}"]))
            out[name] = (self.code.to(t.device)[codes] * scale).reshape(shape).to(absmax.dtype)
        return out
