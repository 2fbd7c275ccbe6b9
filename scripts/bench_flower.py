# ruff: noqa: T201  (a command-line benchmark)
"""The issue-15 workload as a Flower simulation (Ray actors), to set beside fedtune's parallel engine.

    /work/flwr-venv/bin/python scripts/bench_flower.py --clients 10
    /work/flwr-venv/bin/python scripts/bench_flower.py --clients 3 --rounds 2 -- lora.r=16   # overrides after --

Flower is optional and never a dependency of fedtune: it lives in its own virtual environment that sees
the project's environment (torch, transformers, peft, fedtune) through a ``.pth`` file, so torch is not
installed twice::

    python3.11 -m venv /work/flwr-venv          # the interpreter .venv was made from (.venv/bin/python -V)
    echo 'import site; site.addsitedir("/work/main/.venv/lib/python3.11/site-packages")' \\
        > /work/flwr-venv/lib/python3.11/site-packages/_main_venv.pth
    echo 'torch==2.13.0' > /tmp/torch-pin.txt   # pip must not bring its own torch
    /work/flwr-venv/bin/pip install -c /tmp/torch-pin.txt "flwr[simulation]"
    /work/flwr-venv/bin/python -c "import flwr, ray, torch, fedtune"

(``site.addsitedir`` rather than a bare path line, so the project's own ``.pth`` files, fedtune's
editable install among them, are processed too.) Written against flwr 1.42 (Message API:
``flwr.serverapp.strategy.FedAvg``, ``ClientApp``/``ServerApp`` run by ``flwr.simulation.run_simulation``,
which logs a deprecation warning in favour of the ``flwr run`` CLI but runs).

The work is bench_overhead.py's (``WORKLOAD``, ``overrides_for``): the same model and data (fedtune's
``build_world``: same seeds, same shards), and each client trains, every round, on the very batches
fedtune's client draws that round (``batch_order`` with fedtune's TRAIN generator for (seed, round,
client), collated by ``collate`` inside the loop as fedtune does; the global RNG seeded per (seed, round,
client) for LoRA dropout, as fedtune's client runtime does), with a fresh AdamW per round
(``local.lr``, ``local.weight_decay``), gradient clipping at ``local.grad_clip``. Flower side: N
SuperNodes (partition id = fedtune client id), FedAvg over all of them every round (weights = shard sizes,
as fedtune's ``weighting=examples``), no evaluation, Ray backend with ``--actors`` actors (default 2) of
``num_cpus=1``, ``torch.set_num_threads(1)`` in the client; the LoRA trainable tensors travel as numpy
arrays. Each actor builds the world once and keeps it (fedtune's workers keep a resident model too).

Prints one JSON line: ``rounds`` (server-side seconds from the start of ``configure_train`` to the end of
``aggregate_train``, per round), ``process_s`` (this process from its first line to the end of the
simulation: imports, world, Ray start, actors, rounds; interpreter start-up not included), and per round
the optimizer steps, tokens and example-weighted train loss (fedtune's ``train/steps``, ``train/tokens``,
``train/loss``), and ``configure_s``: the part of each round spent in ``configure_train`` (sampling; in
round 1 also any wait for the simulated SuperNodes to register). Round 1 also pays the actors' start-up
(Ray workers importing torch/transformers/peft/fedtune and building the world): a one-time cost, like
fedtune's round 1; compare steady rounds, 2..N. Reply order (hence float32 summation order in Flower's
FedAvg) follows arrival, so losses from round 2 on may differ from fedtune's in the 8th digit.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                     "RAY_DEDUP_LOGS": "0"}.items():
    os.environ.setdefault(_key, _value)

FLWR_MISSING = (
    "bench_flower.py: flwr is not importable here. Flower lives in its own venv that sees this project's: "
    "python3.11 -m venv /work/flwr-venv; put a .pth with "
    "'import site; site.addsitedir(\"<.venv site-packages>\")' in its site-packages; "
    "/work/flwr-venv/bin/pip install -c <file with torch==2.13.0> \"flwr[simulation]\"; "
    "then run /work/flwr-venv/bin/python scripts/bench_flower.py (details at the top of this file)."
)

# ---------------------------------------------------------------------------------------------------------
# Client side (runs inside the Ray actors; this module is imported there by name, so the cache below
# lives once per actor process).

_WORLDS: dict[str, object] = {}


def _world(overrides_json: str):  # noqa: ANN202
    if overrides_json not in _WORLDS:
        import torch

        from fedtune.config import compose_config
        from fedtune.world import build_world, resolve_device

        torch.set_num_threads(1)
        cfg = compose_config(json.loads(overrides_json))
        _WORLDS[overrides_json] = (cfg, build_world(cfg, device=resolve_device(str(cfg.device))))
    return _WORLDS[overrides_json]


def client_train(msg, context):  # noqa: ANN001, ANN201
    """One client's local update: fedtune's batches for (round, client), fresh AdamW, clip, step."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedtune.data.format import collate
    from fedtune.models.lora import get_trainable_state, set_trainable_state
    from fedtune.seeding import Purpose, derive_seed, generator
    from fedtune.train.local import batch_order, plan_steps

    torch.set_num_threads(1)
    config = msg.content["config"]
    cfg, world = _world(str(config["overrides"]))
    cid = int(context.node_config["partition-id"])
    round_idx = int(config["server-round"]) - 1  # fedtune counts rounds from 0
    torch.manual_seed(derive_seed(cfg.seed, round_idx, cid, Purpose.TRAIN))  # LoRA dropout: as fedtune's client
    model, data, pad = world.model, world.task.train, world.tokenizer.pad_token_id
    indices = world.shards[cid]
    names = list(get_trainable_state(model))
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    set_trainable_state(model, {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)})

    local = cfg.local
    steps = plan_steps(len(indices), batch_size=local.batch_size, epochs=local.epochs, max_steps=local.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=local.lr, weight_decay=local.weight_decay)
    model.train()
    gen = generator(cfg.seed, round_idx, cid, Purpose.TRAIN)
    loss_sum, tokens, done = 0.0, 0, 0
    for idx in batch_order(indices, batch_size=local.batch_size, num_steps=steps, generator=gen):
        batch = collate(data, idx, pad_id=pad)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if local.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, local.grad_clip)
        optimizer.step()
        loss_sum += loss.detach().item()
        tokens += int(batch["attention_mask"].sum())
        done += 1
    state = get_trainable_state(model)
    reply = RecordDict({
        "arrays": ArrayRecord([state[n].numpy() for n in names]),
        "metrics": MetricRecord({"num-examples": len(indices), "train_loss": loss_sum / max(done, 1),
                                 "steps": done, "tokens": tokens}),
    })
    return Message(content=reply, reply_to=msg)


def make_client_app():  # noqa: ANN201
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


# ---------------------------------------------------------------------------------------------------------
# Server side (the driver process).


def simulate(overrides: list[str], *, actors: int) -> dict:
    import flwr
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedtune.config import compose_config
    from fedtune.models.lora import get_trainable_state
    from fedtune.world import build_world, resolve_device

    cfg = compose_config(overrides)
    num_clients = int(cfg.num_clients)
    assert cfg.clients_per_round in (None, num_clients), "Flower's FedAvg here takes every client every round"
    torch.set_num_threads(1)
    world = build_world(cfg, device=resolve_device(str(cfg.device)))  # the server's model: initial state
    initial = ArrayRecord([t.numpy() for t in get_trainable_state(world.model).values()])
    del world
    marks: dict[str, list[float]] = {"start": [], "sent": [], "end": []}
    stats: dict[str, list[float]] = {"steps": [], "tokens": [], "loss": []}

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN202
            marks["start"].append(time.perf_counter())
            messages = list(super().configure_train(server_round, arrays, config, grid))
            marks["sent"].append(time.perf_counter())
            return messages

        def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN202
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            marks["end"].append(time.perf_counter())
            metrics = [m.content["metrics"] for m in replies if not m.has_error()]
            if len(metrics) != num_clients:
                errors = [m.error.reason for m in replies if m.has_error()]
                raise RuntimeError(f"round {server_round}: {len(metrics)}/{num_clients} replies; {errors[:2]}")
            weight = sum(m["num-examples"] for m in metrics)
            stats["steps"].append(sum(m["steps"] for m in metrics))
            stats["tokens"].append(sum(m["tokens"] for m in metrics))
            stats["loss"].append(sum(m["train_loss"] * m["num-examples"] for m in metrics) / weight)
            return out

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # noqa: ANN001
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                               min_available_nodes=num_clients)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg.num_rounds),
                       train_config=ConfigRecord({"overrides": json.dumps(overrides)}))

    import bench_flower  # by name, so the actors import it (and keep their world cache) instead of unpickling __main__

    run_simulation(
        server_app=server_app, client_app=bench_flower.make_client_app(), num_supernodes=num_clients,
        backend_name="ray",
        backend_config={"init_args": {"num_cpus": actors, "num_gpus": 0},
                        "client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if len(marks["end"]) != int(cfg.num_rounds):
        raise SystemExit(f"bench_flower.py: {len(marks['end'])} of {cfg.num_rounds} rounds completed (see log)")
    return {"rounds": [e - s for s, e in zip(marks["start"], marks["end"])],
            "process_s": time.perf_counter() - PROCESS_START, **stats,
            "configure_s": [c - s for s, c in zip(marks["start"], marks["sent"])],
            "clients": num_clients, "actors": actors, "flwr": flwr.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="default: the workload's num_rounds (5)")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors of num_cpus=1 (fedtune: engine.workers)")
    parser.add_argument("extra", nargs="*", help="more overrides (after --)")
    args = parser.parse_args()
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit(FLWR_MISSING) from None
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_overhead, and bench_flower by name
    sys.path.insert(0, str(ROOT))
    from bench_overhead import overrides_for

    extra = [*args.extra, *([f"num_rounds={args.rounds}"] if args.rounds else [])]
    # fedtune's world for these overrides; engine/threads settings are fedtune's own, not the world's
    overrides = [o for o in overrides_for(args.clients, "parallel", extra)
                 if not o.startswith(("engine", "threads="))]
    print(json.dumps(simulate(overrides, actors=args.actors)), flush=True)


if __name__ == "__main__":
    main()
