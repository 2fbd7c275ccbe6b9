"""engine=auto: which engine it picks, by the rules in fedtune/engine/auto.py."""

from __future__ import annotations

import pytest

from fedtune.engine.auto import auto_engine
from fedtune.engine.parallel import ParallelEngine
from fedtune.engine.sequential import SequentialEngine

FEDAVG = "fedtune.strategies.fedavg.FedAvg"
SPLIT = "fedtune.strategies.split.Split"


def _pick(monkeypatch, *, cores=2, clients=3, per_round=None, threads=None, strategy=FEDAVG, device="cpu"):
    monkeypatch.setattr("fedtune.engine.auto.available_cores", lambda: cores)
    return auto_engine(num_clients=clients, clients_per_round=per_round, device=device, threads=threads,
                       strategy=strategy)


def test_two_cores_and_several_clients_run_one_single_thread_worker_per_core(monkeypatch):
    engine = _pick(monkeypatch, cores=2, clients=3)
    assert isinstance(engine, ParallelEngine) and (engine.workers, engine.threads) == (2, 1)
    engine = _pick(monkeypatch, cores=16, clients=5)  # never more workers than clients (nor than 8)
    assert isinstance(engine, ParallelEngine) and engine.workers == 5
    assert _pick(monkeypatch, cores=16, clients=40).workers == 8


@pytest.mark.parametrize("why", [
    {"cores": 1}, {"threads": 1}, {"clients": 1}, {"clients": 10, "per_round": 1}, {"strategy": SPLIT},
])
def test_otherwise_sequential(monkeypatch, why):
    assert isinstance(_pick(monkeypatch, **why), SequentialEngine)


def test_threads_caps_the_cores_auto_uses(monkeypatch):
    assert _pick(monkeypatch, cores=8, threads=2, clients=10).workers == 2


def test_the_default_config_uses_auto():
    from fedtune.config import compose_config

    assert compose_config([]).engine._target_ == "fedtune.engine.auto.auto_engine"
