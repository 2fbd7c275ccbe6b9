"""LoRA adapters (thin over peft) and the trainable state that clients exchange.

The trainable state is a ``{name: tensor}`` dict of exactly what a client trains: the LoRA
matrices (and any ``modules_to_save``) with LoRA, or every parameter with ``lora.enabled=false``.
Everything returned here is a detached CPU copy: peft's ``get_peft_model_state_dict`` returns
tensors that share memory with the live model, and a payload must never alias them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from fedtune.errors import ConfigError

State = dict[str, torch.Tensor]


def apply_lora(
    model: PreTrainedModel,
    lora_cfg: DictConfig,
    *,
    default_targets: Sequence[str],
    default_modules_to_save: Sequence[str] | None = None,
    fan_in_fan_out: bool = False,
    task_type: str = "CAUSAL_LM",
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (or unfreeze everything when ``lora.enabled=false``)."""
    if not lora_cfg.enabled:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    targets = lora_cfg.target_modules or list(default_targets)
    if isinstance(targets, str):
        targets_arg: str | list[str] = targets  # e.g. "all-linear"
    else:
        targets_arg = list(targets)
    # null -> the model's default; [] -> nothing beyond the LoRA matrices
    to_save = lora_cfg.modules_to_save if lora_cfg.modules_to_save is not None else (default_modules_to_save or [])
    config = LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=float(lora_cfg.alpha),  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
        lora_dropout=float(lora_cfg.dropout),
        target_modules=targets_arg,
        modules_to_save=list(to_save) or None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(
            f"lora.target_modules={targets}: {str(err).splitlines()[0]} "
            "(name modules of this model, e.g. [q_proj,v_proj], or all-linear)"
        ) from None


_LIVE = "_fedtune_adapter_parameters"  # the cache of _adapter_parameters, in the model's __dict__


def _adapter_parameters(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """peft's adapter state-dict keys -> the live parameters those entries are views of (matched by
    storage, shape and dtype), computed once per model: swapping a client's adapter in or out then
    copies tensors, instead of walking the whole model's state dict twice per client. None if some
    entry is not a view of a parameter (peft's own functions are used then)."""
    cached = model.__dict__.get(_LIVE)
    if cached is not None:
        return cached or None
    params = {(p.data_ptr(), tuple(p.shape), p.dtype): p for p in model.parameters()}
    live: dict[str, torch.Tensor] = {}
    for key, t in get_peft_model_state_dict(model, save_embedding_layers=False).items():
        param = params.get((t.data_ptr(), tuple(t.shape), t.dtype))
        if param is None:
            model.__dict__[_LIVE] = {}
            return None
        live[key] = param
    model.__dict__[_LIVE] = live
    return live


def get_trainable_state(model: torch.nn.Module) -> State:
    """A detached CPU copy of the trainable state (never an alias of live parameters)."""
    if isinstance(model, PeftModel):
        live = _adapter_parameters(model) or get_peft_model_state_dict(model, save_embedding_layers=False)
    else:
        live = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in live.items()}


def set_trainable_state(model: torch.nn.Module, state: State) -> None:
    """Load ``state`` into the live model; any unexpected or missing trainable key raises."""
    if isinstance(model, PeftModel) and (adapter := _adapter_parameters(model)) is not None:
        if adapter.keys() != state.keys():
            extra, missing = set(state) - set(adapter), set(adapter) - set(state)
            if extra:
                raise KeyError(f"trainable state has keys the model does not: {sorted(extra)[:5]}")
            raise KeyError(f"trainable state lacks adapter keys: {sorted(missing)[:5]}")
        with torch.no_grad():  # what peft's set_peft_model_state_dict (load_state_dict) copies, directly
            for key, param in adapter.items():
                param.copy_(state[key])
        return
    if isinstance(model, PeftModel):
        # peft annotates the return as `namedtuple` (not a type); it is torch's _IncompatibleKeys
        result: Any = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise KeyError(f"trainable state has keys the model does not: {sorted(result.unexpected_keys)[:5]}")
        expected = get_peft_model_state_dict(model, save_embedding_layers=False).keys()
        missing = set(expected) - set(state)
        if missing:
            raise KeyError(f"trainable state lacks adapter keys: {sorted(missing)[:5]}")
        return
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        extra, missing = set(state) - set(params), set(params) - set(state)
        raise KeyError(f"trainable state mismatch: unexpected {sorted(extra)[:5]}, missing {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def _numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit tensor packs two per byte (its quant_state has the shape)."""
    state = getattr(p, "quant_state", None)
    return int(math.prod(state.shape)) if state is not None and getattr(state, "shape", None) else p.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the weights they encode."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total
