"""Shared by the benchmark scripts: run one fedtune config in a fresh process, return its metrics and peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys
from pathlib import Path
from fedtune.config import compose_config
from fedtune.run import run
out = Path(sys.argv[1])
run(compose_config(sys.argv[2:]), out_dir=out)
(out / "peak.json").write_text(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child_env(**extra: str) -> dict[str, str]:
    """A benchmark child's environment: this one, offline (no hub retries), no W&B."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def run_child(overrides: list[str]) -> tuple[list[dict], int]:
    """(metrics rows, peak RSS in bytes) of one run in its own process."""
    out = Path(tempfile.mkdtemp()) / "run"
    env = child_env()
    subprocess.run([sys.executable, "-c", CHILD, str(out), "logger=none", *overrides], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "peak.json").read_text())["peak_rss_bytes"]
