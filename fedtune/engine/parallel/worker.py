"""The worker side: build the same world as rank 0 from its config, then run the clients it is sent."""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fedtune.client.store import ClientStore
from fedtune.engine.parallel.messages import (
    ClientDone,
    ClientJob,
    Exit,
    Failed,
    Hello,
    Ready,
    Stop,
)
from fedtune.engine.parallel.process import cores
from fedtune.engine.parallel.transport import FOREVER, calls, recv_obj, send_obj, to_cpu
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.client.runtime import ClientRuntime, Updater

log = logging.getLogger(__name__)

# Rank 0's runtime and strategy, set just before it forks its CPU workers: a forked worker inherits
# them (the resident model's pages are shared copy-on-write: nothing is imported or built again).
# None in spawned (CUDA) and torchrun workers, which build their own world from the config.
INHERITED: tuple[ClientRuntime, Updater] | None = None


def inherit(runtime: ClientRuntime, strategy: Updater | None) -> None:
    """What CPU workers forked from now on take as their world (None: they build their own)."""
    global INHERITED
    INHERITED = (runtime, strategy) if strategy is not None else None


def fingerprint(shards: dict[int, list[int]], model: torch.nn.Module) -> dict[str, Any]:
    """What must match across processes: the partition and the initial trainable weights."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "shards": hashlib.sha1(json.dumps(sorted(shards.items())).encode()).hexdigest(),
        "names": [(n, list(p.shape)) for n, p in params],
        "sums": [float(p.detach().double().sum()) for _, p in params],
    }


def same_world(a: dict[str, Any], b: dict[str, Any]) -> bool:
    close = all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a["sums"], b["sums"]))
    return a["shards"] == b["shards"] and a["names"] == b["names"] and close


def serve_spawned_worker(rank: int, world_size: int, port: int) -> None:
    """Body of a worker process that :class:`ParallelEngine` started on this node (forked on CPU, spawned
    on CUDA)."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=datetime.timedelta(seconds=600))
    store.set(f"fedtune/up/{rank}", "1")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=FOREVER)
    parent = os.getppid()

    def watch() -> None:  # rank 0 is gone: exit rather than wait forever
        if os.getppid() != parent:
            os._exit(3)

    _serve(rank, watch, threads=max(1, cores() // (world_size - 1)), local_rank=rank - 1)
    dist.destroy_process_group()


def serve_torchrun_worker() -> int:
    """Under torchrun, every rank but 0 calls this instead of the CLI: serve rank 0's jobs.

    Returns the exit code. Rank 0 is the process that runs the CLI (and Hydra) as usual.
    """
    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['RANK']}] %(levelname)s %(message)s")
    dist.init_process_group("gloo", init_method="env://", timeout=FOREVER)
    threads = max(1, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    while _serve(dist.get_rank(), lambda: None, threads=threads, local_rank=local_rank):
        gc.collect()  # a -m sweep: the last job's world is garbage; the next job's comes
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return 0


def _serve(rank: int, watch: Callable[[], None], *, threads: int, local_rank: int) -> bool:
    """One job: take the world (inherited, or built from rank 0's config), then serve rounds until told to stop.

    Returns True when rank 0 may send another job (sweeps under torchrun), False on :class:`Exit`.
    """
    def recv() -> Any:
        return next(calls({0: partial(recv_obj, 0)}, watch=watch))[1]

    def send(obj: Any) -> None:
        next(calls({0: partial(send_obj, obj, 0)}, watch=watch))

    hello = recv()
    if isinstance(hello, Exit):
        return False
    assert isinstance(hello, Hello), hello
    threads = hello.threads or threads
    torch.set_num_threads(threads)
    runtime = strategy = None
    try:
        runtime, strategy = _build(hello, local_rank)
        send(Ready(device=str(runtime.device), threads=threads, fingerprint=fingerprint(runtime.shards, runtime.model)))
    except Exception as err:
        send(_failed(err, f"worker {rank} failed to start"))
    while isinstance(msg := recv(), ClientJob):
        send(_run_job(runtime, strategy, rank, msg))  # rank 0 sends the next client once it has this one
    return isinstance(msg, Stop)


def _build(hello: Hello, local_rank: int) -> tuple[ClientRuntime, Updater]:
    if INHERITED is not None:  # forked from rank 0 after it built its world
        return INHERITED
    from fedtune.world import build_world, client_runtime, make_channel

    cfg = OmegaConf.create(hello.cfg)
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if hello.cuda else torch.device("cpu")
    world = build_world(cfg, device=device)
    return client_runtime(cfg, world, store=ClientStore(), channel=make_channel(cfg)), world.strategy


def _run_job(runtime: ClientRuntime | None, strategy: Updater | None, rank: int, job: ClientJob) -> ClientDone | Failed:
    """One client's update: its :class:`ClientDone`, or a :class:`Failed`."""
    try:
        assert runtime is not None and strategy is not None, "the worker did not start"
        runtime.store = ClientStore()  # rank 0's store is the truth; this one holds one client
        runtime.store.put(job.client_id, job.entry)
        before = len(runtime.channel.transfers)
        result = runtime.run(strategy, round_idx=job.round_idx, client_id=job.client_id, message=job.message)
        transfers = runtime.channel.transfers[before:]
        del runtime.channel.transfers[before:]
        assert result.message is not None
        result.message.tensors = to_cpu(result.message.tensors)
        return ClientDone(job.client_id, result, to_cpu(runtime.store.get(job.client_id)), transfers)
    except Exception as err:
        return _failed(err, f"worker {rank} failed on client {job.client_id} in round {job.round_idx}")


def _failed(err: Exception, where: str) -> Failed:
    if isinstance(err, ConfigError):  # a user error: its one line is the whole story
        return Failed(str(err), config_error=True)
    log.error("%s", where, exc_info=err)  # the traceback, on this worker's stderr
    return Failed(f"{where}: {type(err).__name__}: {err}", config_error=False)
