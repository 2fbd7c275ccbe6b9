"""The sequential engine: one device, the round's clients one after another."""

from __future__ import annotations

from omegaconf import DictConfig

from fedtune.comm.channel import Message
from fedtune.engine.client import ClientResult, ClientRuntime, Deliver, Receive
from fedtune.strategies.base import Strategy


class SequentialEngine:
    """Runs each client's local update in turn on the runtime's resident model."""

    def __init__(self) -> None:
        self.runtime: ClientRuntime | None = None

    def start(self, runtime: ClientRuntime, cfg: DictConfig | None = None) -> None:
        self.runtime = runtime

    def run_round(self, strategy: Strategy, *, round_idx: int, messages: dict[int, Message],
                  receive: Receive | None = None, deliver: Deliver | None = None) -> dict[int, ClientResult]:
        """Each client in turn; ``receive`` (the channel's download) runs just before its update and
        ``deliver`` (the uplink) just after it, so one client's download and one client's update are
        alive at a time, whatever the number of clients."""
        assert self.runtime is not None, "start() first"
        out = {}
        for cid, msg in messages.items():
            result = self.runtime.run(strategy, round_idx=round_idx, client_id=cid,
                                      message=receive(cid, msg) if receive is not None else msg)
            if deliver is not None:
                deliver(cid, result)
            out[cid] = result
        return out

    def close(self) -> None:
        self.runtime = None
