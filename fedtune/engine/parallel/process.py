"""Worker processes: start them (forked from rank 0 on CPU, spawned on CUDA), stop them, and torchrun's ranks."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.spawn
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from fedtune.engine.parallel.messages import Exit
from fedtune.engine.parallel.transport import send_obj


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def under_torchrun() -> bool:
    """True in a process that torchrun launched with more than one rank (cheap: reads the environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def spawn(target: Callable[[int, int, int], None], rank: int, world_size: int, port: int, *, cuda: bool
          ) -> multiprocessing.process.BaseProcess:
    """A worker process with rank 0's import path and working directory.

    On CPU, workers fork from rank 0 after it has built its world: they import nothing and build
    nothing, and share the resident model's pages copy-on-write (only what a worker writes, the
    trainable tensors and activations, becomes its own). CUDA workers are spawned fresh: a process
    that touched CUDA cannot be forked safely; they build their world from the config.
    """
    ctx = multiprocessing.get_context("spawn") if cuda else multiprocessing.get_context("fork")
    proc = ctx.Process(target=target, args=(rank, world_size, port), name=f"fedtune-worker-{rank}")
    with _without_main():
        proc.start()
    return proc


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Start processes without re-running the caller's ``__main__`` in them.

    multiprocessing re-imports the main script in every child so that pickled objects from it
    resolve; a worker's target and arguments are importable without it, and re-running a script
    that lacks the ``if __name__ == "__main__":`` guard would fail (or run it again).
    """
    original = multiprocessing.spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    multiprocessing.spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        multiprocessing.spawn.get_preparation_data = original


def reap(procs: dict[int, multiprocessing.process.BaseProcess], *, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.terminate()
    for proc in procs.values():
        proc.join(timeout=5)
        if proc.exitcode is None:
            proc.kill()
            proc.join()


def release_torchrun_workers() -> None:
    """At rank 0's exit under torchrun: the worker ranks wait for another job; tell them to exit."""
    if dist.is_initialized():
        for rank in range(1, dist.get_world_size()):
            send_obj(Exit(), rank)
        dist.destroy_process_group()
