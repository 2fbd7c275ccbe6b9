"""On a CUDA device (marker ``gpu``: skipped without one). Run on a GPU machine: ``pytest -m gpu``."""

from __future__ import annotations

import pytest
from conftest import read_metrics

pytestmark = pytest.mark.gpu


def test_a_cuda_run_counts_the_same_bytes_and_learns_like_cpu(run_fedtune):
    cpu = read_metrics(run_fedtune("device=cpu", "num_rounds=1")[1])
    gpu = read_metrics(run_fedtune("device=cuda", "num_rounds=1")[1])
    # what crosses the channel has the same shapes and dtypes on either device
    assert [r["comm/up_bytes"] for r in gpu] == [r["comm/up_bytes"] for r in cpu]
    assert [r["comm/down_bytes"] for r in gpu] == [r["comm/down_bytes"] for r in cpu]
    assert gpu[0]["eval/loss"] == pytest.approx(cpu[0]["eval/loss"], rel=1e-2)
    assert gpu[0]["mem/client_peak_bytes"] > 0


def test_parallel_engine_on_cuda_matches_sequential(run_fedtune):
    import torch

    seq = read_metrics(run_fedtune("device=cuda", "num_rounds=1")[1])
    par = read_metrics(run_fedtune("device=cuda", "num_rounds=1", "engine=parallel",
                                   f"engine.workers={max(1, torch.cuda.device_count())}")[1])
    assert [r["comm/up_bytes"] for r in par] == [r["comm/up_bytes"] for r in seq]
    assert par[0]["eval/loss"] == pytest.approx(seq[0]["eval/loss"], rel=1e-3)
