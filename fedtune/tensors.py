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



_STRUCTURE = "_fedtune_structure"  # structure_cache's dict, in the module's __dict__


def structure_cache(module: torch.nn.Module) -> dict[str, Any]:
    """A dict kept on ``module`` for values that follow from its structure alone (which submodules and
    parameters it has), e.g. its parameter list or its FLOPs parameter count: walking every submodule
    (~0.15 ms a walk on a 2-layer model, more on deeper ones) otherwise runs several times per client
    update. Code that adds or replaces submodules afterwards must call :func:`structure_changed`."""
    return module.__dict__.setdefault(_STRUCTURE, {})


def structure_changed(module: torch.nn.Module) -> None:
    """Forget what :func:`structure_cache` holds (submodules were added or replaced)."""
    module.__dict__.pop(_STRUCTURE, None)


def module_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``list(module.parameters())``, walked once per structure (:func:`structure_cache`)."""
    cache = structure_cache(module)
    if "parameters" not in cache:
        cache["parameters"] = list(module.parameters())
    return cache["parameters"]
