"""Config composition helpers and validation of values a schema cannot express."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fedtune.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# strategies whose ``full_parameters`` is True, by target (checked without importing them: peft is slow)
FULL_PARAMETER_STRATEGIES = ("fedtune.strategies.fedcybgd.FedCyBGD",)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: DictConfig, key: str, *, allow_none: bool = False, strict: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (value > 0 if strict else value >= 0)
    _require(ok, f"{key}={value}: must be a number {'>' if strict else '>='} 0")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line: the key and the fix) for impossible values."""
    _require(isinstance(cfg.num_clients, int) and cfg.num_clients >= 1,
             f"num_clients={cfg.num_clients}: must be an integer >= 1")
    cpr = cfg.clients_per_round
    _require(cpr is None or (isinstance(cpr, int) and 1 <= cpr <= cfg.num_clients),
             f"clients_per_round={cpr}: must be between 1 and num_clients={cfg.num_clients} (or null for all)")
    _require(isinstance(cfg.num_rounds, int) and cfg.num_rounds >= 1,
             f"num_rounds={cfg.num_rounds}: must be an integer >= 1")
    if cfg.lora.enabled:
        _require(isinstance(cfg.lora.r, int) and cfg.lora.r >= 1,
                 f"lora.r={cfg.lora.r}: the LoRA rank must be an integer >= 1 (or lora.enabled=false)")
        _positive(cfg, "lora.alpha")
        _require(0 <= cfg.lora.dropout < 1, f"lora.dropout={cfg.lora.dropout}: must be in [0, 1)")
    mode = cfg.lora.get("mode", "lora")
    _require(mode in ("lora", "ffa", "sb", "alt"), f"lora.mode={mode}: choose one of lora, ffa (train B only), "
             "sb (train an r x r matrix between frozen A and B), alt (train B, then A, round by round)")
    sb_init = cfg.lora.get("sb_init", "svd")
    _require(sb_init in ("svd", "identity"), f"lora.sb_init={sb_init}: choose svd (re-factor B A, R = its singular "
             "values) or identity (freeze A and B as they are, R = I)")
    _require(mode == "lora" or cfg.lora.enabled, f"lora.mode={mode} needs LoRA (set lora.enabled=true, "
             "or lora.mode=lora: comm=extreme sets ffa)")
    _require(isinstance(cfg.comm.get("down_delta", False), bool),
             f"comm.down_delta={cfg.comm.get('down_delta')}: must be true or false")
    _positive(cfg, "local.lr")
    _positive(cfg, "local.batch_size")
    _positive(cfg, "local.max_seq_len")
    _positive(cfg, "local.max_steps", allow_none=True)
    _positive(cfg, "local.epochs")
    _positive(cfg, "local.grad_clip", allow_none=True)
    _positive(cfg, "local.weight_decay", strict=False)
    _positive(cfg, "eval.every", strict=False)
    _positive(cfg, "eval.batch_size")
    _positive(cfg, "eval.bleu_samples", strict=False)
    _positive(cfg, "eval.max_new_tokens")
    _positive(cfg, "eval.max_samples", allow_none=True)
    _positive(cfg, "checkpoint.every", strict=False)
    _positive(cfg, "checkpoint.keep_last")
    _positive(cfg, "clients.flops_per_s")
    _positive(cfg, "clients.server_flops_per_s", allow_none=True)
    from fedtune.comm.channel import WIRES  # a bad codec spec or wire stops here, before any folder exists
    from fedtune.comm.entropy import ENTROPY
    from fedtune.comm.spec import make_codec

    for direction in ("up", "down"):
        make_codec(cfg.comm[direction], key=f"comm.{direction}")
    budget = cfg.comm.get("budget_bytes")
    if budget is not None:
        _require(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1,
                 f"comm.budget_bytes={budget}: must be a positive number of bytes per upload (or null)")
        _require(str(cfg.comm.up).lower() in ("none", "fp32"),
                 f"comm.up={cfg.comm.up}: comm.budget_bytes picks the uplink codec from comm.ladder; "
                 "leave comm.up=none (or put the codec in comm.ladder)")
        from fedtune.comm.budget import Budget

        Budget(list(cfg.comm.get("ladder") or []), budget_bytes=budget)  # each rung's spec is valid
    for kind in ("activations", "gradients"):  # split learning's mid-update traffic; null: comm.up / comm.down
        if cfg.comm.get(kind) is not None:
            make_codec(cfg.comm[kind], key=f"comm.{kind}")
    for key, allowed in (("wire", WIRES), ("entropy", ENTROPY)):
        value = cfg.comm.get(key, allowed[0])
        _require(value in allowed, f"comm.{key}={value}: must be one of {', '.join(allowed)}")
    threads = cfg.get("threads")
    _require(threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1),
             f"threads={threads}: must be an integer >= 1 (torch CPU threads), or null for all cores")
    for key in ("local.batch_size", "local.max_seq_len", "eval.every", "eval.bleu_samples", "checkpoint.every",
                "checkpoint.keep_last"):
        value = OmegaConf.select(cfg, key)
        _require(isinstance(value, int), f"{key}={value}: must be an integer")
    if not cfg.model.get("generative", True) and (cfg.data.task == "generate" or cfg.data.classify_with != "head"):
        raise ConfigError(f"model={cfg.model.name} is an encoder: it can only classify with a head "
                          "(set data.classify_with=head with a classification dataset, or pick a causal LM)")
    if cfg.quant.load_in is not None:
        _require(cfg.strategy.get("_target_") not in FULL_PARAMETER_STRATEGIES,
                 f"quant={cfg.quant.name}: strategy {cfg.strategy.get('_target_', '').rsplit('.', 1)[-1]} trains "
                 "full parameters, which a quantized base cannot (use quant=none)")
        _require(cfg.lora.enabled, f"quant={cfg.quant.name} needs LoRA: a quantized base cannot be trained "
                 "full-parameter (set lora.enabled=true or quant=none)")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (for W&B and summary.json); hydra's own node dropped."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    out.pop("hydra", None)
    return cast("dict[str, Any]", out)  # OmegaConf keys may be any DictKeyType; a run's config has str keys


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our :class:`ConfigError` through unwrapped.

    Hydra wraps whatever a ``_target_`` raises in ``InstantiationException``; a user mistake
    detected inside a constructor must still reach the CLI as one line.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            if isinstance(cause, TypeError) and (m := re.search(r"unexpected keyword argument '(\w+)'", str(cause))):
                where = node._get_full_key(None) if isinstance(node, DictConfig) else "?"
                target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
                raise ConfigError(f"{where}.{m[1]}: {target} has no setting {m[1]} (see its yaml in conf/"
                                  f"{where.split('.')[0]}/ for the ones it has)") from None
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed config for ``overrides`` without running anything (tests, scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))
