"""The parallel engine's work queue (``transport.pumps``) with fake peers in place of gloo."""

import threading
import time

import pytest

from fedtune.engine.parallel import transport


class FakePeers:
    """Ranks that answer each item with ``("done", item)`` after ``delay[rank]`` seconds (``("failed",
    item)`` for the items in ``fail``); records which rank got which item, in order."""

    def __init__(self, delay, fail=()):
        self.delay, self.fail = delay, set(fail)
        self.sent: list[tuple[int, int]] = []
        self.pending: dict[int, int] = {}
        self.lock = threading.Lock()

    def send(self, item, rank):
        with self.lock:
            self.sent.append((rank, item))
        self.pending[rank] = item

    def recv(self, rank):
        item = self.pending.pop(rank)
        time.sleep(self.delay[rank])
        return ("failed" if item in self.fail else "done", item)


@pytest.fixture
def peers(monkeypatch):
    def make(delay, fail=()):
        fake = FakePeers(delay, fail)
        monkeypatch.setattr(transport, "send_obj", fake.send)
        monkeypatch.setattr(transport, "recv_obj", fake.recv)
        return fake
    return make


def _run(ranks, work):
    return list(transport.pumps(ranks, work, until=lambda reply: reply[0] == "failed", watch=lambda: None))


def test_a_free_rank_takes_the_next_item_in_order(peers):
    fake = peers({1: 0.3, 2: 0.01})  # rank 1 is slow: rank 2 takes every item after the first
    replies = _run([1, 2], list(range(6)))
    assert sorted(item for _, (_, item) in replies) == list(range(6))  # each item once
    assert [item for _, item in fake.sent] == list(range(6))  # handed out in the work's order
    assert [item for rank, item in fake.sent if rank == 1] == [0]
    assert [item for rank, item in fake.sent if rank == 2] == [1, 2, 3, 4, 5]
    assert replies[-1] == (1, ("done", 0))  # replies come in arrival order: the slow one last


def test_nothing_is_handed_out_after_a_failure(peers):
    fake = peers({1: 0.01}, fail={2})
    replies = _run([1], list(range(6)))
    assert [item for _, item in fake.sent] == [0, 1, 2]  # the failure's reply came back: no item 3
    assert replies[-1] == (1, ("failed", 2))


def test_no_work_and_more_ranks_than_items(peers):
    assert _run([1, 2], []) == []
    fake = peers({1: 0.01, 2: 0.01, 3: 0.01})
    assert sorted(item for _, (_, item) in _run([1, 2, 3], [7])) == [7]
    assert len(fake.sent) == 1


def test_a_caller_that_stops_early_stops_the_handing_out(peers):
    fake = peers({1: 0.05})
    replies = transport.pumps([1], list(range(20)), until=lambda reply: False, watch=lambda: None)
    assert next(replies) == (1, ("done", 0))
    replies.close()  # e.g. the round loop raised while folding
    time.sleep(0.3)
    assert len(fake.sent) <= 2  # at most the item taken before the stop
