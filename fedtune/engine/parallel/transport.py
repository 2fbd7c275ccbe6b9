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
        while True:
            try:
                key, value, err = inbox.get(timeout=POLL_S)
                break
            except queue.Empty:
                watch()
                if time.monotonic() > deadline:
                    raise TimeoutError from None
        if err is not None:
            for _ in range(20):  # a peer's exit code explains a broken connection better than gloo does
                time.sleep(POLL_S)
                watch()
            raise ConnectionError(f"lost the connection to rank {key}: {str(err).splitlines()[0]}") from err
        yield key, value
