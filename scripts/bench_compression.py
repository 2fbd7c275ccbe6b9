"""Compressed uplinks and aggregation schedules on the same data and seed.

    python scripts/bench_compression.py [--rounds 10] [--part all|compression|schedules]
                                        [--out docs/bench_compression.md] [override ...]

With ``--part`` and an existing ``--out`` file, only that part's section of the file is rewritten.

Part 1: fedavg fp32 vs gradualdiff with int8, nf4, top-k 10% + int8, top-k 1% + int8, each with and
without error feedback: total uplink bytes, ratio to fp32 fedavg, final eval loss and its penalty.
Part 2: sync vs semi_sync vs async gradualdiff on heterogeneous clients (speeds 1x or 4x, a WAN):
simulated time to reach a target eval loss. Every number is read from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from fedtune.config import compose_config  # noqa: E402
from fedtune.run import run  # noqa: E402


def metrics(overrides: list[str]) -> list[dict]:
    out = Path(tempfile.mkdtemp()) / "run"
    t0 = time.perf_counter()
    run(compose_config(overrides), out_dir=out)
    sys.stderr.write(f"[{time.perf_counter() - t0:.0f} s wall] {' '.join(overrides)}\n")  # noisy: not in the tables
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def compression_table(base: list[str]) -> list[str]:
    ref = metrics([*base, "strategy=fedavg"])
    ref_up, ref_loss = sum(r["comm/up_bytes"] for r in ref), ref[-1]["eval/loss"]
    lines = ["| strategy | uplink codec | error feedback | uplink bytes | vs fedavg fp32 | final eval loss | loss penalty |",
             "|---|---|---|---:|---:|---:|---:|",
             f"| fedavg | none (fp32) | - | {ref_up:,} | 1.0x | {ref_loss:.4f} | - |"]
    for codec in ("none", "int8", "nf4", "topk0.1+int8", "topk0.01+int8"):
        for ef in (False, True):
            if codec == "none" and ef:
                continue
            rows = metrics([*base, "strategy=gradualdiff", "strategy.weighting=examples", f"comm.up={codec}",
                            f"comm.error_feedback={str(ef).lower()}"])
            up, loss = sum(r["comm/up_bytes"] for r in rows), rows[-1]["eval/loss"]
            lines.append(f"| gradualdiff | {codec} | {'yes' if ef else 'no'} | {up:,} | {ref_up / up:.1f}x fewer | "
                         f"{loss:.4f} | {100 * (loss - ref_loss) / ref_loss:+.2f}% |")
    return lines


def schedule_table(base: list[str], rounds: int) -> list[str]:
    hetero = [*base, "strategy=gradualdiff", "num_clients=6", "clients.speed.dist=choice",
              "clients.speed.choices=[1.0,4.0]", "network=wan", "eval.bleu_samples=0"]
    runs = {
        "sync": metrics([*hetero, f"num_rounds={rounds}"]),
        # the others get more server steps: the question is how soon (in simulated time) they get there
        "semi_sync (first 4 of 6, late dropped)": metrics([*hetero, f"num_rounds={2 * rounds}",
                                                           "schedule=semi_sync", "schedule.min_clients=4"]),
        "semi_sync (first 4 of 6, late carried)": metrics([*hetero, f"num_rounds={2 * rounds}",
                                                           "schedule=semi_sync", "schedule.min_clients=4",
                                                           "schedule.late=carry"]),
        "async (buffer 2, 6 in flight)": metrics([*hetero, f"num_rounds={6 * rounds}", "schedule=async",
                                                  "schedule.buffer_size=2"]),
    }
    target = 1.05 * runs["sync"][-1]["eval/loss"]
    lines = [f"Target: eval loss <= {target:.4f} (sync's final loss + 5%).", "",
             "| schedule | server steps | client updates | sim. time to target | final eval loss | final sim. clock |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rows in runs.items():
        hit = next((r for r in rows if r["eval/loss"] <= target), None)
        reached = f"{hit['time/sim_clock_s']:.1f} s (step {hit['round_idx'] + 1})" if hit else "not reached"
        updates = sum(r["clients/aggregated"] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {updates} | {reached} | {rows[-1]['eval/loss']:.4f} | "
                     f"{rows[-1]['time/sim_clock_s']:.1f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    parser.add_argument("--part", choices=["all", "compression", "schedules"], default="all")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["logger=none", f"num_rounds={args.rounds}", "eval.every=1", "eval.bleu_samples=0", "threads=1",
            "checkpoint.every=0", *args.overrides]
    parts = []
    if args.part in ("all", "compression"):
        parts += ["## Uplink compression", "", f"Overrides: `{' '.join(base)}`", "", *compression_table(base), ""]
    if args.part in ("all", "schedules"):
        parts += ["## Schedules on heterogeneous clients", "", *schedule_table(base, args.rounds), ""]
    text = "\n".join(parts)
    sys.stdout.write(text)
    if args.out:
        out = Path(args.out)
        if args.part != "all" and out.exists():  # replace only this part's section, keep the other
            text = replace_section(out.read_text(), parts[0], text)
        out.write_text(text)


def replace_section(doc: str, heading: str, section: str) -> str:
    """``doc`` with the section under ``heading`` (up to the next ``## ``) replaced by ``section``."""
    lines = doc.splitlines(keepends=True)
    if heading + "\n" not in lines:
        return doc.rstrip("\n") + "\n\n" + section
    start = lines.index(heading + "\n")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")


if __name__ == "__main__":
    main()
