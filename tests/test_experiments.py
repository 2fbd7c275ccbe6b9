"""Paper-replication overlays (conf/experiment/) and scripts/report.py.

Every overlay composes and runs one tiny round: its own groups and knobs, with the model swapped for
the tiny one, the data read from ../shared/data and every size cut down. The report is checked
against a hand-made multirun folder (tests/fixtures/replication_comparison) with known numbers.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_metrics

from fedtune.config import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DATA_PATHS = {"counsel_chat": "counsel_chat", "banking77": "banking77", "sst2": "glue/SST-2"}
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "replication_comparison"
# One tiny round: the experiment's groups and settings stay, sizes shrink.
TINY = ["model=tiny", "logger=none", "num_rounds=1", "local.max_steps=2", "local.batch_size=4", "local.max_seq_len=48",
        "data.max_train_samples=60", "data.max_eval_samples=8", "eval.bleu_samples=2", "eval.max_new_tokens=4",
        "eval.batch_size=8", "threads=1", "checkpoint.every=0"]


def test_there_are_experiments():
    assert EXPERIMENTS, "conf/experiment/ is empty"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_overlay_is_global_and_has_a_make_target(name):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    # a comment above the package line would silently turn the overlay into experiment.* keys
    assert text.splitlines()[0] == "# @package _global_"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"experiment={name}(\s|$)", makefile), f"no make target runs experiment={name}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_one_tiny_round(tmp_path, name):
    from fedtune.run import run

    data = compose_config([f"experiment={name}"]).data.name
    folder = SHARED_DATA / DATA_PATHS[data]
    if not folder.exists():
        pytest.skip(f"{folder} is absent (the replication data lives in ../shared/data)")
    overrides = [f"experiment={name}", *TINY, f"data.path={folder}"]
    cfg = compose_config(overrides)
    assert cfg.num_clients >= 3  # the overlay's own settings survived the tiny overrides
    if cfg.partition.get("samples_per_client"):
        overrides.append("partition.samples_per_client=8")
    summary, out = run(compose_config(overrides), out_dir=tmp_path / "run"), tmp_path / "run"
    rows = read_metrics(out)
    assert [r["round_idx"] for r in rows] == [0]
    assert math.isfinite(rows[0]["train/loss"]) and math.isfinite(rows[0]["eval/loss"])
    assert summary["final"]


def _report_module():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_report_on_a_fixture_multirun(tmp_path):
    text = _report_module().report([FIXTURE], tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    # fedavg: seeds 0 and 1 with final accuracy 0.5 and 0.7; 40 MB over 2 rounds x 3 clients; 3e12 FLOPs per round
    assert "| `fedavg` | 2 | 0.600 ± 0.141 | ★★★★★ | 0.300 ± 0.071 | 6.67 ± 0.00 | ★★★ | 1000 ± 0 | ★★★★ |" in text
    # split: the server's 4 s per round come off the client's compute time
    assert "| `split` | 1 | 0.750 | ★★★★ | 0.375 | 13.33 | ★★★★★ | 100 | ★★★ | 2.0 |" in text
    assert "| `kd` | 1 | 0.300 | ★★★ | 0.150 | 0.03 | ★★ | 1500 | ★★★★★ | 2.0 |" in text
    claims = dict(re.findall(r"^- (.+?) — .*\*\*(agrees|disagrees|not measured)\*\*$", text, flags=re.M))
    assert claims == {
        "accuracy: FedLLM (fedavg) > Split > KD": "disagrees",  # split 0.75 beats fedavg 0.6 here
        "communication: KD lowest (classification)": "agrees",
        "communication: Split highest": "agrees",
        "client computation: Split lowest": "agrees",
        "client computation: KD highest": "agrees",
    }
    # runs that override lora.r are rank-sweep points, not part of the fedavg arm above
    assert "| `r=4` | 1 | 0.450 | 3.33 | 1000 |\n| `r=16` | 1 | 0.650 | 13.33 | 1000 |" in text
    for figure in ("comparison_curves.png", "comparison_pareto.png", "comparison_time.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in text
