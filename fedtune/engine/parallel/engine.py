"""The parallel engine (rank 0's side): hand each worker its share of the round, collect the results."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from fedtune.comm.channel import Message
from fedtune.engine.parallel.messages import ClientDone, ClientJob, Failed, Hello, Ready, Stop
from fedtune.engine.parallel.process import (
    cores,
    reap,
    release_torchrun_workers,
    spawn,
    under_torchrun,
)
from fedtune.engine.parallel.transport import FOREVER, calls, pumps, recv_obj, send_obj, to_cpu
from fedtune.engine.parallel.worker import fingerprint, inherit, same_world, serve_spawned_worker
from fedtune.errors import ConfigError, WorkerError

if TYPE_CHECKING:  # (peft and transformers load with these: importing this module stays light)
    from fedtune.client.runtime import ClientResult, ClientRuntime, Updater

log = logging.getLogger(__name__)

AUTO_CPU_CAP = 8  # each CPU worker is a whole process (torch, transformers, a model copy)


class ParallelEngine:
    """N worker processes (one per device), each hosting clients on its one resident model.

    Args:
        workers: ``auto`` (one per visible CUDA device; on CPU min(cores, clients per round, 8))
            or a number. Under torchrun: the other ranks (world size - 1).
        threads: torch threads per worker; ``auto`` = cores // workers on the worker's node
            (workers x threads = cores).
        master_port: rank 0's TCP port on 127.0.0.1; 0 picks a free one. Ignored under torchrun.
        timeout_s: longest wait for the workers' replies (start-up, one round); None = no limit.
            Dead workers are detected at once either way; this catches hung ones.
    """

    def __init__(self, *, workers: str | int = "auto", threads: str | int = "auto",
                 master_port: int = 0, timeout_s: float | None = 3600.0) -> None:
        for key, value in (("workers", workers), ("threads", threads)):
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"engine.{key}={value}: must be auto or an integer >= 1")
        if not (isinstance(master_port, int) and 0 <= master_port < 65536):
            raise ConfigError(f"engine.master_port={master_port}: must be 0 (any free port) or a TCP port")
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"engine.timeout_s={timeout_s}: must be > 0 seconds (or null for no limit)")
        self.workers, self.threads = workers, threads
        self.master_port, self.timeout_s = master_port, timeout_s
        self.runtime: ClientRuntime | None = None
        self.ranks: list[int] = []
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._failed = False

    def start(self, runtime: ClientRuntime, cfg: DictConfig, strategy: Updater | None = None) -> None:
        """Start (or, under torchrun, join) the workers; returns once each has its world.

        CPU workers are forked from this process now, after its world is built: they inherit
        ``runtime`` and ``strategy`` (its client side). CUDA and torchrun workers build their own.
        """
        from fedtune.config import to_container

        self.runtime = runtime
        inherit(runtime, strategy)
        cuda = runtime.device.type == "cuda"
        if _server_in_the_loop(cfg) and not under_torchrun():  # (torchrun's ranks still join, then idle)
            log.warning("engine=parallel: strategy %s runs its clients in the server process (the server "
                        "computes during every update), one after another; no workers started", cfg.strategy._target_)
            return
        try:
            num_workers = self._init_group(cfg, cuda=cuda)
        except BaseException:
            self._failed = True
            raise
        if _server_in_the_loop(cfg):
            return
        self.ranks = list(range(1, num_workers + 1))
        threads = None if self.threads == "auto" else int(self.threads)  # None: each worker decides
        hello = Hello(cfg=to_container(cfg), threads=threads, cuda=cuda)
        ready: dict[int, Ready] = self._exchange(dict.fromkeys(self.ranks, hello), self.ranks, "while starting")
        mine = fingerprint(runtime.shards, runtime.model)
        for rank, info in ready.items():
            if not same_world(mine, info.fingerprint):
                self._failed = True
                raise WorkerError(f"worker {rank} built a different world than rank 0 (partition or initial "
                                   "weights differ): does every process read the same data the same way?")
        log.info("parallel engine: %d workers: %s", num_workers,
                 ", ".join(f"{info.device} x {info.threads} threads" for info in ready.values()))

    def _init_group(self, cfg: DictConfig, *, cuda: bool) -> int:
        """Join torchrun's group, or start N workers on this node; returns the number of workers."""
        backend = "gloo"  # every rank: what crosses is pickled CPU tensors, point to point (module docstring)
        if under_torchrun():
            world_size = int(os.environ["WORLD_SIZE"])
            assert os.environ["RANK"] == "0", "under torchrun, ranks > 0 must call serve_torchrun_worker()"
            if self.workers != "auto" and int(self.workers) != world_size - 1:
                raise ConfigError(f"engine.workers={self.workers}: under torchrun the workers are the other "
                                  f"{world_size - 1} ranks (use engine.workers=auto)")
            if not dist.is_initialized():  # one group per launch: a -m sweep reuses it job after job
                dist.init_process_group(backend, init_method="env://", timeout=FOREVER)
                atexit.register(release_torchrun_workers)
            return world_size - 1
        if self.workers != "auto":
            num_workers = int(self.workers)
        elif cuda:
            num_workers = torch.cuda.device_count()
        else:
            num_workers = max(1, min(cores(), cfg.clients_per_round or cfg.num_clients, AUTO_CPU_CAP))
        store = dist.TCPStore("127.0.0.1", self.master_port, num_workers + 1, is_master=True,
                              wait_for_workers=False, timeout=FOREVER)
        self._procs = {rank: spawn(serve_spawned_worker, rank, num_workers + 1, store.port, cuda=cuda)
                       for rank in range(1, num_workers + 1)}
        # Wait for every worker at the store while watching them: init_process_group would wait out
        # its whole timeout for a worker that died while importing.
        keys, deadline = [f"fedtune/up/{rank}" for rank in self._procs], self._deadline()
        while not store.check(keys):
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"the workers did not start within engine.timeout_s={self.timeout_s} s")
            time.sleep(0.01)
        dist.init_process_group(backend, store=store, rank=0, world_size=num_workers + 1, timeout=FOREVER)
        return num_workers

    def run_round(self, strategy: Updater, *, round_idx: int,
                  downloads: Iterable[tuple[int, Message]]) -> Iterator[tuple[int, ClientResult]]:
        """The round's clients on the workers; yields ``(client_id, result)`` in the order of ``downloads``.

        Every download is taken first. The clients form a work queue in the downloads' order: each
        worker is sent one client, and the next as soon as it reports the last one done (a worker that
        drew small shards or a fast client takes more: no up-front split to go wrong). A client is
        yielded as soon as it and every client before it in the downloads' order have been reported
        (so the caller's uplink and fold overlap the workers' remaining updates, in the same order as
        the sequential engine's), and its store entry and mid-update channel records are written into
        rank 0's as it is yielded. Which worker ran a client changes no number: each starts from the
        client's download and store entry, with its randomness drawn from (seed, round, client).

        ``strategy`` is rank 0's; each worker runs its own, set up from the same config (so
        ``local_update`` may read only what ``setup`` set, and the message). A strategy whose
        server computes during every update (``server_in_the_loop``, split learning: one server
        model trained by the clients in turn) runs here on rank 0, one client after another.
        """
        assert self.runtime is not None, "start() first"
        if getattr(strategy, "server_in_the_loop", False):
            for cid, message in downloads:
                yield cid, self.runtime.run(strategy, round_idx=round_idx, client_id=cid, message=message)
            return
        messages = dict(downloads)
        store = self.runtime.store
        work = [ClientJob(round_idx, cid, msg, to_cpu(store.get(cid))) for cid, msg in messages.items()]
        order, arrived = list(messages), {}
        for done in self._stream(work, f"in round {round_idx}"):
            arrived[done.client_id] = done
            while order and order[0] in arrived:  # in the order of the downloads, each as soon as it can be
                cid = order.pop(0)
                done = arrived.pop(cid)
                live = store.get(cid)  # updated in place, as a sequential update mutates the live entry
                live.clear()
                live.update(done.entry)
                store.put(cid, live)
                self.runtime.channel.transfers.extend(done.transfers)
                yield cid, done.result

    def _stream(self, work: list[ClientJob], when: str) -> Iterator[ClientDone]:
        """Hand the workers ``work`` one client at a time as they become free; yield each client's
        :class:`ClientDone` as its worker reports it; the first failure, death or timeout raises as
        :meth:`_exchange` does."""
        watch, deadline = partial(self._check_alive, when), self._deadline()
        try:
            error = None
            for _, msg in pumps(self.ranks, work, until=lambda m: isinstance(m, Failed), watch=watch,
                                deadline=deadline):
                if isinstance(msg, Failed):
                    error = error or (ConfigError(msg.text) if msg.config_error else WorkerError(msg.text))
                    if not under_torchrun():  # close() terminates the others; torchrun's ranks must finish
                        break
                elif error is None:
                    yield msg
            if error is not None:
                raise error
        except TimeoutError:
            self._failed = True
            raise WorkerError(f"no reply from the workers {when} within engine.timeout_s={self.timeout_s} s "
                               "(hung?)") from None
        except BaseException:
            self._failed = True
            raise

    def _exchange(self, sends: dict[int, Any], recv_from: list[int], when: str) -> dict[int, Any]:
        """Send each rank its object, then one reply from each of ``recv_from``.

        The first worker error, death or timeout raises and marks the engine failed (close() then
        stops the workers at once). A worker's ConfigError stays a ConfigError.
        """
        watch, deadline = partial(self._check_alive, when), self._deadline()
        try:
            for _ in calls({r: partial(send_obj, obj, r) for r, obj in sends.items()}, watch=watch, deadline=deadline):
                pass
            replies, error = {}, None
            for rank, msg in calls({r: partial(recv_obj, r) for r in recv_from}, watch=watch, deadline=deadline):
                if isinstance(msg, Failed):
                    error = error or (ConfigError(msg.text) if msg.config_error else WorkerError(msg.text))
                    if not under_torchrun():  # close() terminates the others; torchrun's ranks must finish
                        break
                replies[rank] = msg
            if error is not None:
                raise error
            return replies
        except TimeoutError:
            self._failed = True
            raise WorkerError(f"no reply from the workers {when} within engine.timeout_s={self.timeout_s} s "
                               "(hung?)") from None
        except BaseException:
            self._failed = True
            raise

    def _deadline(self) -> float:
        return time.monotonic() + (self.timeout_s or float("inf"))

    def _check_alive(self, when: str = "") -> None:
        for rank, proc in self._procs.items():
            if proc.exitcode is not None:
                raise WorkerError(f"worker {rank} exited with code {proc.exitcode} {when} without reporting "
                                   "an error (killed? out of memory?)")

    def close(self) -> None:
        """Stop the workers (at once after a failure) and end the group; safe to call twice."""
        try:
            if not self._failed and self.ranks and dist.is_initialized():
                for _ in calls({r: partial(send_obj, Stop(), r) for r in self.ranks},
                                watch=self._check_alive, deadline=time.monotonic() + 30):
                    pass
        except Exception:  # a worker already gone: terminate the rest below
            self._failed = True
        finally:
            reap(self._procs, grace_s=0.0 if self._failed else 30.0)
            if self._procs and dist.is_initialized():
                dist.destroy_process_group()
            if self._failed and under_torchrun() and dist.is_initialized():  # torchrun stops the other ranks
                atexit.unregister(release_torchrun_workers)
                dist.destroy_process_group()
            self._procs, self.runtime, self.ranks = {}, None, []


def _server_in_the_loop(cfg: DictConfig) -> bool:
    from hydra.utils import get_class

    return bool(getattr(get_class(cfg.strategy._target_), "server_in_the_loop", False))
