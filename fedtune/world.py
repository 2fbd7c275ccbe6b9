"""Everything a run builds from its config before round 0, deterministic given the config.

The server process builds a :class:`World` once; a parallel worker builds its own (the same data,
shards and initial model, because every draw is seeded from the config) and keeps its model
resident for the whole run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fedtune.client.runtime import ClientRuntime, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.budget import Budget
from fedtune.comm.channel import Channel
from fedtune.comm.codec import Codec
from fedtune.comm.spec import make_codec
from fedtune.config import build, to_container
from fedtune.data.schema import Splits
from fedtune.data.sources import load_splits
from fedtune.data.tasks import TaskData, corpus, prepare
from fedtune.errors import ConfigError
from fedtune.models.lora import apply_lora, get_trainable_state
from fedtune.seeding import Purpose, derive_seed
from fedtune.strategies.base import ServerContext, Strategy, check_exchange, check_schedule

log = logging.getLogger(__name__)


@dataclass
class World:
    splits: Splits
    tokenizer: PreTrainedTokenizerBase
    task: TaskData
    model: torch.nn.Module
    parts: list[list[int]]
    device: torch.device
    strategy: Strategy
    cfg: DictConfig

    @property
    def shards(self) -> dict[int, list[int]]:
        return {cid: list(idx) for cid, idx in enumerate(self.parts)}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={spec}: no CUDA device is visible here (use device=cpu or device=auto)")
    return torch.device(spec)


def build_world(cfg: DictConfig, *, device: torch.device) -> World:
    """Data, tokenizer, tokenized task, the resident model (LoRA applied), the partition, the strategy.

    The strategy is built first (it may reserve data, e.g. KD's public set, before partitioning)
    and set up last, with the model's initial trainable state.
    """
    strategy: Strategy = build(cfg.strategy)
    check_schedule(strategy, cfg.schedule.mode)
    lora_mode, down_delta = str(cfg.lora.get("mode", "lora")), bool(cfg.comm.get("down_delta", False))
    check_exchange(strategy, lora_mode=lora_mode, down_delta=down_delta, schedule=cfg.schedule.mode)
    splits = strategy.prepare_splits(load_splits(cfg.data), seed=int(cfg.data.seed))
    tokenizer = build(cfg.model.tokenizer, texts=corpus(splits))
    task = prepare(splits, tokenizer, classify_with=cfg.data.classify_with, max_seq_len=cfg.local.max_seq_len,
                   max_eval_samples=cfg.eval.max_samples)
    quant = to_container(cfg.quant) if cfg.quant.load_in else None
    torch.manual_seed(derive_seed(cfg.seed, 0, 0, Purpose.INIT))  # model init and LoRA init
    model = build(cfg.model.builder, tokenizer=tokenizer, quant=quant, num_labels=task.num_labels)
    lora_cfg = cfg.lora
    if strategy.full_parameters and lora_cfg.enabled:
        log.warning("strategy %s trains full parameters: lora.* is ignored (lora.enabled=false)",
                    type(strategy).__name__)
        lora_cfg = OmegaConf.merge(lora_cfg, {"enabled": False})
    model = apply_lora(
        model, lora_cfg, default_targets=cfg.model.lora_target_modules,
        default_modules_to_save=cfg.model.get("lora_modules_to_save"), fan_in_fan_out=cfg.model.fan_in_fan_out,
        task_type="SEQ_CLS" if task.num_labels else "CAUSAL_LM",
    ).to(device)
    # Training and scoring forwards build no KV cache (a training forward used to fill one it never
    # read); generation asks for one explicitly (fedtune.train.evaluate.generate).
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    parts = build(cfg.partition)(splits.train, num_clients=cfg.num_clients, seed=cfg.seed)
    world = World(splits=splits, tokenizer=tokenizer, task=task, model=model, parts=parts, device=device,
                  strategy=strategy, cfg=cfg)
    server = ServerContext(model=model, tokenizer=tokenizer, task=task, device=device, local=local_config(cfg),
                           seed=int(cfg.seed), synchronous=cfg.schedule.mode == "sync",
                           down_codec=make_codec(cfg.comm.down, key="comm.down", seed=cfg.seed), down_delta=down_delta,
                           lora_mode=lora_mode, sb_init=str(cfg.lora.get("sb_init", "svd")))
    strategy.setup(initial_state=get_trainable_state(model), num_clients=cfg.num_clients, server=server)
    return world


def local_config(cfg: DictConfig) -> LocalConfig:
    """The ``local`` node, typed."""
    return LocalConfig(**{k: cfg.local[k] for k in ("batch_size", "lr", "epochs", "max_steps", "weight_decay",
                                                    "grad_clip", "max_seq_len")})


MID_UPDATE_KINDS = ("activations", "gradients")  # comm.<kind>: a codec for that traffic instead of comm.up/down


def make_channel(cfg: DictConfig) -> Channel:
    kinds = {kind: make_codec(cfg.comm[kind], key=f"comm.{kind}", seed=cfg.seed)
             for kind in MID_UPDATE_KINDS if cfg.comm.get(kind) is not None}
    wire, entropy = str(cfg.comm.get("wire", "safetensors")), str(cfg.comm.get("entropy", "none"))
    up: Codec = make_codec(cfg.comm.up, key="comm.up", seed=cfg.seed)
    if cfg.comm.get("budget_bytes") is not None:  # the uplink codec is chosen per upload from the ladder
        up = Budget(list(cfg.comm.ladder), budget_bytes=int(cfg.comm.budget_bytes), wire=wire, entropy=entropy,
                    seed=cfg.seed)
    return Channel(up=up, down=make_codec(cfg.comm.down, key="comm.down", seed=cfg.seed), wire=wire,
                   entropy=entropy, kinds=kinds)


def client_runtime(cfg: DictConfig, world: World, *, store: ClientStore, channel: Channel) -> ClientRuntime:
    """The host for clients' local updates on this process's resident model."""
    return ClientRuntime(
        model=world.model, data=world.task.train, shards=world.shards, local=local_config(cfg), store=store,
        channel=channel,
        seed=cfg.seed, pad_id=world.tokenizer.pad_token_id, device=world.device,
        error_feedback=bool(cfg.comm.error_feedback),
    )
