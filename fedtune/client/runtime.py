"""What a client sees during its local update, and the runtime that hosts clients on a device.

A :class:`ClientRuntime` owns the ONE resident model of its device. A client is not a model: it is
a shard of the training data plus a state entry in the :class:`ClientStore`, swapped in for its
local update. Strategies only see :class:`ClientContext`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel, Message
from fedtune.comm.feedback import compress_with_feedback, corrected
from fedtune.data.format import Tokenized
from fedtune.models.lora import State, get_trainable_state, set_trainable_state
from fedtune.seeding import Purpose, derive_seed, generator, seed_global
from fedtune.train.local import LossFn, TrainResult, plan_steps, train_local


class Updater(Protocol):
    """What the runtime runs: a strategy's client side (:meth:`fedtune.strategies.base.Strategy.local_update`)."""

    def local_update(self, client: ClientContext, message: Message) -> Message: ...


@dataclass
class LocalConfig:
    """The ``local`` config node, typed."""

    batch_size: int
    lr: float
    epochs: float = 1.0
    max_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    max_seq_len: int = 128  # (tokenization only: training takes the data as tokenized)


@dataclass
class ClientResult:
    """A finished local update: the message to send up plus instrumentation."""

    message: Message | None  # None once the uplink has taken it
    report: TrainResult | None
    seconds: float

    def take_message(self) -> Message:
        """The reply, handed to the uplink: the client's copy is gone once sent."""
        message, self.message = self.message, None
        assert message is not None, "the reply was already sent"
        return message


@dataclass
class ClientRuntime:
    """The resident model, the tokenized training data and its shards, the client store."""

    model: torch.nn.Module
    data: Tokenized
    shards: dict[int, list[int]]
    local: LocalConfig
    store: ClientStore
    channel: Channel
    seed: int
    pad_id: int
    device: torch.device
    error_feedback: bool = False

    def run(self, strategy: Updater, *, round_idx: int, client_id: int, message: Message) -> ClientResult:
        """Run ``strategy.local_update`` for one client; its store entry is saved afterwards."""
        # Dropout draws from the global RNG: seed it per (seed, round, client) so a client's update
        # does not depend on which clients ran before it, or on which worker runs it.
        seed_global(derive_seed(self.seed, round_idx, client_id, Purpose.TRAIN), self.device)
        pool = message.pool or (client_id,)
        indices = sorted(i for c in pool for i in self.shards[c])
        ctx = ClientContext(
            client_id=client_id, round_idx=round_idx, indices=indices, runtime=self,
            state=self.store.get(client_id), budget=len(pool),
        )
        start = time.perf_counter()
        reply = strategy.local_update(ctx, message)
        if self.error_feedback and reply.tensors:
            # What the uplink codec drops stays with the client and joins its next upload. The channel
            # encodes deterministically, so the server receives exactly what the residual assumes.
            residual = ctx.state.get("ef_residual")
            _, _, ctx.state["ef_residual"] = compress_with_feedback(self.channel.codecs["up"], reply.tensors, residual)
            reply = Message(tensors=corrected(reply.tensors, residual), meta=reply.meta, pool=reply.pool)
        seconds = time.perf_counter() - start
        self.store.put(client_id, ctx.state)
        return ClientResult(message=reply, report=ctx.report, seconds=seconds)


@dataclass
class ClientContext:
    """One client's view during its local update.

    Attributes:
        client_id: the client.
        round_idx: the round.
        indices: rows of the training data this client trains on (its shard).
        state: the client's persistent entry in the client store (mutate it freely).
        budget: step-budget multiplier (the number of pooled shards; 1 for a normal client).
    """

    client_id: int
    round_idx: int
    indices: list[int]
    runtime: ClientRuntime
    state: dict[str, Any] = field(default_factory=dict)
    budget: int = 1
    report: TrainResult | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.runtime.model

    @property
    def local(self) -> LocalConfig:
        """The ``local.*`` training settings."""
        return self.runtime.local

    @property
    def channel(self) -> Channel:
        """For protocols that talk during a local update (activations, logits)."""
        return self.runtime.channel

    def get_trainable(self) -> State:
        return get_trainable_state(self.runtime.model)

    def set_trainable(self, state: State) -> None:
        set_trainable_state(self.runtime.model, state)

    def train(self, *, loss_fn: LossFn | None = None, keep_optimizer: bool = False) -> TrainResult:
        """Train the resident model's trainable parameters on this client's shard.

        Args:
            loss_fn: replaces the default response-token LM loss (e.g. to add a KD term).
            keep_optimizer: keep AdamW moments in the client store across rounds (one continuous
                trainer, as the local and centralized baselines are); federated clients start fresh.
        """
        cfg = self.runtime.local
        steps = plan_steps(len(self.indices), batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps)
        if cfg.max_steps is not None:
            steps *= self.budget
        result, opt_state = train_local(
            self.runtime.model, self.runtime.data, self.indices,
            num_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip, generator=generator(self.runtime.seed, self.round_idx, self.client_id, Purpose.TRAIN),
            pad_id=self.runtime.pad_id, device=self.runtime.device, loss_fn=loss_fn,
            optimizer_state=self.state.get("optimizer") if keep_optimizer else None,
        )
        if keep_optimizer:
            self.state["optimizer"] = opt_state
        self.report = result
        return result
