"""Objects between ranks over point-to-point gloo, with a watchdog: no process waits blindly.

An object is pickled (tensors moved to CPU first) and sent as a length, then the bytes. A blocking
gloo op cannot notice a dead peer or a deadline, and gloo's is_completed() only turns true inside
wait(): so each op runs on a daemon thread while the caller watches its peers (:func:`calls`).
"""

from __future__ import annotations

import datetime
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

POLL_S = 0.05  # how often a waiting process checks that its peers are alive
FOREVER = datetime.timedelta(days=7)  # gloo's own timeout; our deadlines are enforced by polling


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj



def send_obj(obj: Any, dst: int) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst)
    dist.send(data, dst)


def recv_obj(src: int) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src)
    return pickle.loads(data.numpy().tobytes())


def pumps(ranks: list[int], work: list[Any], *, until: Callable[[Any], bool], watch: Callable[[], None],
          deadline: float = float("inf")) -> Iterator[tuple[int, Any]]:
    """Hand ``work`` out in its order, one item at a time, to whichever rank is free: each rank has a daemon
    thread that takes the next item, sends it, receives the rank's one reply, then takes the next (so a
    rank asks for more as soon as it is done, without waiting for the caller). Yields ``(rank, reply)`` in
    arrival order, calling ``watch()`` while waiting. After a reply for which ``until(reply)`` is true (e.g.
    a failure report) no more items are handed out; replies to items already sent still arrive."""
    lock, items, stop = threading.Lock(), iter(work), threading.Event()

    def take() -> Any:
        with lock:
            return _END if stop.is_set() else next(items, _END)

    inbox: queue.Queue = queue.Queue()

    def target(rank: int) -> None:
        try:
            while (item := take()) is not _END:
                send_obj(item, rank)
                reply = recv_obj(rank)
                if until(reply):
                    stop.set()
                inbox.put((rank, reply, None))
        except Exception as err:  # e.g. gloo's "Connection closed by peer"
            inbox.put((rank, None, err))
        inbox.put((rank, _END, None))

    for rank in ranks:
        threading.Thread(target=target, args=(rank,), daemon=True).start()
    open_pumps = len(ranks)
    try:
        while open_pumps:
            rank, obj, err = _next(inbox, watch, deadline)
            if err is not None:
                _explain(rank, err, watch)
            if obj is _END:
                open_pumps -= 1
            else:
                yield rank, obj
    finally:  # the caller stopped early (an error, a failure report): hand out nothing more
        stop.set()


_END = object()  # a receiving thread's last put


def _next(inbox: queue.Queue, watch: Callable[[], None], deadline: float) -> tuple[int, Any, Exception | None]:
    while True:
        try:
            return inbox.get(timeout=POLL_S)
        except queue.Empty:
            watch()
            if time.monotonic() > deadline:
                raise TimeoutError from None


def _explain(key: int, err: Exception, watch: Callable[[], None]) -> None:
    for _ in range(20):  # a peer's exit code explains a broken connection better than gloo does
        time.sleep(POLL_S)
        watch()
    raise ConnectionError(f"lost the connection to rank {key}: {str(err).splitlines()[0]}") from err


def calls(calls: dict[int, Callable[[], Any]], *, watch: Callable[[], None],
           deadline: float = float("inf")) -> Iterator[tuple[int, Any]]:
    """Run each call on a daemon thread; yield ``(key, value)`` as they finish, calling ``watch()``
    (which raises when a peer is gone) while waiting. A call's exception is re-raised here."""
    inbox: queue.Queue = queue.Queue()

    def target(key: int, fn: Callable[[], Any]) -> None:
        try:
            inbox.put((key, fn(), None))
        except Exception as err:  # e.g. gloo's "Connection closed by peer"
            inbox.put((key, None, err))

    for key, fn in calls.items():
        threading.Thread(target=target, args=(key, fn), daemon=True).start()
    for _ in calls:
        key, value, err = _next(inbox, watch, deadline)
        if err is not None:
            _explain(key, err, watch)
        yield key, value
