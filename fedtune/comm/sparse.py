"""Sparsifiers: keep ``ceil(fraction * numel)`` entries of each tensor, send them and where they were.

Wire format for a tensor ``w`` (n elements, K kept):

- ``w::values``: the kept values, 1-D, original dtype, in increasing index order (a value codec
  composed after the sparsifier, e.g. ``topk0.01+int8``, encodes this tensor).
- top-k: ``w::idx`` + ``meta[w] = "<shape>:<encoding>"``, the encoding being whichever is smallest
  for this tensor (all sizes are computed, no guessing):

  - ``b``: bitmap, ``ceil(n / 8)`` bytes (uint8, first element in the high bit);
  - ``e4`` / ``e8`` / ``e16``: gaps between sorted indices (the first counted from -1, so every
    gap >= 1) as 4-bit (two a byte, high nibble first) / uint8 / uint16 symbols, where a 0 means
    "advance 15 (255, 65535) and read on": a gap g costs ``(g - 1) // 15 + 1`` nibbles (``// 255``,
    ``// 65535`` for the wider ones). Measured on 512x512: 5.04 bits an index at k=10% (e4), 8.66 at
    k=1% (e8), within 8% of the entropy bound;
  - ``d32``: int32 gaps;
  - ``all`` (K = n): no ``w::idx`` at all.

- random-k: no indices at all: ``meta[w] = "<shape>:r<seed>"``; the receiver redraws the same K
  positions from the seed. The seed is a CRC of the codec seed, the tensor name and the tensor's
  bytes: stateless and reproducible (a second ``encode`` of the same input gives the same payload,
  which error feedback relies on), yet fresh each round because the tensor changes. Values are not
  rescaled by n/K (biased, like top-k: meant for use with error feedback).

Top-k ranks by magnitude; ties at the threshold go to the lower flat index; NaN/inf rank first, so a
non-finite update stays visible to the server. The receiver's tensor is zero except at the K indices.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import torch

from fedtune.comm.codec import MIN_NUMEL, Tensors, compressible, derived, parse_shape, shape_str

_ESCAPED = {"e4": (torch.uint8, 15), "e8": (torch.uint8, 255), "e16": (torch.uint16, 65535)}


def num_kept(fraction: Fraction, numel: int) -> int:
    return max(1, math.ceil(fraction * numel))


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest ``|x|``; ties -> lower index; NaN/inf count as largest."""
    a = torch.nan_to_num(x.detach().reshape(-1).float().abs(), nan=math.inf)
    if k >= a.numel():
        return torch.arange(a.numel(), device=a.device)
    threshold = torch.topk(a, k, sorted=False).values.min()
    above = torch.nonzero(a > threshold).flatten()
    ties = torch.nonzero(a == threshold).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def _escaped_len(gaps: torch.Tensor, step: int) -> int:
    return int(((gaps - 1) // step + 1).sum())


def _escape(gaps: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
    escapes = (gaps - 1) // step
    out = torch.zeros(int((escapes + 1).sum()), dtype=torch.int64)
    out[torch.cumsum(escapes + 1, 0) - 1] = gaps - step * escapes
    return out.to(dtype)


def _bitmap(idx: torch.Tensor, n: int) -> torch.Tensor:
    bits = torch.zeros(n + (-n % 8), dtype=torch.uint8)
    bits[idx] = 1
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def encode_indices(idx: torch.Tensor, n: int, encoding: str | None = None) -> tuple[torch.Tensor | None, str]:
    """The smallest encoding (or the one named) of sorted, unique flat indices into ``n`` elements."""
    idx = idx.cpu()
    if idx.numel() == n:
        return None, "all"
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    sizes = {"b": (n + 7) // 8, "e4": (_escaped_len(gaps, 15) + 1) // 2, "e8": _escaped_len(gaps, 255),
             "e16": 2 * _escaped_len(gaps, 65535)}
    if int(gaps.max()) < 2**31:
        sizes["d32"] = 4 * gaps.numel()
    best = encoding or min(sizes, key=sizes.__getitem__)  # first of equals: b, e4, e8, e16, d32
    if best == "b":
        return _bitmap(idx, n), best
    if best == "d32":
        return gaps.to(torch.int32), best
    symbols = _escape(gaps, *_ESCAPED[best])
    if best == "e4":  # two a byte, high nibble first; a padding 0 is an escape that emits nothing
        symbols = torch.nn.functional.pad(symbols, (0, symbols.numel() % 2))
        symbols = symbols[0::2] << 4 | symbols[1::2]
    return symbols, best


def decode_indices(data: torch.Tensor | None, encoding: str, n: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`: sorted int64 flat indices."""
    if encoding == "all":
        return torch.arange(n)
    assert data is not None, encoding
    if encoding == "b":
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
        bits = (data[:, None] >> shifts) & 1
        return torch.nonzero(bits.reshape(-1)[:n]).flatten()
    if encoding == "d32":
        return torch.cumsum(data.long(), 0) - 1
    symbols = data.long()
    if encoding == "e4":
        symbols = torch.stack([symbols >> 4, symbols & 15], dim=1).reshape(-1)
    step = _ESCAPED[encoding][1]
    positions = torch.cumsum(torch.where(symbols == 0, step, symbols), 0) - 1
    return positions[symbols != 0]


class TopK:
    """Keep the ``fraction`` largest-magnitude entries of each tensor (values + compact indices)."""

    def __init__(self, *, fraction: str | float, min_numel: int = MIN_NUMEL) -> None:
        self.fraction = Fraction(str(fraction))  # exact: ceil(0.07 * 100) is 7, not 8
        assert 0 < self.fraction <= 1, fraction
        self.min_numel = min_numel
        self.name = f"{type(self).__name__.lower()}{fraction}"

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        out: Tensors = {}
        meta: dict[str, str] = {}
        for name, t in tensors.items():
            if not compressible(t, self.min_numel):
                out[name] = t
                continue
            idx, tag, idx_data = self._select(name, t, num_kept(self.fraction, t.numel()))
            out[derived(tensors, name, "values")] = t.detach().reshape(-1)[idx.to(t.device)].clone()
            if idx_data is not None:
                out[derived(tensors, name, "idx")] = idx_data
            meta[name] = f"{shape_str(t.shape)}:{tag}"
        return out, meta

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        out: Tensors = {}
        consumed = set()
        for name, spec in meta.items():
            values = tensors.get(f"{name}::values")
            if values is None:  # another stage's key
                continue
            shape_text, tag = spec.split(":")
            shape = parse_shape(shape_text)
            n = int(torch.Size(shape).numel())
            idx = self._indices(tensors.get(f"{name}::idx"), tag, n, values.numel())
            assert idx.numel() == values.numel(), f"{name}: {idx.numel()} indices for {values.numel()} values"
            dense = torch.zeros(n, dtype=values.dtype, device=values.device)
            dense[idx.to(values.device)] = values
            out[name] = dense.reshape(shape)
            consumed |= {f"{name}::values", f"{name}::idx"}
        out.update({k: t for k, t in tensors.items() if k not in consumed})
        return out

    def _select(self, name: str, t: torch.Tensor, k: int) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """(sorted flat indices kept, meta tag, index tensor to send or None)."""
        idx = topk_indices(t, k)
        data, encoding = encode_indices(idx, t.numel())
        return idx, encoding, data

    def _indices(self, data: torch.Tensor | None, tag: str, n: int, k: int) -> torch.Tensor:
        return decode_indices(data, tag, n)


class RandomK(TopK):
    """Keep ``fraction`` of each tensor's entries at random positions that the receiver redraws."""

    def __init__(self, *, fraction: str | float, seed: int = 0, min_numel: int = MIN_NUMEL) -> None:
        super().__init__(fraction=fraction, min_numel=min_numel)
        self.seed = seed

    def _select(self, name: str, t: torch.Tensor, k: int) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        content = t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
        # numpy declares ndarray.__buffer__ only for Python >= 3.12; the buffer protocol is there on 3.11 too
        seed = zlib.crc32(content, zlib.crc32(f"{self.seed}:{name}".encode()))  # type: ignore[arg-type]
        return random_indices(seed, t.numel(), k), f"r{seed}", None

    def _indices(self, data: torch.Tensor | None, tag: str, n: int, k: int) -> torch.Tensor:
        return random_indices(int(tag.removeprefix("r")), n, k)


def random_indices(seed: int, n: int, k: int) -> torch.Tensor:
    """``k`` sorted distinct flat indices in ``[0, n)`` drawn from ``seed`` (CPU generator)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values
