"""Client-side error feedback (EF, as in EF-SGD / top-k with memory): what compression dropped last
time is added back before compressing this time, so nothing is lost, only delayed.

Pure functions: the caller keeps ``residual`` (e.g. in the client store) between rounds.
"""

from __future__ import annotations

import torch

from fedtune.comm.codec import Codec, Tensors


def corrected(tensors: Tensors, residual: Tensors | None) -> Tensors:
    """``tensors + residual`` (in each tensor's dtype): what the client actually compresses and sends."""
    residual = residual or {}
    out = {}
    for name, t in tensors.items():
        r = residual.get(name)
        if r is not None and t.is_floating_point():
            assert r.shape == t.shape, f"{name}: residual {tuple(r.shape)} vs tensor {tuple(t.shape)}"
            t = (t.detach().float() + r.to(t.device)).to(t.dtype)
        out[name] = t
    return out


def compress_with_feedback(
    codec: Codec, tensors: Tensors, residual: Tensors | None
) -> tuple[Tensors, dict[str, str], Tensors]:
    """Encode ``tensors + residual`` and return what compression dropped as the next residual.

    Args:
        codec: the direction's codec (deterministic: encoding the same input twice gives the same
            payload, so sending :func:`corrected` through the channel delivers exactly ``decode`` of
            what is returned here).
        tensors: this round's update (e.g. a LoRA delta).
        residual: the previous call's ``new_residual``, or None the first time.

    Returns:
        ``(encoded, meta, new_residual)``; ``new_residual`` is fp32 (it also keeps what a cast to a
        narrower dtype rounded off) and satisfies, per floating tensor,
        ``decode(encoded) + new_residual == tensors + residual`` up to fp32 rounding. Residuals of
        names absent from ``tensors`` are carried over unchanged; non-floating tensors get none.
    """
    residual = residual or {}
    target = {
        name: t.detach().float() + residual[name].to(t.device) if name in residual else t.detach().float()
        for name, t in tensors.items() if t.is_floating_point()
    }
    sent_input = corrected(tensors, residual)
    encoded, meta = codec.encode(sent_input)
    received = codec.decode(dict(encoded), meta)
    new_residual = {name: r for name, r in residual.items() if name not in tensors}
    for name, want in target.items():
        got = received[name].detach().to(want.device, torch.float32)
        new_residual[name] = want - got
    return encoded, meta, new_residual
