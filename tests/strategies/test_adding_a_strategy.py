"""docs/strategies.md's worked example (FedProx) runs as written, through the public contract only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import read_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "strategies.md"


@pytest.fixture
def fedprox_module(tmp_path, monkeypatch):
    """The doc's python block, saved as an importable module (as a researcher would save it)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/strategies.md should hold exactly one python block: the example"
    package = tmp_path / "my_strategies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fedprox.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_strategies.fedprox.FedProx"
    for name in [m for m in sys.modules if m.startswith("my_strategies")]:
        del sys.modules[name]


def test_the_example_is_about_thirty_lines():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 32


def test_fedprox_with_mu_0_is_fedavg_bit_for_bit(run_fedtune, fedprox_module):
    fedavg = read_metrics(run_fedtune("strategy=fedavg")[1])
    prox = read_metrics(run_fedtune(f"strategy._target_={fedprox_module}", "+strategy.mu=0.0")[1])
    keys = [k for k in fedavg[0] if k.startswith(("eval/", "train/loss", "comm/"))]
    assert [[r[k] for k in keys] for r in prox] == [[r[k] for k in keys] for r in fedavg]
    assert all(r["train/prox"] >= 0 for r in prox)


def test_fedprox_term_pulls_clients_toward_the_global_state(run_fedtune, fedprox_module):
    """The proximal term is ||w - w_global||^2 summed over a client's steps; a large mu shrinks it."""
    weak = read_metrics(run_fedtune(f"strategy._target_={fedprox_module}", "+strategy.mu=0.0")[1])
    strong = read_metrics(run_fedtune(f"strategy._target_={fedprox_module}", "+strategy.mu=100.0")[1])
    for w, s in zip(weak, strong):
        assert s["train/prox"] < 0.5 * w["train/prox"]
    assert strong[-1]["eval/loss"] != weak[-1]["eval/loss"]
