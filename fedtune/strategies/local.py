"""Local-only baseline: each client trains its own copy on its own shard, no communication.

Every client continues from its own state each round (AdamW state kept). Evaluation reports each
client's model on the global eval split and their mean. 0 bytes each way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fedtune.client.runtime import ClientContext
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Message
from fedtune.models.lora import State
from fedtune.strategies.base import Strategy, persistent_local_update


class Local(Strategy):
    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: Message() for cid in client_ids}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        return persistent_local_update(client, self.global_state)

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        return {}

    def eval_states(self, store: ClientStore) -> Mapping[str, State]:
        states = ClientStates(store)
        return states if len(states) else {"global": self.global_state}


class ClientStates(Mapping):
    """``client<i>`` -> client i's trained state, read from the client store when asked: evaluating or
    saving 100 clients holds one of them at a time beyond the store's own budget (which spills to disk)."""

    def __init__(self, store: ClientStore) -> None:
        self.store = store
        self.ids = {f"client{cid}": cid for cid in store.ids()}  # every entry a local update wrote holds "trainable"

    def __getitem__(self, name: str) -> State:
        return self.store.get(self.ids[name])["trainable"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
