"""Engines on CPU: sequential with 2 threads vs parallel with 2 workers x 1 thread, tiny model.

    python scripts/bench_engine.py [--clients 3,10,30] [--rounds 3] [--reference] [override ...]

Each (engine, number of clients) is one ``python -m fedtune`` command (the embedded default: tiny
Llama + LoRA, synthetic data; every client every round), measured from outside:
- start -> round 0: seconds from the process's creation to the start of round 0 (imports, building
  the world, and for ``parallel`` starting the workers and building theirs), read from the round-0
  log line's timestamp minus that round's ``time/round_s``;
- round: median wall time of the rounds without evaluation (all but the last; ``eval.every=0``);
- tree RSS / PSS: peak of the summed memory of the process and all its descendants (workers,
  forkserver), sampled every 0.1 s. PSS splits shared pages (forked workers share the
  forkserver's libraries), so it is the fair total; RSS counts shared pages once per process.
``--reference`` adds sequential with 1 thread. Prints a markdown table and the load average: other
processes on the machine skew multi-threaded timings most (a preempted OpenMP thread stalls the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
from benchlib import child_env

ENGINES = {
    "sequential, 2 threads": ["engine=sequential", "threads=2"],
    "parallel, 2 workers x 1 thread": ["engine=parallel", "engine.workers=2", "engine.threads=1", "threads=2"],
}
REFERENCE = {"sequential, 1 thread": ["engine=sequential", "threads=1"]}
ROUND_LINE = re.compile(r"^\[([\d-]+ [\d:]+),(\d+)\]\[fedtune\.sinks\]\[INFO\] - round 1/", re.M)


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
    return rss, pss


def run_one(overrides: list[str]) -> dict:
    """One fedtune command; its start-up, rounds and peak process-tree memory."""
    out = Path(tempfile.mkdtemp()) / "run"
    env = child_env()
    cmd = [sys.executable, "-m", "fedtune", *overrides, f"hydra.run.dir={out}"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc, peak_rss, peak_pss = psutil.Process(child.pid), 0, 0
    created = proc.create_time()
    while child.poll() is None:
        rss, pss = _tree_memory(proc)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{child.stderr.read().decode()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamp, ms = ROUND_LINE.search((out / "cli.log").read_text()).groups()
    round0_end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(ms) / 1000
    return {"start_s": round0_end - rows[0]["time/round_s"] - created, "rss": peak_rss, "pss": peak_pss,
            "round_s": statistics.median(r["time/round_s"] for r in rows[:-1]), "eval_loss": rows[-1]["eval/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="3,10,30")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also run sequential with 1 thread")
    args, extra = parser.parse_known_args()
    mb = 2**20
    lines = ["| clients | engine | start -> round 0 (s) | round (s) | tree RSS (MB) | tree PSS (MB) | final eval/loss |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for num_clients in [int(c) for c in args.clients.split(",")]:
        common = ["logger=none", f"num_clients={num_clients}", f"num_rounds={args.rounds}", "eval.every=0",
                  "eval.bleu_samples=4", *extra]
        for name, overrides in {**ENGINES, **(REFERENCE if args.reference else {})}.items():
            r = run_one([*common, *overrides])
            lines.append(f"| {num_clients} | {name} | {r['start_s']:.1f} | {r['round_s']:.2f} | {r['rss'] / mb:.0f} "
                         f"| {r['pss'] / mb:.0f} | {r['eval_loss']:.4f} |")
            sys.stderr.write(lines[-1] + "\n")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    sys.stdout.write("\n".join(lines) + f"\n\n{cores} cores; load average (1/5/15 min) at the end: {load}\n")


if __name__ == "__main__":
    main()
