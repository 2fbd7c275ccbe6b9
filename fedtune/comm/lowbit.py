"""1-3-bit blockwise quantizers: sign, ternary, int2, int3, each deterministic or stochastic (``s``).

A tensor is flattened (row-major) and cut into blocks of ``block_size`` elements (the last one may be
short). Every block has one scale ``s`` and every element one code ``c``; the decoded value is
``LEVELS[kind][c] * s``, the levels being fixed points in [-1, 1]:

====== ===================== =========================== ===============================
kind   levels                deterministic scale         packing
====== ===================== =========================== ===============================
sign   -1, +1                mean |x| of the block       1 bit a value, 8 a byte
tern   -1, 0, +1             L2-optimal (see below)      base 3, 5 values a byte (1.6 bit)
int2   (2c - 3) / 3          best of 15 clips of absmax  2 bits a value, 4 a byte
int3   (2c - 7) / 7          best of 15 clips of absmax  3 bits a value, 8 in 3 bytes
====== ===================== =========================== ===============================

Deterministic codes round ``x / s`` to the nearest level (ties to the upper level; x = 0 -> +1 for
sign). The scale is chosen for the smallest L2 error of the block:

- sign: the codes ``sign(x)`` do not depend on ``s``, and ``sum (x_i - s sign(x_i))^2`` is minimal
  at ``s = sum |x_i| / n`` (set the derivative ``-2 sum |x_i| + 2 n s`` to 0): the mean of |x|.
- tern: keeping the ``k`` largest |x| at ``+-s`` costs ``sum x^2 - 2 s S_k + k s^2`` (``S_k`` their
  sum of |x|), minimal at ``s = S_k / k`` where it is ``sum x^2 - S_k^2 / k``; the encoder takes the
  k that maximises ``S_k^2 / k`` (exact, one sort a block). At that optimum the kept values are
  exactly those nearest to ``+-s`` (|x| > s / 2), so the rule "round to the nearest level" holds.
- int2/int3: levels are uniform and symmetric (no zero level: 4 resp. 8 codes all used); clipping
  the largest value trades its error for a finer step for all others, so the encoder tries
  ``s = absmax * (1, 0.95, ..., 0.3)`` and keeps the one with the smallest error of the block.

Stochastic variants (``signs``, ``terns``, ``int2s``, ``int3s``) use ``s = absmax`` (rounded *up* to
a representable scale, so every ``x / s`` is in [-1, 1]) and round ``x / s`` to one of its two
neighbouring levels ``a <= x/s <= b`` with ``P(b) = (x/s - a) / (b - a)``: unbiased,
``E[decoded] = x``, with variance ``s^2 (x/s - a)(b - x/s)`` (signs: ``s^2 - x^2``; terns is
TernGrad's rule: ``+-s`` with probability ``|x| / s``, else 0). The uniform draws come from a CPU
generator seeded by a CRC of (codec seed, tensor name, tensor bytes), like random-k: encoding the same
input twice gives the same payload (error feedback relies on it), yet each round draws afresh.

Wire format for a tensor ``w`` of n elements, ``nb = ceil(n / block_size)`` blocks:
``w`` uint8 packed codes (``ceil(n * bits / 8)`` bytes; tern ``ceil(n / 5)``), the first value in the
most significant bits of the first byte (tern: the first value is the most significant base-3 digit,
``byte = sum_j d_j 3^(4 - j)`` with ``d = code``, 0 for -1, 1 for 0, 2 for +1);
``w::scale`` bf16 (nb,); ``meta[w] = "<shape>:<dtype>"``; ``meta["@<kind>"] = block_size``.

Block size (default 256 deterministic, 128 stochastic): a smaller block lowers the error and costs 2
bytes a block more. Measured as ``rel. L2 error * 2^(bits a value)`` (equal cost at the usual 6 dB a bit)
on N(0,1) 8x4096 and a real LoRA delta (1 round of the tiny default), over B = 32 .. 512: for the
deterministic codecs it falls with B and flattens (256 -> 512 gains 1-2%); for the stochastic ones
the absmax scale grows with B, and the best is 64-128 (128 on the LoRA delta, 64 within 1.4% on N(0,1)).

Scales travel as bf16 whatever the tensor's dtype: 2 bytes a block instead of 4 for fp32 tensors
(at B=64 that is 0.031 byte a value, 20% of sign's 0.125), fp32's range (fp16 would flush the scales
of small LoRA deltas, below 6e-5, to subnormals), and a relative rounding of at most 2^-9, which
changed the relative L2 error by < 0.01% of itself for the deterministic codecs and by 0.2-0.35%
for the stochastic ones (their scale is rounded up), against fp32 scales (N(0,1) and the LoRA delta).
The encoder computes codes with the rounded scale, so the receiver decodes exactly what it assumed.

Non-finite values: a block holding NaN or inf gets a NaN scale and decodes to NaN, so the server's
finite check still rejects the update. Tensors with fewer than :data:`MIN_NUMEL` elements and
non-floating tensors are sent as they are.
"""

from __future__ import annotations

import math
import zlib

import torch

from fedtune.comm.codec import MIN_NUMEL, Tensors, compressible, derived, parse_shape, shape_str

LEVELS: dict[str, tuple[float, ...]] = {
    "sign": (-1.0, 1.0),
    "tern": (-1.0, 0.0, 1.0),
    "int2": tuple((2 * c - 3) / 3 for c in range(4)),
    "int3": tuple((2 * c - 7) / 7 for c in range(8)),
}
BITS = {"sign": 1, "int2": 2, "int3": 3}  # tern: base 3, five codes a byte
DEFAULT_BLOCK = {False: 256, True: 128}  # deterministic, stochastic (measured: module docstring)
CLIPS = tuple(1 - 0.05 * i for i in range(15))  # int2/int3: scales tried, fractions of absmax (1 .. 0.3)
_TERN_WEIGHTS = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int64)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (n,) in [0, 2^bits) -> ceil(n * bits / 8) bytes, big-endian bit stream."""
    shifts = torch.arange(bits - 1, -1, -1)
    stream = ((codes.long()[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).view(-1, 8)
    return (stream << torch.arange(7, -1, -1)).sum(dim=1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes (n,)."""
    stream = (data.long()[:, None] >> torch.arange(7, -1, -1)) & 1
    groups = stream.reshape(-1)[: n * bits].view(n, bits)
    return (groups << torch.arange(bits - 1, -1, -1)).sum(dim=1)


def pack_tern(codes: torch.Tensor) -> torch.Tensor:
    """Codes (n,) in {0, 1, 2} -> ceil(n / 5) bytes, five base-3 digits a byte, first digit highest."""
    digits = torch.nn.functional.pad(codes.long(), (0, -codes.numel() % 5)).view(-1, 5)
    return (digits * _TERN_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_tern(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_tern`: int64 codes (n,)."""
    return (data.long()[:, None] // _TERN_WEIGHTS % 3).reshape(-1)[:n]


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= each (non-negative, finite) fp32 value, as fp32."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    bumped = (b.view(torch.int16) + 1).view(torch.bfloat16)  # next representable for positive values
    return torch.where(low, bumped, b).float()


def _nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties to the upper one) of each ``v``."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v, midpoints, right=True)


class LowBit:
    """Blockwise 1-3-bit quantizer (see the module docstring for levels, scales and layout)."""

    def __init__(
        self, *, kind: str, block_size: int | None = None, stochastic: bool = False, seed: int = 0,
        min_numel: int = MIN_NUMEL,
    ) -> None:
        assert kind in LEVELS, kind
        self.kind, self.stochastic, self.seed, self.min_numel = kind, stochastic, seed, min_numel
        self.block_size = block_size or DEFAULT_BLOCK[stochastic]
        assert self.block_size >= 1, block_size
        self.levels = torch.tensor(LEVELS[kind])
        self.name = f"{kind}{'s' if stochastic else ''}@{self.block_size}"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        out: Tensors = {}
        meta: dict[str, str] = {}
        for name, t in tensors.items():
            if not compressible(t, self.min_numel):
                out[name] = t
                continue
            codes, scale = self.quantize(name, t)
            out[name] = pack_tern(codes) if self.kind == "tern" else pack_bits(codes, BITS[self.kind])
            out[derived(tensors, name, "scale")] = scale.to(torch.bfloat16)
            meta[name] = f"{shape_str(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
        if meta:
            meta[f"@{self.kind}"] = str(self.block_size)
        return out, meta

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        out: Tensors = {}
        for name, t in tensors.items():
            scale = tensors.get(f"{name}::scale")
            if scale is None:
                if not name.endswith("::scale"):
                    out[name] = t
                continue
            shape_text, dtype = meta[name].split(":")
            shape = parse_shape(shape_text)
            n = int(torch.Size(shape).numel())
            codes = unpack_tern(t, n) if self.kind == "tern" else unpack_bits(t, BITS[self.kind], n)
            per_value = scale.float().repeat_interleave(int(meta[f"@{self.kind}"]))[:n]
            out[name] = (self.levels[codes] * per_value).reshape(shape).to(getattr(torch, dtype))
        return out

    def quantize(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (n,) int64, scales (nb,) fp32 exactly representable in bf16, NaN for non-finite blocks)."""
        flat = t.detach().reshape(-1).float().cpu()
        n, size = flat.numel(), self.block_size
        blocks = torch.nn.functional.pad(flat, (0, -n % size)).view(-1, size)
        valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, -n % size)).view(-1, size)
        finite = torch.isfinite(blocks).all(dim=1)
        x = torch.where(torch.isfinite(blocks), blocks, torch.zeros_like(blocks))
        if self.stochastic:
            scale = _round_up_bf16(x.abs().amax(dim=1))
            v = x / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
            codes = self._stochastic(v, self._uniform(name, t, blocks.numel()).view_as(v))
        else:
            scale = self._scale(x, valid).to(torch.bfloat16).float()
            codes = _nearest(x / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None], self.levels)
        scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
        return codes.reshape(-1)[:n], scale

    def _scale(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Deterministic per-block scale (fp32) with the smallest L2 error (module docstring)."""
        a = x.abs()
        if self.kind == "sign":
            return a.sum(dim=1) / valid.sum(dim=1)
        if self.kind == "tern":
            s_k = torch.cumsum(torch.sort(a, dim=1, descending=True).values, dim=1)
            k = torch.arange(1, a.shape[1] + 1, dtype=torch.float32)
            best = torch.argmax(s_k**2 / k, dim=1)  # first of equals: the fewest kept
            return s_k.gather(1, best[:, None]).squeeze(1) / (best + 1).float()
        candidates = a.amax(dim=1)[:, None] * torch.tensor(CLIPS)  # (nb, clips)
        safe = torch.where(candidates > 0, candidates, torch.ones_like(candidates))
        v = x[:, None, :] / safe[:, :, None]  # (nb, clips, B)
        err = ((self.levels[_nearest(v, self.levels)] - v) * safe[:, :, None]) ** 2
        best = torch.argmin((err * valid[:, None, :]).sum(dim=2), dim=1)  # first of equals: no clipping
        return candidates.gather(1, best[:, None]).squeeze(1)

    def _stochastic(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Codes of ``v`` in [-1, 1]: the level below or above, with the probability that makes E exact."""
        low = (torch.bucketize(v, self.levels, right=True) - 1).clamp(0, len(self.levels) - 2)
        a, b = self.levels[low], self.levels[low + 1]
        return low + (u < (v - a) / (b - a)).long()

    def _uniform(self, name: str, t: torch.Tensor, count: int) -> torch.Tensor:
        content = t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
        # numpy declares ndarray.__buffer__ only for Python >= 3.12; the buffer protocol is there on 3.11 too
        seed = zlib.crc32(content, zlib.crc32(f"{self.seed}:{name}".encode()))  # type: ignore[arg-type]
        return torch.rand(count, generator=torch.Generator().manual_seed(seed))
