"""LoRA adapters (thin over peft) and the trainable state that clients exchange.

The trainable state is a ``{name: tensor}`` dict of exactly what a client trains: the LoRA
matrices (and any ``modules_to_save``) with LoRA, or every parameter with ``lora.enabled=false``.
Everything returned here is a detached CPU copy: peft's ``get_peft_model_state_dict`` returns
tensors that share memory with the live model, and a payload must never alias them.

``lora.mode`` says which LoRA factors are trained (and so exchanged):

- ``lora``: A and B (plain LoRA).
- ``ffa`` (FFA-LoRA, Sun et al. 2024): A stays at its seeded initialisation, the same in every process
  (the model and its adapters are built under one seed), so only B is trained; the mean of B_i A is
  (mean B_i) A, exact.
- ``alt`` (alternating, as RoLoRA, Chen et al. 2024, and LoRA-A², Koo et al. 2024, do): in each round every
  client trains one factor with the other frozen, B in even rounds (B starts at zero, so A's gradient would
  be zero), A in odd ones (:func:`alt_factor`); only the trained factor is exchanged, half the LoRA values a
  round, and the mean is exact because the frozen factor is the same global one in every client. Unlike
  ``ffa``, A is trained too. :func:`set_alt_phase` sets which factor trains.
- ``sb`` (Fed-SB, Singhal et al. 2025, simplified): plain LoRA until :func:`to_sb` freezes A and B and puts a
  trainable r x r matrix R between them (``W0 + B R A``, R = I so the model is unchanged); from then on the
  trainable state is the R matrices, and the mean of B R_i A is B (mean R_i) A, exact. Before freezing, the
  server re-factors each layer's B A with :func:`sb_factorize` (``lora.sb_init=svd``, the default): B and A
  get orthonormal columns and rows and R the singular values, so a step on R moves the adapted weight by the
  same amount whatever the size B had reached (with R = I and B still near its zero start, it barely moves).

Frozen factors are parameters with ``requires_grad=False``; their keys are left out of the trainable state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from fedtune.errors import ConfigError
from fedtune.tensors import structure_changed

State = dict[str, torch.Tensor]
MODES = ("lora", "ffa", "sb", "alt")


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
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(
            f"lora.target_modules={targets}: {str(err).splitlines()[0]} "
            "(name modules of this model, e.g. [q_proj,v_proj], or all-linear)"
        ) from None
    mode = lora_cfg.get("mode", "lora")
    if mode not in MODES:
        raise ConfigError(f"lora.mode={mode}: choose one of {', '.join(MODES)}")
    if mode == "ffa":  # A keeps the seeded init it was just given (torch's RNG, seeded by the caller)
        _freeze(peft_model, [p for layer in _lora_layers(peft_model) for name in layer.lora_A
                             for p in layer.lora_A[name].parameters()], mode="ffa")
    return peft_model


_LIVE = "_fedtune_adapter_parameters"  # the cache of _adapter_parameters, in the model's __dict__
_FROZEN = "_fedtune_frozen_keys"  # peft state-dict keys of frozen LoRA factors (ffa, sb), in the model's __dict__


def _lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _freeze(model: PeftModel, params: list[torch.Tensor], *, mode: str) -> None:
    """Stop training ``params`` and leave their keys out of the trainable state from now on."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None  # a gradient of earlier training is memory the client no longer holds
    model.__dict__.pop(_LIVE, None)  # modules may have been replaced: find the live parameters again
    structure_changed(model)
    live = _adapter_parameters(model)
    if live is None:
        raise ConfigError(f"lora.mode={mode}: this model's adapter state is not made of plain parameters "
                          "(use lora.mode=lora)")
    model.__dict__[_FROZEN] = frozenset(k for k, p in live.items() if not p.requires_grad)


def frozen_keys(model: torch.nn.Module) -> frozenset[str]:
    """Keys of the frozen LoRA factors (A under ffa; A and B after :func:`to_sb`; the idle factor in an alt
    round, :func:`set_alt_phase`); empty for plain LoRA."""
    return model.__dict__.get(_FROZEN, frozenset())


ALT_FACTORS = ("A", "B")


def alt_factor(round_idx: int) -> str:
    """``lora.mode=alt``: the factor every client trains in round ``round_idx``: B first (at B = 0 the
    gradient of A is zero), then A, and so on."""
    return "B" if round_idx % 2 == 0 else "A"


def set_alt_phase(model: torch.nn.Module, factor: str | None) -> None:
    """``lora.mode=alt``: train only ``factor`` ("A" or "B") of every LoRA layer, the other frozen and left
    out of the trainable state; None: both trained again (the whole adapter in and out, e.g. to load the
    global state or to evaluate). Anything else trainable (``modules_to_save``) stays trainable."""
    assert factor in (None, *ALT_FACTORS), factor
    if not isinstance(model, PeftModel):
        raise ConfigError("lora.mode=alt needs LoRA adapters (lora.enabled=true)")
    for layer in _lora_layers(model):
        for name, modules in (("A", layer.lora_A), ("B", layer.lora_B)):
            for module in modules.values():
                for p in module.parameters():
                    p.requires_grad_(factor is None or name == factor)
                    if not p.requires_grad:
                        p.grad = None
    live = _adapter_parameters(model)
    if live is None:
        raise ConfigError("lora.mode=alt: this model's adapter state is not made of plain parameters "
                          "(use lora.mode=lora)")
    model.__dict__[_FROZEN] = frozenset(k for k, p in live.items() if not p.requires_grad)


class SBFactor(torch.nn.Linear):
    """Fed-SB's ``lora_B``: x -> B (R x), with B frozen and R (r x r, starting at the identity) trained.

    peft's LoRA forward computes ``lora_B(lora_A(dropout(x))) * scaling``, so putting R inside ``lora_B``
    gives ``W0 x + B R A x * scaling``. B keeps its parameter (and state-dict key ``lora_B.weight``); R's
    key is ``lora_B.<adapter>.R.weight``. peft's merge (``get_delta_weight``) does not know R: do not merge.
    """

    def __init__(self, lora_b: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = lora_b.in_features, lora_b.out_features
        self.weight = lora_b.weight
        self.register_parameter("bias", None)
        r = lora_b.in_features
        self.R = torch.nn.Linear(r, r, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            self.R.weight.copy_(torch.eye(r, dtype=self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.R(x), self.weight)


def is_sb(model: torch.nn.Module) -> bool:
    """Whether :func:`to_sb` has put the R matrices in."""
    return any(isinstance(b, SBFactor) for layer in _lora_layers(model) for b in layer.lora_B.values())


def to_sb(model: PeftModel) -> None:
    """Freeze every LoRA layer's A and B at their current values and put a trainable R = I between them
    (the model's outputs are unchanged). The trainable state becomes the R matrices (plus any
    ``modules_to_save``). Does nothing if already done."""
    if is_sb(model):
        return
    frozen: list[torch.Tensor] = []
    for layer in _lora_layers(model):
        if layer.lora_embedding_A:
            raise ConfigError("lora.mode=sb: adapters on embedding layers are not supported (target Linear layers)")
        for name in list(layer.lora_B):
            a, b = layer.lora_A[name], layer.lora_B[name]
            assert isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear), (type(a), type(b))
            layer.lora_B[name] = sb = SBFactor(b)
            frozen += [a.weight, sb.weight]
    _freeze(model, frozen, mode="sb")


def sb_factorize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a2, b2, r)`` with ``b2 @ r @ a2 == b @ a`` (to rounding), ``b2``'s columns and ``a2``'s rows
    orthonormal and ``r`` the diagonal of ``b @ a``'s singular values (LoRA-SB's SVD initialisation, applied
    to the adapted weight LoRA has learned). ``a``: r x in, ``b``: out x r. Computed in float64 from the
    thin QR factors (an r x r SVD), returned in ``a``'s dtype."""
    qb, rb = torch.linalg.qr(b.double())    # b = qb rb
    qa, ra = torch.linalg.qr(a.double().T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # b a = qb (u s vh) qa^T
    return (vh @ qa.T).to(a.dtype), (qb @ u).to(b.dtype), torch.diag(s).to(a.dtype)


def get_frozen_state(model: torch.nn.Module) -> State:
    """A CPU copy of the frozen LoRA factors (what Fed-SB clients receive once)."""
    live = _adapter_parameters(model) if isinstance(model, PeftModel) else None
    keys = frozen_keys(model)
    assert live is not None or not keys, "frozen factors need a model whose adapter entries are parameters"
    return {k: live[k].detach().to("cpu", copy=True) for k in sorted(keys)} if live else {}


def set_frozen_state(model: torch.nn.Module, state: State) -> None:
    """Copy ``state`` (exactly the frozen factors' keys) into the frozen parameters."""
    keys = frozen_keys(model)
    if keys != state.keys():
        raise KeyError(f"frozen state keys differ from the model's frozen factors: "
                       f"{sorted(keys ^ state.keys())[:5]}")
    live = _adapter_parameters(model) if isinstance(model, PeftModel) else None
    assert live is not None
    with torch.no_grad():
        for key in keys:
            live[key].copy_(state[key])


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
        if frozen := frozen_keys(model):
            live = {k: t for k, t in live.items() if k not in frozen}
    else:
        live = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in live.items()}


def set_trainable_state(model: torch.nn.Module, state: State) -> None:
    """Load ``state`` into the live model; any unexpected or missing trainable key raises."""
    if isinstance(model, PeftModel) and (adapter := _adapter_parameters(model)) is not None:
        if frozen := frozen_keys(model):
            adapter = {k: p for k, p in adapter.items() if k not in frozen}
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
