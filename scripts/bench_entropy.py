"""Entropy coders on typical quantized payloads: zstd (the ``zstandard`` binding) vs rANS (``constriction``).

    python scripts/bench_entropy.py     # two markdown tables (docs/compression.md: "Wire format", "Entropy coding")

Payloads come from fedtune's own codecs applied to a tensor set with the names and shapes of the default
``tiny`` model's trainable state at lora.r=8 (58 tensors, 93,440 values), filled with Gaussian values
(a stand-in for LoRA deltas, whose entries are close to normal). Rows: the int8 codes alone, the nf4
packed codes alone, top-k 1% indices alone (the sparsifier's own gap encoding), and whole compact wire
payloads (what ``comm.entropy=zstd`` compresses in a run).

rANS uses an order-0 model of the payload's own symbol frequencies (bytes; nf4 also as nibbles),
charged 2 bytes a symbol of the alphabet for sending the model. ``H0`` is the order-0 entropy bound.
``constriction`` is not a fedtune dependency: ``pip install constriction`` to run this script.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedtune.comm.channel import Channel, Message  # noqa: E402
from fedtune.comm.spec import make_codec  # noqa: E402
from fedtune.comm.wire import Table, encode  # noqa: E402


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    linears = {"q_proj": (128, 128), "k_proj": (128, 128), "v_proj": (128, 128), "o_proj": (128, 128),
               "gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128)}
    gen, shapes = torch.Generator().manual_seed(seed), {}
    for layer in range(4):
        for name, (fan_in, fan_out) in linears.items():
            where = "self_attn" if name[0] in "qkvo" else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{where}.{name}"
            shapes[f"{stem}.lora_A.weight"], shapes[f"{stem}.lora_B.weight"] = (8, fan_in), (fan_out, 8)
    shapes["base_model.model.model.embed_tokens.weight"] = shapes["base_model.model.lm_head.weight"] = (93, 128)
    return {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}


def _bytes(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def payloads(state: dict[str, torch.Tensor]) -> dict[str, tuple[bytes, int]]:
    """name -> (bytes, bits a symbol for the rANS model: 8, or 4 for nibbles)."""
    out: dict[str, tuple[bytes, int]] = {}
    enc, _ = make_codec("int8").encode(state)
    out["int8 codes"] = (_bytes([t for k, t in enc.items() if "::" not in k]), 8)
    enc, _ = make_codec("nf4").encode(state)
    nf4 = _bytes([t for k, t in enc.items() if "::" not in k])
    out["nf4 packed (bytes)"], out["nf4 packed (nibbles)"] = (nf4, 8), (nf4, 4)
    enc, _ = make_codec("topk0.01").encode(state)
    out["top-k 1% indices"] = (_bytes([t for k, t in enc.items() if k.endswith("::idx")]), 8)
    for spec in ("none", "bf16", "int8", "nf4", "topk0.01+int8"):
        table = Table()
        for _ in range(2):  # the second payload: the name table is already known
            enc, meta = make_codec(spec).encode(state)
            payload = encode(enc, {"num_examples": 30}, meta, table)
        out[f"compact payload, {spec}"] = (payload, 8)
    return out


def symbols(data: bytes, bits: int) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    return np.stack([arr >> 4, arr & 15], axis=1).reshape(-1) if bits == 4 else arr


def entropy_bytes(sym: np.ndarray, alphabet: int) -> float:
    counts = np.bincount(sym, minlength=alphabet).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def ans_bytes(sym: np.ndarray, alphabet: int) -> int:
    import constriction

    counts = np.bincount(sym, minlength=alphabet).astype(np.float64)
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(sym, model)
    return 4 * len(coder.get_compressed()) + 2 * alphabet  # the compressed words + the model


def wire_table(state: dict[str, torch.Tensor]) -> list[str]:
    """Bytes counted per upload (the same tensors twice) by each wire format, with and without zstd."""
    lines = ["| comm.up | safetensors | compact, 1st upload | compact, later | compact + zstd, later |",
             "|---|---:|---:|---:|---:|"]
    for spec in ("none", "bf16", "int8", "nf4", "topk0.01+int8"):
        counted = {}
        for wire, entropy in (("safetensors", "none"), ("compact", "none"), ("compact", "zstd")):
            ch = Channel(up=make_codec(spec), wire=wire, entropy=entropy)
            for r in range(2):
                ch.send(Message(tensors=state, meta={"num_examples": 30}), round_idx=r, client_id=0, direction="up")
            counted[wire, entropy] = [t.num_bytes for t in ch.transfers]
        st, (first, later), z = counted["safetensors", "none"], counted["compact", "none"], counted["compact", "zstd"]
        lines.append(f"| {spec} | {st[1]:,} | {first:,} | {later:,} | {z[1]:,} |")
    return lines


def main() -> None:
    state = tiny_state()
    sys.stdout.write("\n".join(wire_table(state)) + "\n\n")
    lines = ["| payload | raw bytes | zstd-3 | zstd-19 | rANS order-0 (+model) | H0 bound | zstd-3 ms | rANS ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (data, bits) in payloads(state).items():
        t = time.perf_counter()
        z3 = len(zstandard.ZstdCompressor(level=3).compress(data))
        z3_ms = (time.perf_counter() - t) * 1e3
        z19 = len(zstandard.ZstdCompressor(level=19).compress(data))
        sym, alphabet = symbols(data, bits), 2**bits
        t = time.perf_counter()
        ans = ans_bytes(sym, alphabet)
        ans_ms = (time.perf_counter() - t) * 1e3
        h0 = math.ceil(entropy_bytes(sym, alphabet))
        n = len(data)
        lines.append(f"| {name} | {n:,} | {z3:,} ({z3 / n:.3f}) | {z19:,} ({z19 / n:.3f}) | {ans:,} ({ans / n:.3f}) "
                     f"| {h0:,} ({h0 / n:.3f}) | {z3_ms:.1f} | {ans_ms:.1f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
