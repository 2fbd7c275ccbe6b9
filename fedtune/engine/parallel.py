"""The parallel engine: worker processes, one per device, each with ONE resident base model.

Rank 0 runs the round loop (``run.py``) and keeps its own model for evaluation only. Ranks 1..N are
workers: each builds the same world from the config once (every draw is seeded from the config;
checked at start-up), then serves rounds. Rank 0 sends each worker its share of the round's
clients (balanced by shard size) with their messages and client-store entries; the worker runs
them back to back and returns, per client, the result, the updated store entry and the channel
records of traffic *during* the update (split learning's activations). Rank 0 writes those into its
own store and channel, so bytes, aggregation and outputs happen where they do with ``sequential``;
only rank 0 writes files or talks to W&B.

Objects (tensors moved to CPU) are pickled over torch.distributed point-to-point on gloo. No
process waits blindly: a worker that raises stops the run with its own message, one that dies
stops it at once, one that hangs stops it after ``timeout_s``.

One node: ``fedtune engine=parallel engine.workers=2`` starts the workers itself (CPU: forked from
a forkserver that imported fedtune once; CUDA: spawned, worker i on cuda:i-1), tcp on 127.0.0.1.

Several nodes: the same command on every node under torchrun,

    torchrun --nnodes=2 --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m fedtune engine=parallel ...

Rank 0 runs the CLI, Hydra, the loop, evaluation and every output; every other rank is a worker
(:func:`serve_torchrun_worker`) on the device of its LOCAL_RANK (so rank 0 keeps cuda:0 of its node
for evaluation). Every node needs the same code, data and model paths: each worker builds the
world itself, and a different partition or initial model stops the run at start-up. A ``-m`` sweep
reuses the same workers job after job.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.spawn
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from fedtune.comm.channel import Message
from fedtune.engine.store import ClientStore
from fedtune.errors import ConfigError, WorkerError

if TYPE_CHECKING:  # (peft and transformers load with these: importing this module stays light)
    from fedtune.engine.client import ClientResult, ClientRuntime, Deliver, Receive
    from fedtune.strategies.base import Strategy

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a waiting process checks that its peers are alive
_AUTO_CPU_CAP = 8  # each CPU worker is a whole process (torch, transformers, a model copy)
_FOREVER = datetime.timedelta(days=7)  # gloo's own timeout; our deadlines are enforced by polling


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def under_torchrun() -> bool:
    """True in a process that torchrun launched with more than one rank (cheap: reads the environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def assign_clients(sizes: dict[int, int], num_workers: int) -> list[list[int]]:
    """Clients per worker: largest shard first onto the least-loaded worker (ties: lowest index).

    Each worker's list keeps the order of ``sizes`` (the round's order).
    """
    order = {cid: i for i, cid in enumerate(sizes)}
    loads, plan = [0] * num_workers, [[] for _ in range(num_workers)]
    for cid in sorted(sizes, key=lambda c: (-sizes[c], order[c])):
        w = min(range(num_workers), key=lambda i: (loads[i], i))
        loads[w] += sizes[cid]
        plan[w].append(cid)
    return [sorted(p, key=order.__getitem__) for p in plan]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---- Objects over point-to-point gloo. A blocking gloo op cannot notice a dead peer or a deadline,
# and gloo's is_completed() only turns true inside wait(): so each op runs on a daemon thread
# while the caller watches its peers.

def _send_obj(obj: Any, dst: int) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst)
    dist.send(data, dst)


def _recv_obj(src: int) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src)
    return pickle.loads(data.numpy().tobytes())


def _calls(calls: dict[int, Callable[[], Any]], *, watch: Callable[[], None],
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
                key, value, err = inbox.get(timeout=_POLL_S)
                break
            except queue.Empty:
                watch()
                if time.monotonic() > deadline:
                    raise TimeoutError from None
        if err is not None:
            for _ in range(20):  # a peer's exit code explains a broken connection better than gloo does
                time.sleep(_POLL_S)
                watch()
            raise ConnectionError(f"lost the connection to rank {key}: {str(err).splitlines()[0]}") from err
        yield key, value


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
        prestart()  # (if nobody did earlier) the workers' imports overlap rank 0's set-up from here on

    def start(self, runtime: ClientRuntime, cfg: DictConfig) -> None:
        """Start (or, under torchrun, join) the workers; returns once each has built its world."""
        from fedtune.config import to_container

        self.runtime = runtime
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
        hello = ("job", {"cfg": to_container(cfg), "threads": threads, "cuda": cuda})
        ready = self._exchange(dict.fromkeys(self.ranks, hello), self.ranks, "while starting")
        mine = _fingerprint(runtime.shards, runtime.model)
        for rank, (_, theirs) in ready.items():
            if not _same_world(mine, theirs):
                self._failed = True
                raise WorkerError(f"worker {rank} built a different world than rank 0 (partition or initial "
                                   "weights differ): does every process read the same data the same way?")
        log.info("parallel engine: %d workers: %s", num_workers,
                 ", ".join(f"{info['device']} x {info['threads']} threads" for _, info in ready.values()))

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
                dist.init_process_group(backend, init_method="env://", timeout=_FOREVER)
                atexit.register(_release_torchrun_workers)
            return world_size - 1
        if self.workers != "auto":
            num_workers = int(self.workers)
        elif cuda:
            num_workers = torch.cuda.device_count()
        else:
            num_workers = max(1, min(_cores(), cfg.clients_per_round or cfg.num_clients, _AUTO_CPU_CAP))
        store = dist.TCPStore("127.0.0.1", self.master_port, num_workers + 1, is_master=True,
                              wait_for_workers=False, timeout=_FOREVER)
        self._procs = {rank: _spawn(rank, num_workers + 1, store.port, cuda=cuda) for rank in range(1, num_workers + 1)}
        # Wait for every worker at the store while watching them: init_process_group would wait out
        # its whole timeout for a worker that died while importing.
        keys, deadline = [f"fedtune/up/{rank}" for rank in self._procs], self._deadline()
        while not store.check(keys):
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"the workers did not start within engine.timeout_s={self.timeout_s} s")
            time.sleep(0.01)
        dist.init_process_group(backend, store=store, rank=0, world_size=num_workers + 1, timeout=_FOREVER)
        return num_workers

    def run_round(self, strategy: Strategy, *, round_idx: int, messages: dict[int, Message],
                  receive: Receive | None = None, deliver: Deliver | None = None) -> dict[int, ClientResult]:
        """The round's clients on the workers; results in the order of ``messages``.

        ``receive(client_id, message)`` (the channel's download) is applied to every message first;
        ``deliver(client_id, result)`` (the uplink) to every result as the round's results come back.

        ``strategy`` is rank 0's; each worker runs its own, set up from the same config (so
        ``local_update`` may read only what ``setup`` set, and the message). A strategy whose
        server computes during every update (``server_in_the_loop``, split learning: one server
        model trained by the clients in turn) runs here on rank 0, one client after another.
        """
        assert self.runtime is not None, "start() first"
        if receive is not None:
            messages = {cid: receive(cid, msg) for cid, msg in messages.items()}
        if getattr(strategy, "server_in_the_loop", False):
            out = {}
            for cid, msg in messages.items():
                out[cid] = self.runtime.run(strategy, round_idx=round_idx, client_id=cid, message=msg)
                if deliver is not None:
                    deliver(cid, out[cid])
            return out
        store, shards = self.runtime.store, self.runtime.shards
        sizes = {cid: sum(len(shards[c]) for c in (msg.pool or (cid,))) for cid, msg in messages.items()}
        plan = {rank: cids for rank, cids in zip(self.ranks, assign_clients(sizes, len(self.ranks))) if cids}
        jobs = {rank: ("round", round_idx, [(cid, messages[cid], _to_cpu(store.get(cid))) for cid in cids])
                for rank, cids in plan.items()}
        replies = self._exchange(jobs, list(plan), f"in round {round_idx}")
        done = {cid: rest for _, items in replies.values() for cid, *rest in items}
        out = {}
        for cid in messages:
            result, entry, transfers = done[cid]
            live = store.get(cid)  # updated in place, as a sequential update mutates the live entry
            live.clear()
            live.update(entry)
            store.put(cid, live)
            self.runtime.channel.transfers.extend(transfers)
            if deliver is not None:
                deliver(cid, result)
            out[cid] = result
        return out

    def _exchange(self, sends: dict[int, Any], recv_from: list[int], when: str) -> dict[int, Any]:
        """Send each rank its object, then one reply from each of ``recv_from``.

        The first worker error, death or timeout raises and marks the engine failed (close() then
        stops the workers at once). A worker's ConfigError stays a ConfigError.
        """
        watch, deadline = partial(self._check_alive, when), self._deadline()
        try:
            for _ in _calls({r: partial(_send_obj, obj, r) for r, obj in sends.items()}, watch=watch,
                            deadline=deadline):
                pass
            replies, error = {}, None
            for rank, msg in _calls({r: partial(_recv_obj, r) for r in recv_from}, watch=watch, deadline=deadline):
                if msg[0] == "error":
                    error = error or (ConfigError(msg[1]) if msg[2] else WorkerError(msg[1]))
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
                for _ in _calls({r: partial(_send_obj, ("stop",), r) for r in self.ranks},
                                watch=self._check_alive, deadline=time.monotonic() + 30):
                    pass
        except Exception:  # a worker already gone: terminate the rest below
            self._failed = True
        finally:
            _reap(self._procs, grace_s=0.0 if self._failed else 30.0)
            if self._procs and dist.is_initialized():
                dist.destroy_process_group()
            if self._failed and under_torchrun() and dist.is_initialized():  # torchrun stops the other ranks
                atexit.unregister(_release_torchrun_workers)
                dist.destroy_process_group()
            self._procs, self.runtime, self.ranks = {}, None, []


def prestart() -> None:
    """Start the CPU workers' forkserver now: it imports fedtune in the background, once.

    Call it as early as possible in a process that will run ``engine=parallel`` on CPU (the CLI does,
    before its own imports) so the workers' start-up overlaps rank 0's. Idempotent; no-op on GPUs.
    """
    if not under_torchrun() and not torch.cuda.is_available():
        _forkserver()


def _server_in_the_loop(cfg: DictConfig) -> bool:
    from hydra.utils import get_class

    return bool(getattr(get_class(cfg.strategy._target_), "server_in_the_loop", False))


def _spawn(rank: int, world_size: int, port: int, *, cuda: bool) -> multiprocessing.process.BaseProcess:
    """A worker process with rank 0's import path and working directory.

    On CPU, workers fork from a forkserver that imported fedtune once, so N workers do not pay
    N parallel imports (seconds each). CUDA workers are spawned fresh: a process that touched
    CUDA (importing bitsandbytes may) cannot be forked safely.
    """
    ctx = multiprocessing.get_context("spawn") if cuda else _forkserver()
    proc = ctx.Process(target=serve_spawned_worker, args=(rank, world_size, port), name=f"fedtune-worker-{rank}")
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


def _forkserver() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started (it imports fedtune once, in the background)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedtune.world", "fedtune.engine.parallel"])
    multiprocessing.forkserver.ensure_running()
    return ctx


def _reap(procs: dict[int, multiprocessing.process.BaseProcess], *, grace_s: float) -> None:
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


def _release_torchrun_workers() -> None:
    """At rank 0's exit under torchrun: the worker ranks wait for another job; tell them to exit."""
    if dist.is_initialized():
        for rank in range(1, dist.get_world_size()):
            _send_obj(("exit", None), rank)
        dist.destroy_process_group()


# ---- the worker side ----

def _fingerprint(shards: dict[int, list[int]], model: torch.nn.Module) -> dict[str, Any]:
    """What must match across processes: the partition and the initial trainable weights."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "shards": hashlib.sha1(json.dumps(sorted(shards.items())).encode()).hexdigest(),
        "names": [(n, list(p.shape)) for n, p in params],
        "sums": [float(p.detach().double().sum()) for _, p in params],
    }


def _same_world(a: dict[str, Any], b: dict[str, Any]) -> bool:
    close = all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a["sums"], b["sums"]))
    return a["shards"] == b["shards"] and a["names"] == b["names"] and close


def serve_spawned_worker(rank: int, world_size: int, port: int) -> None:
    """Body of a worker process that :class:`ParallelEngine` started on this node."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=datetime.timedelta(seconds=600))
    store.set(f"fedtune/up/{rank}", "1")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=_FOREVER)
    parent = os.getppid()

    def watch() -> None:  # rank 0 (or the forkserver) is gone: exit rather than wait forever
        if os.getppid() != parent:
            os._exit(3)

    _serve(rank, watch, threads=max(1, _cores() // (world_size - 1)), local_rank=rank - 1)
    dist.destroy_process_group()


def serve_torchrun_worker() -> int:
    """Under torchrun, every rank but 0 calls this instead of the CLI: serve rank 0's jobs.

    Returns the exit code. Rank 0 is the process that runs the CLI (and Hydra) as usual.
    """
    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['RANK']}] %(levelname)s %(message)s")
    dist.init_process_group("gloo", init_method="env://", timeout=_FOREVER)
    threads = max(1, _cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    while _serve(dist.get_rank(), lambda: None, threads=threads, local_rank=local_rank):
        gc.collect()  # a -m sweep: the last job's world is garbage; the next job's comes
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return 0


def _serve(rank: int, watch: Callable[[], None], *, threads: int, local_rank: int) -> bool:
    """One job: build the world from rank 0's config, then serve rounds until told to stop.

    Returns True when rank 0 may send another job (sweeps under torchrun), False on ``exit``.
    """
    def recv() -> Any:
        return next(_calls({0: partial(_recv_obj, 0)}, watch=watch))[1]

    def send(obj: Any) -> None:
        next(_calls({0: partial(_send_obj, obj, 0)}, watch=watch))

    kind, hello = recv()
    if kind == "exit":
        return False
    threads = hello["threads"] or threads
    torch.set_num_threads(threads)
    runtime = strategy = None
    try:
        runtime, strategy = _build(hello, local_rank)
        send(("ready", {"device": str(runtime.device), "threads": threads,
                        **_fingerprint(runtime.shards, runtime.model)}))
    except Exception as err:
        send(_error(err, f"worker {rank} failed to start"))
    while (msg := recv())[0] == "round":
        send(_run_jobs(runtime, strategy, rank, round_idx=msg[1], jobs=msg[2]))
    return msg[0] == "stop"


def _build(hello: dict[str, Any], local_rank: int) -> tuple[ClientRuntime, Strategy]:
    from fedtune.world import build_world, client_runtime, make_channel

    cfg = OmegaConf.create(hello["cfg"])
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if hello["cuda"] else torch.device("cpu")
    world = build_world(cfg, device=device)
    return client_runtime(cfg, world, store=ClientStore(), channel=make_channel(cfg)), world.strategy


def _run_jobs(runtime: ClientRuntime | None, strategy: Strategy | None, rank: int, *, round_idx: int,
              jobs: list[tuple[int, Message, dict[str, Any]]]) -> tuple:
    """This worker's clients of the round, back to back: ``("results", [...])`` or ``("error", ...)``."""
    items = []
    for cid, message, entry in jobs:
        try:
            assert runtime is not None and strategy is not None, "the worker did not start"
            runtime.store = ClientStore()  # rank 0's store is the truth; this one holds one client
            runtime.store.put(cid, entry)
            before = len(runtime.channel.transfers)
            result = runtime.run(strategy, round_idx=round_idx, client_id=cid, message=message)
            transfers = runtime.channel.transfers[before:]
            del runtime.channel.transfers[before:]
            result.message.tensors = _to_cpu(result.message.tensors)
            items.append((cid, result, _to_cpu(runtime.store.get(cid)), transfers))
        except Exception as err:
            return _error(err, f"worker {rank} failed on client {cid} in round {round_idx}")
    return ("results", items)


def _error(err: Exception, where: str) -> tuple[str, str, bool]:
    if isinstance(err, ConfigError):  # a user error: its one line is the whole story
        return ("error", str(err), True)
    log.error("%s", where, exc_info=err)  # the traceback, on this worker's stderr
    return ("error", f"{where}: {type(err).__name__}: {err}", False)
