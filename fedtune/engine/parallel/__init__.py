"""The parallel engine: worker processes, one per device, each with ONE resident base model.

Rank 0 runs the round loop (``run.py``) and keeps its own model for evaluation only. Ranks 1..N are
workers: on CPU each is forked from rank 0 once rank 0 has built its world (nothing imported or built
again; the base model's pages shared copy-on-write); on CUDA or under torchrun each builds the same
world from the config (every draw is seeded from the config; checked at start-up). Then they serve
rounds. The round's clients are a work queue: rank 0 sends each worker one client (its message and
client-store entry) and the next as soon as the worker returns the last one's result, updated store
entry and channel records of traffic *during* the update (split learning's activations). Rank 0 writes those into its
own store and channel, so bytes, aggregation and outputs happen where they do with ``sequential``;
only rank 0 writes files or talks to W&B.

Objects (tensors moved to CPU) are pickled over torch.distributed point-to-point on gloo. No
process waits blindly: a worker that raises stops the run with its own message, one that dies
stops it at once, one that hangs stops it after ``timeout_s``.

One node: ``fedtune engine=parallel engine.workers=2`` starts the workers itself (CPU: forked from
rank 0 after its world is built; CUDA: spawned, worker i on cuda:i-1), tcp on 127.0.0.1.

Several nodes: the same command on every node under torchrun,

    torchrun --nnodes=2 --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m fedtune engine=parallel ...

Rank 0 runs the CLI, Hydra, the loop, evaluation and every output; every other rank is a worker
(:func:`serve_torchrun_worker`) on the device of its LOCAL_RANK (so rank 0 keeps cuda:0 of its node
for evaluation). Every node needs the same code, data and model paths: each worker builds the
world itself, and a different partition or initial model stops the run at start-up. A ``-m`` sweep
reuses the same workers job after job.
"""

from fedtune.engine.parallel.engine import ParallelEngine
from fedtune.engine.parallel.process import under_torchrun
from fedtune.engine.parallel.worker import serve_spawned_worker, serve_torchrun_worker

__all__ = ["ParallelEngine", "serve_spawned_worker", "serve_torchrun_worker", "under_torchrun"]
