"""When the server aggregates: synchronous, semi-synchronous and asynchronous (buffered) rounds.

The round loop dispatches clients, runs their updates and hands the replies here with their
simulated arrival times; the schedule says which replies the server aggregates now.

- ``sync``: every dispatched client; the round lasts until the slowest arrives.
- ``semi_sync``: the first ``min_clients`` arrivals of the round's cohort, or those before
  ``deadline_s``; the round ends when the ``min_clients``-th of them lands (or at the deadline, if any
  missed it). The late ones are dropped (``late=drop``) or carried (``late=carry``): a carried update
  keeps its simulated arrival time and is aggregated by the first later server step that ends at or
  after it, with staleness = server steps since it was dispatched (weighted like async). A client
  whose update is still in flight gets no new work until it lands.
- ``async`` (FedBuff-style): ``clients_per_round`` clients are always in flight; each server step
  aggregates the ``buffer_size`` earliest arrivals and idle clients are dispatched again with the
  current global state. Each update is weighted by ``(1 + staleness) ** -staleness_exponent``, where
  staleness = server steps since the client downloaded the state it trained from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.comm.channel import Message
from fedtune.errors import ConfigError
from fedtune.seeding import Purpose, derive_seed

MODES = ("sync", "semi_sync", "async")


def staleness_weight(staleness: int, exponent: float) -> float:
    """(1 + s)^-a: 1 for a fresh update, decaying with the server steps it missed."""
    return (1.0 + staleness) ** -exponent


@dataclass(order=True)
class Pending:
    arrival: float
    client_id: int
    version: int = field(compare=False)
    message: Message = field(compare=False)


@dataclass
class Schedule:
    """The aggregation schedule (config group ``schedule=sync|semi_sync|async``, conf/schedule/)."""

    mode: str = "sync"
    min_clients: int | None = None
    deadline_s: float | None = None
    late: str = "drop"
    buffer_size: int = 2
    staleness_exponent: float = 0.5
    now: float = 0.0
    version: int = 0
    pending: list[Pending] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"schedule.mode={self.mode}: choose one of {', '.join(MODES)} (schedule=sync|semi_sync|async)")
        if self.late not in ("drop", "carry"):
            raise ConfigError(f"schedule.late={self.late}: choose drop or carry")
        if self.mode == "semi_sync" and self.min_clients is None and self.deadline_s is None:
            raise ConfigError("schedule=semi_sync: set schedule.min_clients or schedule.deadline_s")
        if self.buffer_size < 1:
            raise ConfigError(f"schedule.buffer_size={self.buffer_size}: must be >= 1")

    def dispatch(self, *, seed: int, round_idx: int, num_clients: int, clients_per_round: int,
                 sampled: list[int]) -> list[int]:
        """Clients to start this round: the sampled cohort (semi_sync carry: less the clients still in
        flight), or (async) idle clients to refill the pool."""
        if self.mode == "sync" or (self.mode == "semi_sync" and self.late == "drop"):
            return sampled
        busy = {p.client_id for p in self.pending}
        if self.mode == "semi_sync":
            return [c for c in sampled if c not in busy]
        idle = [c for c in range(num_clients) if c not in busy]
        want = clients_per_round - len(busy)
        if want <= 0:
            return []
        rng = np.random.default_rng(derive_seed(seed, round_idx, Purpose.SAMPLE))
        return sorted(int(c) for c in rng.choice(idle, size=min(want, len(idle)), replace=False))

    def push(self, replies: dict[int, Message], durations: dict[int, float]) -> None:
        for cid, msg in replies.items():
            self.pending.append(Pending(self.now + durations[cid], cid, self.version, msg))

    def collect(self) -> tuple[dict[int, Message], dict[str, Any]]:
        """The replies to aggregate now, advancing the clock and version. Each reply's ``meta`` gains
        ``staleness`` (server steps since its client downloaded) and ``staleness_weight``
        ((1 + staleness)^-staleness_exponent, 1 when fresh), which strategies multiply into their weights."""
        self.pending.sort()
        start = self.now
        dropped = 0
        if self.mode == "sync":
            take, self.pending = self.pending, []
        elif self.mode == "async":
            take, self.pending = self.pending[: self.buffer_size], self.pending[self.buffer_size:]
        else:
            fresh = [p for p in self.pending if p.version == self.version]
            carried = [p for p in self.pending if p.version != self.version]  # late=carry only
            cut = len(fresh)
            if self.min_clients is not None:
                cut = min(cut, self.min_clients)
            if self.deadline_s is not None:
                cut = min(cut, sum(p.arrival <= start + self.deadline_s for p in fresh))
            on_time, late = fresh[:cut], fresh[cut:]
            # The round ends when its last on-time reply lands, or at the deadline if some missed it.
            end = max([start, *(p.arrival for p in on_time)])
            if self.deadline_s is not None and late:
                end = max(end, start + self.deadline_s)
            if not fresh and carried:  # nobody new (all sampled clients busy): wait for the next carried one
                end = max(start, carried[0].arrival if self.deadline_s is None
                          else min(carried[0].arrival, start + self.deadline_s))
            arrived = [p for p in carried if p.arrival <= end]
            in_flight = [p for p in carried if p.arrival > end]
            take = arrived + on_time
            self.now = end
            if self.late == "drop":
                dropped, self.pending = len(late), in_flight
            else:
                self.pending = sorted(in_flight + late)
        if self.mode != "semi_sync" and take:
            self.now = max(self.now, max(p.arrival for p in take))
        out = {}
        staleness = []
        for p in take:
            s = self.version - p.version
            staleness.append(s)
            weight = staleness_weight(s, self.staleness_exponent)  # 1 for a fresh update
            out[p.client_id] = Message(tensors=p.message.tensors, pool=p.message.pool,
                                       meta={**p.message.meta, "staleness": s, "staleness_weight": weight})
        self.version += 1
        stats = {"time/sim_round_s": self.now - start, "time/sim_clock_s": self.now,
                 "clients/aggregated": len(out), "clients/dropped_late": dropped}
        if self.mode != "sync":
            stats["comm/staleness_mean"] = float(np.mean(staleness)) if staleness else 0.0
        return out, stats

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, "version": self.version, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now, self.version, self.pending = state["now"], state["version"], state["pending"]
