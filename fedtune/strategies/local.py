"""Local-only baseline: each client trains its own copy on its own shard, no communication.

Every client continues from its own state each round (AdamW state kept). Evaluation reports each
client's model on the global eval split and their mean. 0 bytes each way.
"""

from __future__ import annotations

from fedtune.comm.channel import Message
from fedtune.engine.client import ClientContext
from fedtune.engine.store import ClientStore
from fedtune.models.lora import State
from fedtune.strategies.base import Strategy, persistent_local_update


class Local(Strategy):
    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: Message() for cid in client_ids}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        return persistent_local_update(client, self.global_state)

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        return {}

    def eval_states(self, store: ClientStore) -> dict[str, State]:
        states = {f"client{cid}": store.get(cid)["trainable"] for cid in store.ids() if "trainable" in store.get(cid)}
        return states or {"global": self.global_state}
