"""Paper-replication overlays (conf/experiment/) and the report (fedtune.report, `fedtune-report`).

Every overlay composes and runs one tiny round: its own groups and knobs, with the model swapped for
the tiny one, the data read from ../shared/data and every size cut down. The report is checked
against a hand-made multirun folder (tests/fixtures/replication_comparison) with known numbers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_metrics

from fedtune.config import CONF_DIR, compose_config
from fedtune.report import PAPERS, Agg, load_runs, report

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DATA_PATHS = {"counsel_chat": "counsel_chat", "banking77": "banking77", "sst2": "glue/SST-2"}
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "replication_comparison"
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


def test_report_on_a_fixture_multirun(tmp_path):
    text = report([FIXTURE], tmp_path)
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


def _run_folder(folder: Path, summary: dict, lora: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"round_idx": 0, "train/loss": 1.0, "time/round_s": 1.0}) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(f"seed: 0\nlora:\n  enabled: {str(lora).lower()}\n"
                                        "strategy:\n  _target_: fedtune.strategies.fedavg.X\n")


def test_report_takes_the_arm_from_summary_json(tmp_path):
    choices = {"experiment": "comparison_banking77_smoke", "strategy": "fedavg"}
    # the strategy names would derive "fedavg" (LoRA on) and "fedavg-full" (LoRA off): the run's own arm wins
    _run_folder(tmp_path / "named", {"choices": choices, "arm": {"name": "fedavg-full", "strategy": "fedavg",
                                                                   "full_parameters": True}}, lora=True)
    _run_folder(tmp_path / "other", {"choices": choices, "arm": {"name": "fedavg-wide", "strategy": "fedavg",
                                                                   "full_parameters": False}}, lora=False)
    _run_folder(tmp_path / "old", {"choices": choices}, lora=False)  # before summary.json named the arm
    arms = {r.path.name: r.arm for r in load_runs([tmp_path])}
    assert arms == {"named": "fedavg-full", "other": "fedavg-wide", "old": "fedavg-full"}
    text = report([tmp_path], tmp_path / "report", figures=False)  # the table groups by those arms
    assert "| `fedavg-full` | 2 |" in text and "| `fedavg-wide` | 1 |" in text


def _claims(paper: str, means: dict[str, dict[str, float]]) -> dict[str, tuple[str, str]]:
    """Run a paper's claim checks on hand-made means (one seed each): {claim: (verdict, our numbers)}."""
    arms = {arm: {k: Agg(v, None, 1) for k, v in keys.items()} for arm, keys in means.items()}
    return {text: check(arms) for text, _, check in PAPERS[paper]["claims"]}


def test_gradualdiff_claims_on_hand_made_means():
    claims = _claims("gradualdiff", {
        "centralized": {"train_loss": 3.2771, "eval_ppl": 25.0, "eval_bleu": 0.5},
        "gradualdiff": {"train_loss": 3.2849, "eval_ppl": 27.4, "round_s_no_eval": 60.0, "eval_bleu": 1.4},
        "local": {"train_loss": 3.3210},
        "fedavg-full": {"round_s_no_eval": 80.0},
    })
    # three decimals keep 3.277 and 3.285 apart in the printed ordering
    assert claims["final training loss: centralized < gradualdiff < local"] == (
        "agrees", "centralized 3.277, gradualdiff 3.285, local 3.321")
    assert claims["per-round time: gradualdiff below full model updates (fedavg-full)"] == (
        "agrees", "gradualdiff 60.0 s vs fedavg-full 80.0 s (-25.0%)")
    # 27.4 / 25 = +9.6%: inside 10%; BLEU 1.4 vs 0.5 is 0.9 points apart: inside the 1-point slack
    assert claims["perplexity: gradualdiff about the same as centralized (within 10%)"][0] == "agrees"
    assert claims["BLEU: gradualdiff comparable to centralized (within 10% or 1 point)"] == (
        "agrees", "gradualdiff 1.40 vs centralized 0.50 (+0.90)")
    worse = _claims("gradualdiff", {"centralized": {"train_loss": 1.0, "eval_ppl": 10.0},
                                    "gradualdiff": {"train_loss": 2.0, "eval_ppl": 11.5},
                                    "local": {"train_loss": 1.5}})
    assert worse["final training loss: centralized < gradualdiff < local"][0] == "disagrees"
    assert worse["perplexity: gradualdiff about the same as centralized (within 10%)"] == (
        "disagrees", "gradualdiff 11.50 vs centralized 10.00 (+15.0%)")
    assert worse["per-round time: gradualdiff below full model updates (fedavg-full)"][0] == "not measured"


def test_fedcybgd_claims_on_hand_made_means():
    claims = _claims("fedcybgd", {
        "fedcybgd": {"mem_mb": 900.0, "mb_per_client_round": 300.0, "eval_accuracy": 0.71},
        "fedavg-full": {"mem_mb": 2000.0, "mb_per_client_round": 1000.0, "eval_accuracy": 0.75},
        "fedavg": {"eval_accuracy": 0.72},
    })
    assert claims["client memory: FedCyBGD below full-parameter FedAvg"] == (
        "agrees", "fedcybgd 900 MB vs fedavg-full 2000 MB (-55.0%)")
    assert claims["communication per client-round: FedCyBGD below full-parameter FedAvg"] == (
        "agrees", "fedcybgd 300 MB vs fedavg-full 1000 MB (-70.0%)")
    assert claims["accuracy competitive with full-parameter FedAvg (within 5 points)"] == (
        "agrees", "fedcybgd 0.710 vs fedavg-full 0.750 (-0.040)")
    assert claims["accuracy at least LoRA FedAvg's (PEFT baseline)"] == ("disagrees", "fedcybgd 0.710 vs fedavg 0.720")
