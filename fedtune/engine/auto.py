"""``engine=auto`` (the default): choose the engine for the machine at hand and the run.

Measured on 2 CPU cores (docs/benchmarks.md, ``make bench-overhead``): for the small models fedtune runs
on CPU, one process per core with ONE torch thread each beats one process with all cores' threads
(PyTorch's intra-op threads scale poorly on small matmuls, and a multi-threaded process collapses when
another job shares the cores, while 1-thread processes degrade gracefully). So:

- CPU, at least 2 cores to use and at least 2 clients per round: the parallel engine with one
  1-thread worker per core (at most one per client and 8); rank 0 keeps every core's threads for
  evaluation, which runs while the workers wait.
- Otherwise (``threads=1``, one core, one client per round, a strategy whose server computes during
  every update, one CUDA device): the sequential engine.
- Several CUDA devices: the parallel engine, one worker per device. Under torchrun: the parallel engine.
"""

from __future__ import annotations

import logging

from fedtune.engine.parallel import ParallelEngine, under_torchrun
from fedtune.engine.parallel.engine import AUTO_CPU_CAP
from fedtune.engine.parallel.process import cores as available_cores
from fedtune.engine.sequential import SequentialEngine

log = logging.getLogger(__name__)


def auto_engine(*, num_clients: int, clients_per_round: int | None, device: str, threads: int | None,
                strategy: str | None = None) -> SequentialEngine | ParallelEngine:
    """The engine ``engine=auto`` picks (see the module docstring); logs the choice and why.

    ``strategy`` is the strategy's ``_target_``: its class says whether the server computes during
    every update (``server_in_the_loop``).
    """
    import torch
    from hydra.utils import get_class

    server_in_the_loop = bool(strategy and getattr(get_class(strategy), "server_in_the_loop", False))

    clients = clients_per_round or num_clients
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if under_torchrun():
        return ParallelEngine()
    if cuda:
        if torch.cuda.device_count() > 1 and clients > 1 and not server_in_the_loop:
            log.info("engine=auto: parallel, one worker per CUDA device (%d)", torch.cuda.device_count())
            return ParallelEngine()
        return SequentialEngine()
    cores = threads if threads is not None else available_cores()
    workers = min(cores, clients, AUTO_CPU_CAP)
    if workers < 2 or server_in_the_loop:
        why = ("the server computes during every update" if server_in_the_loop
               else f"{cores} core(s) to use, {clients} client(s) per round")
        log.info("engine=auto: sequential (%s)", why)
        return SequentialEngine()
    log.info("engine=auto: parallel, %d workers x 1 thread", workers)
    return ParallelEngine(workers=workers, threads=1)
