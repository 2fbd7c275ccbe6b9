"""Entropy coding of whole payloads (``comm.entropy``): the channel counts the compressed length.

``zstd`` is Zstandard (the maintained ``zstandard`` binding) at level :data:`ZSTD_LEVEL`, one frame a
payload with its content size and no checksum (the simulated link loses nothing). Measured against
rANS (``constriction``, an order-0 model per payload) in ``scripts/bench_entropy.py``; the numbers
and why zstd alone is used are in docs/compression.md ("Entropy coding").
"""

from __future__ import annotations

ENTROPY = ("none", "zstd")
ZSTD_LEVEL = 3  # zstd's default; level 19 is no smaller on quantized payloads and 30x slower


def compress(payload: bytes, method: str) -> bytes:
    if method == "none":
        return payload
    assert method == "zstd", method
    import zstandard  # imported on use: runs without entropy coding never load it

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False,
                                    write_content_size=True).compress(payload)


def decompress(payload: bytes, method: str) -> bytes:
    if method == "none":
        return payload
    assert method == "zstd", method
    import zstandard

    return zstandard.ZstdDecompressor().decompress(payload)
