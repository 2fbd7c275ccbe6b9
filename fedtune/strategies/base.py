"""The strategy hooks.

A strategy owns WHAT is exchanged and HOW it is aggregated. It never owns the round loop, the
channel, the engine, logging or checkpoint files. Per round the runner calls::

    messages = strategy.broadcast(round_idx, client_ids)       # server side
    ... channel down ...
    reply = strategy.local_update(client, message)             # client side, per client
    ... channel up ...
    metrics = strategy.aggregate(round_idx, replies)           # server side

``local_update`` must not modify the strategy object (it may run in a worker process); client-side
state goes in ``client.state`` (the client store). ``eval_states`` says which trainable states the
runner evaluates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.comm.channel import Message
from fedtune.engine.schedule import Schedule
from fedtune.engine.store import ClientStore
from fedtune.errors import ConfigError
from fedtune.models.lora import State
from fedtune.strategies.aggregate import client_weights

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

    def aggregation_weights(self, replies: list[Message]) -> list[float]:
        """Per-reply coefficients: ``self.weighting`` (examples or uniform) normalised to sum 1, times
        each reply's staleness factor (1 for fresh updates, so they still sum to 1 in sync rounds;
        FedBuff-style, stale updates count less in absolute terms)."""
        base = client_weights([m.meta["num_examples"] for m in replies], weighting=self.weighting)
        total = sum(base)
        return [w / total * f for w, f in zip(base, self.schedule.weights(replies))]

    def eval_states(self, store: ClientStore) -> dict[str, State]:
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
