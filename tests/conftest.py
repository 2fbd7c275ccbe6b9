"""Shared fixtures. Everything runs in-process: importing peft costs ~6 s per process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A tiny, fast run: 2 clients x 2 rounds, a few steps, little eval.
FAST = [
    "logger=none", "num_rounds=2", "num_clients=2", "local.max_steps=3", "local.batch_size=4",
    "eval.bleu_samples=4", "eval.max_new_tokens=4", "data.source.num_train=60", "data.source.num_eval=12",
    "threads=1",
]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_fedtune(tmp_path):
    """Compose ``FAST + overrides`` and run it into a fresh folder; returns (summary, run_dir)."""
    from fedtune.config import compose_config
    from fedtune.run import run

    counter = {"n": 0}

    def _run(*overrides: str, fast: bool = True):
        counter["n"] += 1
        out = tmp_path / f"run{counter['n']}"
        cfg = compose_config([*(FAST if fast else []), *overrides])
        return run(cfg, out_dir=out), out

    return _run


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA device: skipped (with the reason) where none is visible."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
        for item in gpu:
            item.add_marker(skip)
