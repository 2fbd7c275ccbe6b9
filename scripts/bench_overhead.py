# ruff: noqa: T201  (a command-line benchmark)
"""fedtune's round loop vs a plain PyTorch loop training the same steps on the same batches.

    python scripts/bench_overhead.py                               # 3, 10, 30, 100 clients; both engines
    python scripts/bench_overhead.py --clients 30 --engines sequential --repeats 3
    python scripts/bench_overhead.py --clients 10 -- lora.r=16     # extra overrides after --

Each configuration runs as separate processes, interleaved repeat by repeat (fedtune, plain, fedtune,
plain ...), so both see the same machine state:

- fedtune: ``python -m fedtune <overrides>``; per-round wall time is ``time/round_s - time/eval_s``
  from its metrics.jsonl (sampling, broadcast, channel both ways, adapter swaps, training, aggregation,
  logging), and the whole process's wall time is measured from outside.
- plain: ``python scripts/bench_overhead.py --plain <overrides>`` builds the same model and data
  (fedtune's world: same seeds, same shards), collates the very batches fedtune's clients draw (untimed),
  then trains them with ONE AdamW, forward/backward/clip/step and nothing else, timing each round.
  Under ``engine=parallel`` the plain loop is one process using every core (``threads`` = cores).

Reported per configuration: the steady round (median of rounds 2..N; round 1 pays one-time costs) of
fedtune / plain, and whole-process wall time fedtune / plain; each the median over repeats.

``--paired`` (sequential engine): this machine's speed drifts by +-20% over seconds (a 512x512 matmul
loop timed every ~0.4 s: 0.343-0.488 s), more than the gap measured, and separate processes run ~45 s
apart. Paired runs put both loops in ONE process, round by round: fedtune runs in-process and, after each
of its rounds is logged, the plain loop (its own model, built from the same world, and its own AdamW)
trains the same round's batches. Round r's ratio is fedtune's rounds r and r+1 (on either side of the
plain round r) over plain round r; reported: the median over steady rounds, then over repeats.
The workload (issue 15): tiny Llama hidden 64 / 2 layers, LoRA r=8 on q_proj,v_proj only, batch 8,
10 local steps per client, 5 rounds, FedAvg, no evaluation during rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = [
    "logger=none", "strategy=fedavg", "model.builder.hidden_size=64", "model.builder.num_layers=2",
    "model.builder.num_heads=2", "model.builder.intermediate_size=128", "lora.target_modules=[q_proj,v_proj]",
    "lora.modules_to_save=[]", "local.batch_size=8", "local.max_steps=10", "num_rounds=5", "eval.every=0",
    "eval.bleu_samples=0", "eval.max_samples=8", "checkpoint.every=0",
]


def overrides_for(clients: int, engine: str, extra: list[str]) -> list[str]:
    cores = len(os.sched_getaffinity(0))
    engine_args = (["engine=parallel", f"engine.workers={cores}", "engine.threads=1"] if engine == "parallel"
                   else [f"engine={engine}"])
    return [*WORKLOAD, f"num_clients={clients}", f"data.source.num_train={max(600, 40 * clients)}",
            f"threads={cores}", *engine_args, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT)}


def fedtune_process(overrides: list[str]) -> tuple[list[float], float]:
    out = Path(tempfile.mkdtemp(prefix="bench-overhead-")) / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtune", *overrides, f"output_dir={out}"], env=_env(), check=True,
                   capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/round_s"] - r["time/eval_s"] for r in rows], wall


def plain_process(overrides: list[str]) -> tuple[list[float], float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--plain", "--", *overrides], env=_env(), check=True,
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    return json.loads(proc.stdout.strip().splitlines()[-1])["rounds"], wall


def plain(overrides: list[str]) -> None:
    """The plain loop (child process): same world, same batches, one AdamW; prints per-round seconds."""
    import torch

    from fedtune.config import compose_config

    cfg = compose_config([o for o in overrides if not o.startswith("engine")])
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    train_round = plain_rounds(cfg)
    print(json.dumps({"rounds": [train_round(r) for r in range(cfg.num_rounds)]}))


def plain_rounds(cfg):  # noqa: ANN001, ANN201  (a DictConfig -> a function of the round)
    """The plain loop's world and batches (built and collated now, untimed); returns ``train(round_idx)``,
    which trains that round's batches with one AdamW and returns its wall seconds."""
    import torch

    from fedtune.data.format import collate
    from fedtune.seeding import Purpose, generator, sample_clients
    from fedtune.train.local import batch_order, plan_steps
    from fedtune.world import build_world, resolve_device

    world = build_world(cfg, device=resolve_device(str(cfg.device)))
    model, data, shards, pad = world.model, world.task.train, world.shards, world.tokenizer.pad_token_id
    rounds = []
    for round_idx in range(cfg.num_rounds):  # the same batches fedtune's clients draw
        ids = sample_clients(seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients,
                             clients_per_round=cfg.clients_per_round or cfg.num_clients)
        batches = []
        for cid in ids:
            steps = plan_steps(len(shards[cid]), batch_size=cfg.local.batch_size, epochs=cfg.local.epochs,
                               max_steps=cfg.local.max_steps)
            gen = generator(cfg.seed, round_idx, cid, Purpose.TRAIN)
            batches += [collate(data, b, pad_id=pad) for b in
                        batch_order(shards[cid], batch_size=cfg.local.batch_size, num_steps=steps, generator=gen)]
        rounds.append(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)  # as the clients

    def train(round_idx: int) -> float:
        model.train()
        start = time.perf_counter()
        for batch in rounds[round_idx]:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.local.grad_clip)
            optimizer.step()
            loss.item()
        return time.perf_counter() - start

    return train


def paired(overrides: list[str]) -> None:
    """Both loops in this process (child): fedtune's run, and after each round it logs, the plain loop's
    same round; prints both lists of per-round seconds."""
    import torch

    from fedtune.config import compose_config
    from fedtune.run import run
    from fedtune.sinks import Sinks

    cfg = compose_config(overrides)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    train_round = plain_rounds(compose_config([o for o in overrides if not o.startswith("engine")]))
    plain_s: list[float] = []
    log = Sinks.log

    def log_then_plain(self: Sinks, metrics: dict, step: int) -> None:
        log(self, metrics, step)
        plain_s.append(train_round(step))

    Sinks.log = log_then_plain  # type: ignore[method-assign]
    out = Path(tempfile.mkdtemp(prefix="bench-overhead-")) / "run"
    run(cfg, out_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"fedtune": [r["time/round_s"] - r["time/eval_s"] for r in rows], "plain": plain_s}))


def paired_process(overrides: list[str]) -> tuple[list[float], list[float]]:
    proc = subprocess.run([sys.executable, __file__, "--paired-child", "--", *overrides], env=_env(), check=True,
                          capture_output=True, text=True, cwd=ROOT)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["fedtune"], got["plain"]


def paired_ratio(fedtune: list[float], plain: list[float]) -> float:
    """Median over steady rounds r (1 .. N-2) of mean(fedtune r, fedtune r+1) / plain r."""
    return statistics.median((fedtune[r] + fedtune[r + 1]) / 2 / plain[r] for r in range(1, len(plain) - 1))


def steady(rounds: list[float]) -> float:
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--clients", default="3,10,30,100", help="comma-separated client counts")
    parser.add_argument("--engines", default="sequential,parallel", help="comma-separated engines")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paired", action="store_true", help="both loops in one process, round by round "
                        "(sequential engine; module docstring)")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paired-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="more overrides (after --)")
    args = parser.parse_args()
    if args.plain:
        plain(args.extra)
        return
    if args.paired_child:
        paired(args.extra)
        return
    if args.paired:
        print("| clients | steady round: fedtune / plain (s), paired in one process | ratio (per-repeat ratios) |")
        print("|---:|---|---:|")
        for clients in [int(c) for c in args.clients.split(",")]:
            pairs = [paired_process(overrides_for(clients, "sequential", args.extra)) for _ in range(args.repeats)]
            ratios = [paired_ratio(f, p) for f, p in pairs]
            f_round = statistics.median(steady(f) for f, _ in pairs)
            p_round = statistics.median(steady(p) for _, p in pairs)
            print(f"| {clients} | {f_round:.3f} / {p_round:.3f} | {statistics.median(ratios):.3f}x "
                  f"({', '.join(f'{r:.3f}' for r in ratios)}) |", flush=True)
        print(f"\nworkload: {' '.join(WORKLOAD)}; {args.repeats} repeats, medians")
        return
    print("| clients | engine | steady round: fedtune / plain (s) | ratio | process: fedtune / plain (s) | ratio |")
    print("|---:|---|---|---:|---|---:|")
    for clients in [int(c) for c in args.clients.split(",")]:
        for engine in args.engines.split(","):
            overrides = overrides_for(clients, engine, args.extra)
            runs = []
            for _ in range(args.repeats):  # interleaved: fedtune, plain, fedtune, plain ...
                runs.append((fedtune_process(overrides), plain_process(overrides)))
            f_round = statistics.median(steady(f[0]) for f, _ in runs)
            p_round = statistics.median(steady(p[0]) for _, p in runs)
            round_ratio = statistics.median(steady(f[0]) / steady(p[0]) for f, p in runs)
            f_wall = statistics.median(f[1] for f, _ in runs)
            p_wall = statistics.median(p[1] for _, p in runs)
            wall_ratio = statistics.median(f[1] / p[1] for f, p in runs)
            print(f"| {clients} | {engine} | {f_round:.3f} / {p_round:.3f} | {round_ratio:.2f}x | "
                  f"{f_wall:.1f} / {p_wall:.1f} | {wall_ratio:.2f}x |", flush=True)
    print(f"\nworkload: {' '.join(WORKLOAD)}; {args.repeats} interleaved repeats, medians")


if __name__ == "__main__":
    main()
