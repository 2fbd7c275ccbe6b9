"""The strategy contract: what a federated method must say, and what it may.

A strategy owns WHAT is exchanged and HOW it is aggregated. It never owns the round loop, the
channel, the engine, the schedule, logging or files. Per round the runner (``fedtune/run.py``) calls::

    sampled  = strategy.select(round_idx, sampled)             # optional: choose your own clients
    messages = strategy.broadcast(round_idx, client_ids)       # server: what each client downloads
    ... channel down, per client ...
    reply    = strategy.local_update(client, message)          # client: one local update
    ... channel up; non-finite replies are dropped here ...
    reply    = strategy.fold(round_idx, client_id, reply)      # optional: consume a reply as it lands
    metrics  = strategy.aggregate(round_idx, replies)          # server: the replies the schedule released

Required: :meth:`~Strategy.broadcast`, :meth:`~Strategy.local_update`, :meth:`~Strategy.aggregate`.
Optional (defaults below): ``prepare_splits``, ``setup``, ``select``, ``fold``, ``eval_states``,
``state_dict``/``load_state_dict``, and three class-level declarations: ``full_parameters``,
``server_in_the_loop``, ``supports_async``.

``local_update`` runs wherever the engine puts the client (another process, with its own copy of the
strategy set up from the same config): it may read what ``setup`` set and the message, and must not
modify the strategy; client-side state goes in ``client.state`` (the client store). The server side
(``broadcast``, ``fold``, ``aggregate``) may use :class:`ServerContext`: the server's resident model,
the tokenizer and task, the local-training settings and one trainer (:meth:`ServerContext.train`).

A worked example (FedProx in ~30 lines) is in ``docs/strategies.md``; a test runs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedtune.client.runtime import ClientContext, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Message
from fedtune.comm.codec import Codec
from fedtune.errors import ConfigError
from fedtune.models.lora import State, get_trainable_state, set_trainable_state
from fedtune.seeding import Purpose, derive_seed, generator
from fedtune.strategies.aggregate import RunningSum, client_weights
from fedtune.train.local import LossFn, TrainResult, train_local

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedtune.data.format import Tokenized
    from fedtune.data.schema import Splits
    from fedtune.data.tasks import TaskData

WEIGHTINGS = ("examples", "uniform")


@dataclass
class ServerContext:
    """What the server side of a strategy may use: set up once per process, before round 0.

    Attributes:
        model: the process's resident model (the one evaluated); a strategy that computes on the
            server (KD's distillation, split's server half) trains it, setting its trainable state first.
        tokenizer, task: the tokenizer and the tokenized task (train/eval splits, label ids).
        device: where ``model`` lives.
        local: the ``local.*`` settings (batch size, lr, weight decay, grad clip, max_seq_len ...):
            the server trains with the same optimizer settings as the clients.
        seed: the run's seed (derive streams with :class:`fedtune.seeding.Purpose`).
        synchronous: True when the schedule aggregates every round's replies together (``schedule=sync``);
            a strategy may then fold replies into a running aggregate as they arrive.
        down_codec: the downlink codec (``comm.down``), deterministic: the server runs it to know exactly
            what a client decodes (``comm.down_delta``, Fed-SB's frozen factors).
        down_delta: ``comm.down_delta``: send each client the change since the state it holds.
        lora_mode: ``lora.mode`` (lora | ffa | sb | alt).
        sb_init: ``lora.sb_init`` (svd | identity): how Fed-SB's switch factors A, B and R.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: TaskData
    device: torch.device
    local: LocalConfig
    seed: int
    synchronous: bool = True
    down_codec: Codec | None = None
    down_delta: bool = False
    lora_mode: str = "lora"
    sb_init: str = "svd"

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def train(self, state: State, loss_fn: LossFn, *, data: Tokenized, steps: int, round_idx: int,
              stream: Purpose = Purpose.SERVER) -> tuple[State, TrainResult]:
        """``steps`` AdamW steps (fresh optimizer, ``local.*`` settings) of ``loss_fn`` over ``data`` on the
        server's model, starting from ``state``; returns the trained state. Batch order and dropout draw
        from ``(seed, round_idx, stream)``: the same on every engine."""
        set_trainable_state(self.model, state)
        torch.manual_seed(derive_seed(self.seed, round_idx, stream))
        result, _ = train_local(
            self.model, data, list(range(len(data))), num_steps=steps, batch_size=self.local.batch_size,
            lr=self.local.lr, weight_decay=self.local.weight_decay, grad_clip=self.local.grad_clip,
            generator=generator(self.seed, round_idx, stream), pad_id=self.pad_id, device=self.device,
            loss_fn=loss_fn,
        )
        return get_trainable_state(self.model), result

    def optimizer(self, params: Sequence[torch.nn.Parameter], state: dict[str, Any] | None = None
                  ) -> torch.optim.Optimizer:
        """An AdamW over ``params`` with the ``local.*`` settings (its state restored from ``state``)."""
        opt = torch.optim.AdamW(params, lr=self.local.lr, weight_decay=self.local.weight_decay)
        if state is not None:
            opt.load_state_dict(state)
        return opt

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> None:
        """One optimizer step on ``loss``: zero grads, backward, clip (``local.grad_clip``), step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.local.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.local.grad_clip)
        optimizer.step()


class Strategy(ABC):
    """A federated method. Subclasses implement the three abstract hooks; the rest is optional.

    Class-level declarations (read by the runner before anything is built):
        full_parameters: trains every parameter; the model is built without LoRA (FedCyBGD).
        server_in_the_loop: the server computes during every local update (split learning), so
            updates run in the server process, one after another, whatever the engine.
        supports_async: may run under ``schedule=semi_sync|async``, i.e. ``aggregate`` accepts stale
            replies (``meta["staleness"]``, ``meta["staleness_weight"]``) and any subset of clients.
        lora_modes: the ``lora.mode`` values it supports (ffa and sb change which factors are trained
            and exchanged: :mod:`fedtune.models.lora`; sb needs the strategy to switch modes).
        supports_down_delta: honours ``comm.down_delta`` (:class:`fedtune.strategies.downlink.GlobalDownlink`).
    """

    full_parameters: ClassVar[bool] = False
    server_in_the_loop: ClassVar[bool] = False
    supports_async: ClassVar[bool] = False
    lora_modes: ClassVar[tuple[str, ...]] = ("lora",)
    supports_down_delta: ClassVar[bool] = False

    global_state: State
    num_clients: int
    server: ServerContext | None = None
    weighting: str = "examples"  # how aggregation_weights weighs replies: examples | uniform

    # ---- optional hooks
    def prepare_splits(self, splits: Splits, *, seed: int) -> Splits:
        """Before tokenizing and partitioning: reserve data (KD's public set). Default: unchanged."""
        return splits

    def setup(self, *, initial_state: State, num_clients: int, server: ServerContext | None = None) -> None:
        """Once before round 0, in every process that runs clients, with the model's initial trainable
        state. ``server`` is None only in unit tests of the aggregation maths."""
        self.global_state = initial_state
        self.num_clients = num_clients
        self.server = server

    def select(self, round_idx: int, sampled: list[int]) -> list[int]:
        """The round's clients, given the seeded sample. Default: the sample. A strategy that schedules
        its own clients (FedCyBGD: client r mod N) returns them here."""
        return sampled

    # ---- required hooks
    @abstractmethod
    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        """Server: the message each client downloads (an empty ``Message()`` sends nothing). A key may be
        a client id not in ``client_ids`` only with ``Message(pool=...)``: that update trains on the union
        of the pooled clients' shards with their summed step budget (the centralized baseline)."""

    @abstractmethod
    def local_update(self, client: ClientContext, message: Message) -> Message:
        """Client: train (``client.train()``) and return the reply (an empty ``Message()`` sends nothing)."""

    @abstractmethod
    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        """Server: update the global state from the replies the schedule released (may be empty of
        tensors if ``fold`` consumed them); returns extra metrics for the round (or ``{}``)."""

    # ---- optional hooks, continued
    def fold(self, round_idx: int, client_id: int, reply: Message) -> Message:
        """Server: each reply as it arrives (after the uplink; non-finite ones never get here), before
        the schedule holds it for ``aggregate``. A strategy that aggregates as a running sum consumes
        the tensors here and returns the reply without them, so the server holds one accumulator, not
        every client's update. Default: keep the reply whole."""
        return reply

    def eval_states(self, store: ClientStore) -> Mapping[str, State]:
        """Named trainable states to evaluate: ``global`` for federated strategies (default), one per
        client for the local baseline."""
        return {"global": self.global_state}

    def state_dict(self) -> dict[str, Any]:
        """Everything ``aggregate`` changed, for exact resume. Default: the global state."""
        return {"global_state": self.global_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]

    # ---- helpers for subclasses
    def aggregation_weights(self, replies: list[Message]) -> list[float]:
        """Per-reply coefficients: ``self.weighting`` (examples or uniform) normalised to sum 1, times each
        reply's ``staleness_weight`` (set by the schedule; 1 for fresh updates, so they still sum to 1 in
        sync rounds; FedBuff-style, stale updates count less in absolute terms)."""
        base = client_weights([m.meta["num_examples"] for m in replies], weighting=self.weighting)
        total = sum(base)
        return [w / total * float(m.meta.get("staleness_weight", 1.0)) for w, m in zip(base, replies)]


def check_schedule(strategy: Strategy, mode: str) -> None:
    """A strategy runs under ``schedule=semi_sync|async`` only if it declares ``supports_async``."""
    if mode != "sync" and not strategy.supports_async:
        raise ConfigError(f"schedule={mode}: strategy {type(strategy).__name__} aggregates synchronously only (every "
                          "dispatched client's fresh reply, every round); use schedule=sync, or a strategy that "
                          "supports it (fedavg, gradualdiff)")


def check_exchange(strategy: Strategy, *, lora_mode: str, down_delta: bool, schedule: str) -> None:
    """``lora.mode`` and ``comm.down_delta`` only with a strategy that declares them (Fed-SB: sync only)."""
    name = type(strategy).__name__
    if lora_mode not in strategy.lora_modes:
        raise ConfigError(f"lora.mode={lora_mode}: strategy {name} supports {' | '.join(strategy.lora_modes)} only "
                          "(ffa, sb and alt: strategy=fedavg or gradualdiff)")
    if down_delta and not strategy.supports_down_delta:
        raise ConfigError(f"comm.down_delta=true: strategy {name} does not broadcast the global state "
                          "(use strategy=fedavg or gradualdiff, or comm.down_delta=false)")
    if lora_mode == "sb" and schedule != "sync":
        raise ConfigError(f"lora.mode=sb: needs schedule=sync (a stale reply from before the switch to R "
                          f"would carry the old factors), not schedule={schedule}")
    if lora_mode == "alt" and schedule != "sync":
        raise ConfigError(f"lora.mode=alt: needs schedule=sync (a stale reply trained against another round's "
                          f"frozen factor is not exact), not schedule={schedule}")


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"strategy.weighting={weighting}: choose one of {', '.join(WEIGHTINGS)}")
    return weighting


def persistent_local_update(client: ClientContext, initial: State) -> Message:
    """Continue training the client's own state (no communication): the local/centralized baselines."""
    client.set_trainable(client.state.get("trainable", initial))
    client.train(keep_optimizer=True)
    client.state["trainable"] = client.get_trainable()
    return Message()


class StreamingMean:
    """Mixin for strategies whose sync aggregate is the weighted mean of the replies (FedAvg's states,
    GradualDiff's deltas): ``fold`` adds each reply to a running sum as it arrives and drops its
    tensors; ``folded_mean`` returns the mean at aggregation. Other schedules keep replies whole
    (stale updates are weighted when they are aggregated, not when they arrive)."""

    _running: RunningSum | None = None
    server: ServerContext | None
    weighting: str

    def fold(self, round_idx: int, client_id: int, reply: Message) -> Message:
        if self.server is not None and not self.server.synchronous:
            return reply
        if self._running is None:
            self._running = RunningSum()
        n = reply.meta["num_examples"]
        self._running.add(reply.tensors, client_weights([n], weighting=self.weighting)[0])
        return Message(tensors={}, meta={**reply.meta, "folded": True}, pool=reply.pool)

    def folded_mean(self, messages: dict[int, Message]) -> State | None:
        """The weighted mean of this round's folded replies (None when nothing was folded)."""
        folded = sum(bool(m.meta.get("folded")) for m in messages.values())
        if not folded:
            return None
        running, self._running = self._running, None
        assert running is not None and folded == len(messages) == running.count, (folded, len(messages))
        return running.mean()

