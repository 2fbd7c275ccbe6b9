"""The sequential engine: one device, the round's clients one after another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from omegaconf import DictConfig

from fedtune.client.runtime import ClientResult, ClientRuntime, Updater
from fedtune.comm.channel import Message


class SequentialEngine:
    """Runs each client's local update in turn on the runtime's resident model."""

    def __init__(self) -> None:
        self.runtime: ClientRuntime | None = None

    def start(self, runtime: ClientRuntime, cfg: DictConfig | None = None, strategy: Updater | None = None) -> None:
        self.runtime = runtime

    def run_round(self, strategy: Updater, *, round_idx: int,
                  downloads: Iterable[tuple[int, Message]]) -> Iterator[tuple[int, ClientResult]]:
        """Each client in turn: take its download from ``downloads`` (a lazy stream: the channel decodes
        it just now), run its update, yield ``(client_id, result)``. The caller sends the reply up before
        asking for the next client, so one download and one update are alive at a time."""
        assert self.runtime is not None, "start() first"
        for cid, message in downloads:
            yield cid, self.runtime.run(strategy, round_idx=round_idx, client_id=cid, message=message)

    def close(self) -> None:
        self.runtime = None
