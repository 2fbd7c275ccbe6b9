"""Centralized baseline: the participating clients' shards pooled on one trainer, no communication.

Each round the trainer makes as many optimizer steps as the federated clients would in total
(``local.max_steps`` x clients, or ``local.epochs`` over the pooled data), keeping its AdamW state
across rounds. Nothing crosses the channel: 0 bytes each way.
"""

from __future__ import annotations

from fedtune.client.runtime import ClientContext
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Message
from fedtune.models.lora import State
from fedtune.strategies.base import Strategy, persistent_local_update

TRAINER_ID = -1  # the pooled trainer's id in the client store


class Centralized(Strategy):
    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return {TRAINER_ID: Message(pool=tuple(client_ids))}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        return persistent_local_update(client, self.global_state)

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        return {}

    def eval_states(self, store: ClientStore) -> dict[str, State]:
        return {"global": store.get(TRAINER_ID).get("trainable", self.global_state)}
