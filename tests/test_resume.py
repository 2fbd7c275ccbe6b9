"""Exact resume: a run killed with SIGKILL mid-round and resumed ends identical to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, read_metrics

from fedtune.config import compose_config
from fedtune.run import run

VOLATILE = ("time/", "mem/process")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


CASES = {
    "fedavg": ["strategy=fedavg"],
    "gradualdiff+ef": ["strategy=gradualdiff", "comm.up=topk0.1+int8", "comm.error_feedback=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_mid_round_then_resume_is_exact(tmp_path, case):
    overrides = [*FAST, "num_rounds=5", "local.max_steps=40", "checkpoint.keep_last=1", *CASES[case]]
    reference = tmp_path / "reference"
    run(compose_config(overrides), out_dir=reference)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", *overrides, f"output_dir={killed}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # two rounds logged -> the third is running
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = len(read_metrics(killed))
    assert 2 <= rows_at_kill < 5, rows_at_kill

    run(compose_config(overrides), out_dir=killed, resume=True)
    assert _stable(read_metrics(killed)) == _stable(read_metrics(reference))
    assert len(list((killed / "checkpoint").glob("round_*.pt"))) == 1  # keep_last bounds disk


def test_resume_without_checkpoint_is_one_line_error(tmp_path):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        run(compose_config(FAST), out_dir=tmp_path / "nothing", resume=True)
