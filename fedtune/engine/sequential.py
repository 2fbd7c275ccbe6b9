"""The sequential engine: one device, the round's clients one after another."""

from __future__ import annotations

from omegaconf import DictConfig

from fedtune.comm.channel import Message
from fedtune.engine.client import ClientResult, ClientRuntime, Receive
from fedtune.strategies.base import Strategy


class SequentialEngine:
    """Runs each client's local update in turn on the runtime's resident model."""

    def __init__(self) -> None:
        self.runtime: ClientRuntime | None = None

    def start(self, runtime: ClientRuntime, cfg: DictConfig | None = None) -> None:
        self.runtime = runtime

    def run_round(self, strategy: Strategy, *, round_idx: int, messages: dict[int, Message],
                  receive: Receive | None = None) -> dict[int, ClientResult]:
        """Each client in turn; ``receive`` (the channel's download) runs just before its update, so
        only one client's decoded copy of the download is alive at a time."""
        assert self.runtime is not None, "start() first"
        return {
            cid: self.runtime.run(strategy, round_idx=round_idx, client_id=cid,
                                  message=receive(cid, msg) if receive is not None else msg)
            for cid, msg in messages.items()
        }

    def close(self) -> None:
        self.runtime = None
