"""The strategy hooks.

A strategy owns WHAT is exchanged and HOW it is aggregated. It never owns the round loop, the
channel, the engine, logging or checkpoint files. Per round the runner calls::

    messages = strategy.broadcast(round_idx, client_ids)       # server side
    ... channel down ...
    reply = strategy.local_update(client, message)             # client side, per client
    ... channel up ...
    reply = strategy.fold(round_idx, client_id, reply)         # server side, as each reply arrives
    metrics = strategy.aggregate(round_idx, replies)           # server side

``local_update`` must not modify the strategy object (it may run in a worker process); client-side
state goes in ``client.state`` (the client store). ``eval_states`` says which trainable states the
runner evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.comm.channel import Message
from fedtune.engine.schedule import Schedule
from fedtune.engine.store import ClientStore
from fedtune.errors import ConfigError
from fedtune.models.lora import State
from fedtune.strategies.aggregate import RunningSum, client_weights

if TYPE_CHECKING:
    from fedtune.data.schema import Splits
    from fedtune.engine.client import ClientContext
    from fedtune.world import World

WEIGHTINGS = ("examples", "uniform")


class Strategy:
    """Base class: keeps the global trainable state; subclasses implement the three hooks."""

    global_state: State
    world: World | None = None
    full_parameters = False  # True: trains full parameters, the model is built without LoRA
    # True: the server computes during every local update (split learning), so the updates run in the
    # server process (the parallel engine runs them there, one after another)
    server_in_the_loop = False

    def prepare_splits(self, splits: Splits, *, seed: int) -> Splits:
        """Before tokenizing and partitioning: a strategy may reserve data (KD's public set)."""
        return splits

    def setup(self, *, initial_state: State, num_clients: int, world: World | None = None) -> None:
        """Called once before round 0 (in every process that runs clients) with the model's initial
        trainable state and the world (model, tokenizer, task) for strategies that compute on the
        server or need more than the message during a local update."""
        self.global_state = initial_state
        self.num_clients = num_clients
        self.world = world
        if not hasattr(self, "schedule"):  # strategies without a `mode` setting aggregate synchronously
            self.schedule = Schedule()

    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        raise NotImplementedError

    def local_update(self, client: ClientContext, message: Message) -> Message:
        raise NotImplementedError

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        raise NotImplementedError

    def fold(self, round_idx: int, client_id: int, reply: Message) -> Message:
        """Each reply as it arrives on the server (after the uplink; non-finite ones never get here),
        before the schedule holds it for ``aggregate``. A strategy that aggregates as a running sum
        consumes the tensors here and returns the reply without them, so the server holds one
        accumulator, not every client's update. Default: keep the reply whole."""
        return reply

    def aggregation_weights(self, replies: list[Message]) -> list[float]:
        """Per-reply coefficients: ``self.weighting`` (examples or uniform) normalised to sum 1, times
        each reply's staleness factor (1 for fresh updates, so they still sum to 1 in sync rounds;
        FedBuff-style, stale updates count less in absolute terms)."""
        base = client_weights([m.meta["num_examples"] for m in replies], weighting=self.weighting)
        total = sum(base)
        return [w / total * f for w, f in zip(base, self.schedule.weights(replies))]

    def eval_states(self, store: ClientStore) -> Mapping[str, State]:
        """Named trainable states to evaluate; one called ``global`` for federated strategies."""
        return {"global": self.global_state}

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]


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

    def fold(self, round_idx: int, client_id: int, reply: Message) -> Message:
        if self.schedule.mode != "sync":
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
