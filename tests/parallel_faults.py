"""A strategy that fails on purpose inside a worker (the parallel engine's failure tests).

Importable by the engine's worker processes: they get the test process's import path.
"""

from __future__ import annotations

import os
import signal

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
