"""Small helpers on tensors and nested containers of them."""

from __future__ import annotations

from typing import Any

import torch


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors in ``obj`` (a tensor, or dicts/lists/tuples of them; other values: 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v) for v in obj)
    return 0
