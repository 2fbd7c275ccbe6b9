# ruff: noqa: T201  (a command-line report)
"""Run every strategy and schedule on a fixed seed and compare metrics.jsonl between two code versions.

    python scripts/metrics_identity.py capture OUT            # one run per case into OUT/<case>/
    python scripts/metrics_identity.py compare BEFORE AFTER   # every row, every key but wall-clock ones

A refactor that must not change the numbers (issue 14) captures before and after and compares: rows
must match exactly (floats bit for bit), except the keys that measure this machine's wall clock or
memory (``time/*`` other than the simulated ``time/sim_*``, ``mem/process_rss_bytes``).
``--old-syntax`` writes the schedule cases with the pre-issue-14 keys (``strategy.mode=...``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMON = ["logger=none", "num_rounds=3", "local.max_steps=4", "eval.bleu_samples=4", "checkpoint.every=0",
          "threads=1"]
SST2 = ["data=sst2", f"data.path={SHARED / 'glue' / 'SST-2'}", "data.max_train_samples=240",
        "data.max_eval_samples=48", "local.max_seq_len=48"]

# name -> overrides (schedule keys in the new syntax; see SCHEDULE_OLD for the old one)
CASES: dict[str, list[str]] = {
    "fedavg": [],
    "fedavg_sampled": ["num_clients=5", "clients_per_round=2"],
    "fedavg_uniform_codecs_ef": ["strategy.weighting=uniform", "comm.up=topk0.1+int8", "comm.down=bf16",
                                 "comm.error_feedback=true"],
    "fedavg_nf4_wan": ["comm.up=nf4", "network=wan", "clients.speed.dist=lognormal"],
    "fedavg_parallel": ["engine=parallel", "engine.workers=2", "engine.threads=1"],
    "fedavg_full": ["lora.enabled=false", "local.lr=1e-3"],
    "fedavg_sst2_head": [*SST2, "data.classify_with=head"],
    "fedavg_sst2_generate": SST2,
    "gradualdiff": ["strategy=gradualdiff", "strategy.server_lr=0.7"],
    "gradualdiff_semi_carry": ["strategy=gradualdiff", "num_clients=4", "schedule=semi_sync",
                               "schedule.min_clients=2", "schedule.late=carry", "clients.speed.dist=uniform"],
    "fedavg_semi_drop": ["num_clients=4", "schedule=semi_sync", "schedule.min_clients=2",
                         "clients.speed.dist=uniform"],
    "fedavg_semi_deadline": ["num_clients=4", "schedule=semi_sync", "schedule.deadline_s=0.05",
                             "clients.speed.dist=uniform"],
    "fedavg_async": ["num_clients=4", "clients_per_round=3", "schedule=async", "schedule.buffer_size=2",
                     "clients.speed.dist=uniform"],
    "gradualdiff_async_parallel": ["strategy=gradualdiff", "num_clients=4", "clients_per_round=3",
                                   "schedule=async", "clients.speed.dist=uniform", "engine=parallel",
                                   "engine.workers=2", "engine.threads=1"],
    "centralized": ["strategy=centralized"],
    "local": ["strategy=local"],
    "kd": ["strategy=kd", "strategy.public_samples=16", "strategy.server_kd_steps=3"],
    "kd_both_topk": ["strategy=kd", "strategy.public_samples=16", "strategy.server_kd_steps=2",
                     "strategy.downlink=both", "strategy.logit_topk=8"],
    "kd_parallel": ["strategy=kd", "strategy.public_samples=16", "strategy.server_kd_steps=2",
                    "engine=parallel", "engine.workers=2", "engine.threads=1"],
    "split": ["strategy=split"],
    "split_parallel_wan": ["strategy=split", "strategy.split_layer=1", "engine=parallel", "engine.workers=2",
                           "engine.threads=1", "network=wan"],
    "split_sst2_head": ["strategy=split", *SST2, "data.classify_with=head"],
    "fedcybgd": ["strategy=fedcybgd", "lora.enabled=false", "num_rounds=4", "local.lr=1e-3"],
    "fedcybgd_parallel": ["strategy=fedcybgd", "lora.enabled=false", "num_rounds=4", "local.lr=1e-3",
                          "engine=parallel", "engine.workers=2", "engine.threads=1"],
}


def old_syntax(args: list[str]) -> list[str]:
    """schedule=X / schedule.k=v -> strategy.mode=X / strategy.k=v (before issue 14)."""
    out = []
    for a in args:
        if a.startswith("schedule="):
            out.append("strategy.mode=" + a.split("=", 1)[1])
        elif a.startswith("schedule."):
            out.append("strategy." + a[len("schedule."):])
        else:
            out.append(a)
    return out


def wall_clock_key(key: str) -> bool:
    return (key.startswith("time/") and not key.startswith("time/sim_")) or key == "mem/process_rss_bytes"


def capture(out: Path, *, only: list[str] | None, old: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for name, args in CASES.items():
        if only and name not in only:
            continue
        target = out / name
        if (target / "metrics.jsonl").exists():
            print(f"{name}: already captured")
            continue
        argv = [sys.executable, "-m", "fedtune", *COMMON, *(old_syntax(args) if old else args),
                f"output_dir={target}"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        print(f"{name}: rc={proc.returncode}", flush=True)
        if proc.returncode:
            print(proc.stderr[-2000:])


def compare(before: Path, after: Path) -> int:
    bad = 0
    names = sorted(p.name for p in before.iterdir() if (p / "metrics.jsonl").exists())
    for name in names:
        a = [json.loads(x) for x in (before / name / "metrics.jsonl").read_text().splitlines()]
        path = after / name / "metrics.jsonl"
        if not path.exists():
            print(f"{name}: MISSING in {after}")
            bad += 1
            continue
        b = [json.loads(x) for x in path.read_text().splitlines()]
        diffs = []
        if len(a) != len(b):
            diffs.append(f"{len(a)} rows vs {len(b)}")
        for i, (ra, rb) in enumerate(zip(a, b)):
            for key in sorted(set(ra) | set(rb)):
                if wall_clock_key(key):
                    continue
                if ra.get(key, "<absent>") != rb.get(key, "<absent>"):
                    diffs.append(f"row {i} {key}: {ra.get(key, '<absent>')} vs {rb.get(key, '<absent>')}")
        kept = sum(1 for r in a for k in r if not wall_clock_key(k))
        print(f"{name}: {'identical' if not diffs else 'DIFFERENT'} ({len(a)} rows, {kept} values compared)")
        for d in diffs[:8]:
            print("   ", d)
        bad += bool(diffs)
    print(f"{len(names) - bad}/{len(names)} cases identical")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("out", type=Path)
    cap.add_argument("--only", nargs="*")
    cap.add_argument("--old-syntax", action="store_true")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "capture":
        capture(args.out, only=args.only, old=args.old_syntax)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
