"""fedtune's round loop vs a plain PyTorch loop training the same steps on the same batches.

    python scripts/bench_overhead.py [--rounds 5] [--clients 3] [--steps 30] [--repeats 3] [override ...]

The plain loop is the physical limit on this machine: one model, one AdamW, forward/backward/step
over exactly the batches fedtune's clients train on, nothing else. fedtune's time is the sum of
its rounds' wall time minus evaluation (which the plain loop does not do): sampling, broadcast,
channel (serialize + count + decode) both ways, adapter swaps, local training, aggregation and
logging. Prints the ratio, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from fedtune.config import compose_config  # noqa: E402
from fedtune.data.format import collate  # noqa: E402
from fedtune.run import run  # noqa: E402
from fedtune.seeding import Purpose, generator, sample_clients  # noqa: E402
from fedtune.train.local import batch_order, plan_steps  # noqa: E402
from fedtune.world import build_world, resolve_device  # noqa: E402


def fedtune_seconds(overrides: list[str]) -> float:
    out = Path(tempfile.mkdtemp()) / "run"
    run(compose_config(overrides), out_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r["time/round_s"] - r["time/eval_s"] for r in rows)


def plain_seconds(overrides: list[str]) -> float:
    cfg = compose_config(overrides)
    world = build_world(cfg, device=resolve_device(str(cfg.device)))
    model, data, shards, pad = world.model, world.task.train, world.shards, world.tokenizer.pad_token_id
    # The same batches fedtune's clients draw: same shards, same per-(seed, round, client) shuffles.
    batches = []
    for round_idx in range(cfg.num_rounds):
        ids = sample_clients(seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients,
                             clients_per_round=cfg.clients_per_round or cfg.num_clients)
        for cid in ids:
            steps = plan_steps(len(shards[cid]), batch_size=cfg.local.batch_size, epochs=cfg.local.epochs,
                               max_steps=cfg.local.max_steps)
            gen = generator(cfg.seed, round_idx, cid, Purpose.TRAIN)
            batches += [collate(data, b, pad_id=pad) for b in
                        batch_order(shards[cid], batch_size=cfg.local.batch_size, num_steps=steps, generator=gen)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.local.lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.local.grad_clip)
        optimizer.step()
        loss.item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [
        "logger=none", "strategy=fedavg", f"num_rounds={args.rounds}", f"num_clients={args.clients}",
        f"local.max_steps={args.steps}", "eval.every=0", "eval.bleu_samples=0", "eval.max_samples=8",
        *args.overrides,
    ]
    ratios = []
    for i in range(args.repeats):
        f, p = fedtune_seconds(overrides), plain_seconds(overrides)
        ratios.append(f / p)
        sys.stdout.write(f"repeat {i}: fedtune {f:.3f}s  plain {p:.3f}s  ratio {f / p:.3f}\n")
    sys.stdout.write(f"overrides: {' '.join(overrides)}\n")
    sys.stdout.write(f"overhead ratio (median of {args.repeats}): {statistics.median(ratios):.3f}\n")


if __name__ == "__main__":
    main()
