"""Clients at scale: 1,000 clients x 10 per round vs 10 clients x 10 per round (tiny model).

    python scripts/bench_scale.py [--rounds 5] [--steps 10] [override ...]

Per-client state lives in the client store, so a round costs the clients in it, not the total:
per-round time and the process's peak RSS should be about equal. Each configuration runs in a
fresh process (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchlib import run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = [f"num_rounds={args.rounds}", f"local.max_steps={args.steps}", "clients_per_round=10",
              "data.source.num_train=10000", "eval.every=0", "eval.bleu_samples=0", "eval.max_samples=16",
              "checkpoint.every=0", *args.overrides]
    sys.stdout.write("| clients | per round | rounds | round time (median) | peak RSS |\n|---:|---:|---:|---:|---:|\n")
    for strategy in ("fedavg", "local"):
        for num_clients in (10, 1000):
            rows, peak = run_child([*common, f"num_clients={num_clients}", f"strategy={strategy}"])
            t = statistics.median(r["time/round_s"] - r["time/eval_s"] for r in rows)
            sys.stdout.write(f"| {num_clients:,} ({strategy}) | 10 | {args.rounds} | {t:.2f} s | {peak / 2**20:.0f} MiB |\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
