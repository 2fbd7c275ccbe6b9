"""What rank 0 and the workers send each other: one small dataclass per message (pickled).

rank 0 -> worker: :class:`Hello` (a job: build the world), then one :class:`ClientJob` at a time (the next
when the worker has reported the last), then :class:`Stop` (this job is over; under torchrun another may
follow) or :class:`Exit` (torchrun: no more jobs).
worker -> rank 0: :class:`Ready` after building, then per :class:`ClientJob` a :class:`ClientDone` or a
:class:`Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtune.client.runtime import ClientResult
from fedtune.comm.channel import Message, Transfer


@dataclass
class Hello:
    cfg: dict[str, Any]  # the resolved config: the worker builds the same world from it
    threads: int | None  # torch threads per worker; None: the worker's share of its node's cores
    cuda: bool


@dataclass
class Ready:
    device: str
    threads: int
    fingerprint: dict[str, Any]  # partition and initial weights: must match rank 0's


@dataclass
class ClientJob:
    round_idx: int
    client_id: int
    message: Message  # the client's download, as decoded by rank 0's channel
    entry: dict[str, Any]  # the client's store entry (rank 0's store is the truth)


@dataclass
class ClientDone:
    client_id: int
    result: ClientResult
    entry: dict[str, Any]  # the client's store entry after its update
    transfers: list[Transfer] = field(default_factory=list)  # channel records during the update


@dataclass
class Failed:
    text: str  # one line (a ConfigError's message, or where and what)
    config_error: bool  # True: a user error; rank 0 raises ConfigError (exit 2), else WorkerError


@dataclass
class Stop:
    pass


@dataclass
class Exit:
    pass
