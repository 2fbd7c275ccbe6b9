"""A fake client: no model, a fixed local update (adds ``step`` to every tensor)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedtune.train.local import TrainResult


@dataclass
class FakeClient:
    client_id: int
    step: float
    num_examples: int
    held: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    report: TrainResult | None = None

    def set_trainable(self, state):
        self.held = {k: v.clone() for k, v in state.items()}

    def get_trainable(self):
        return {k: v.clone() for k, v in self.held.items()}

    def train(self, **_):
        self.held = {k: v + self.step for k, v in self.held.items()}
        self.report = TrainResult(loss=1.0, num_examples=self.num_examples, num_steps=1, num_tokens=1, seconds=0.0)
        return self.report


def one_round(strategy, clients: dict[int, FakeClient], round_idx: int = 0, *, fold: bool = False):
    """broadcast -> local_update (-> fold, as the runner does with each arriving reply) -> aggregate,
    without a channel (pure strategy maths). Returns (metrics, replies as sent, before folding)."""
    messages = strategy.broadcast(round_idx, sorted(clients))
    replies = {cid: strategy.local_update(clients[cid], msg) for cid, msg in messages.items()}
    held = {cid: strategy.fold(round_idx, cid, m) for cid, m in replies.items()} if fold else replies
    return strategy.aggregate(round_idx, held), replies


class RecordingSink:
    """A logger (``logger._target_=fakes.RecordingSink``) that records every call, in order, in ``CALLS``."""

    CALLS: list[tuple] = []

    def __init__(self, **_) -> None:
        pass

    def log(self, metrics, step):
        self.CALLS.append(("log", step))

    def summary(self, values):
        self.CALLS.append(("summary",))

    def log_media(self, *, images, tables):
        self.CALLS.append(("media", dict(images), sorted(tables)))

    def close(self):
        self.CALLS.append(("close",))
