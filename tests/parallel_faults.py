"""A strategy that fails on purpose inside a worker (the parallel engine's failure tests).

Importable by the engine's worker processes: they get the test process's import path.
"""

from __future__ import annotations

import os
import signal
import time

from fedtune.errors import ConfigError
from fedtune.strategies.fedavg import FedAvg

HOW = ("raise", "config", "kill")


class FailingFedAvg(FedAvg):
    """FedAvg whose ``local_update`` for ``fail_client`` raises, raises a ConfigError, or kills its process."""

    def __init__(self, *, fail_client: int = 1, how: str = "raise", **fedavg) -> None:
        super().__init__(**fedavg)
        assert how in HOW, how
        self.fail_client, self.how = fail_client, how

    def local_update(self, client, message):
        if client.client_id == self.fail_client:
            if self.how == "raise":
                raise ValueError("injected failure")
            if self.how == "config":
                raise ConfigError("strategy.how=config: an injected one-line user error")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().local_update(client, message)


class GatedFedAvg(FedAvg):
    """FedAvg whose ``local_update`` for ``wait_client`` (in a worker) waits until rank 0 has folded
    another client's update of the round: only an engine that delivers each result as soon as it is
    done lets the round finish (one that waits for every worker first never opens the gate)."""

    def __init__(self, *, gate: str, wait_client: int = 1, wait_s: float = 20.0, **fedavg) -> None:
        super().__init__(**fedavg)
        self.gate, self.wait_client, self.wait_s = gate, wait_client, wait_s

    def local_update(self, client, message):
        if client.client_id == self.wait_client:
            deadline = time.monotonic() + self.wait_s
            while not os.path.exists(self.gate):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {client.client_id}: no other client was folded first")
                time.sleep(0.05)
        return super().local_update(client, message)

    def fold(self, round_idx, client_id, message):
        if client_id != self.wait_client:
            open(self.gate, "a").close()  # rank 0 folded this client while the other worker still runs
        return super().fold(round_idx, client_id, message)


class WaitingFedAvg(FedAvg):
    """FedAvg whose ``local_update`` (in a worker) of ``wait_client`` waits until the updates of the clients
    ``wait_for`` are done (each leaves a file ``done-<id>`` in ``marks``): only an engine that hands the next
    client to whichever worker is free lets the round finish."""

    def __init__(self, *, marks: str, wait_client: int, wait_for: list[int], wait_s: float = 20.0, **fedavg) -> None:
        super().__init__(**fedavg)
        self.marks, self.wait_client, self.wait_for, self.wait_s = marks, wait_client, list(wait_for), wait_s

    def local_update(self, client, message):
        if client.client_id == self.wait_client:
            deadline = time.monotonic() + self.wait_s
            while not all(os.path.exists(os.path.join(self.marks, f"done-{c}")) for c in self.wait_for):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {client.client_id}: clients {self.wait_for} were not all done")
                time.sleep(0.05)
        reply = super().local_update(client, message)
        open(os.path.join(self.marks, f"done-{client.client_id}"), "a").close()
        return reply
