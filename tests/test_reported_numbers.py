"""The numbers a run reports mean what they say: perplexity's definition, where seconds are put,
strict JSON, summary.json after a resume. Each check is computed by a second path, not read back."""

import json
import math
import time

import pytest
import torch
from conftest import FAST, read_metrics

from fedtune.config import compose_config
from fedtune.run import run


def _strict_rows(path):
    """Parse every line refusing NaN/Infinity (json's default accepts them: a bare NaN is not JSON)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_local_perplexity_is_exp_of_the_mean_loss(run_fedtune):
    # Every client's state is scored on the same eval tokens, so the token-weighted loss over all of
    # them is the plain mean, and eval/ppl must be exp(mean loss) as for every other arm; the old mean
    # of per-client perplexities is larger (exp is convex).
    row = read_metrics(run_fedtune("strategy=local", "num_clients=3")[1])[-1]
    losses = [row[f"eval/client{c}/loss"] for c in range(3)]
    assert row["eval/loss"] == pytest.approx(sum(losses) / 3)
    assert row["eval/ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-9)
    assert len(set(losses)) == 3 and row["eval/ppl"] < sum(math.exp(x) for x in losses) / 3
    fed = read_metrics(run_fedtune("strategy=fedavg")[1])[-1]
    assert fed["eval/ppl"] == pytest.approx(math.exp(fed["eval/loss"]), rel=1e-9)


def test_folding_is_aggregation_time_not_comm_time(run_fedtune, monkeypatch):
    from fedtune.strategies.fedavg import FedAvg

    real_fold = FedAvg.fold

    def slow_fold(self, round_idx, client_id, reply):
        time.sleep(0.3)
        return real_fold(self, round_idx, client_id, reply)

    monkeypatch.setattr(FedAvg, "fold", slow_fold)
    for r in read_metrics(run_fedtune("strategy=fedavg", "num_rounds=1")[1]):
        assert r["time/aggregate_s"] >= 2 * 0.3  # two clients folded
        assert r["time/comm_s"] < 0.3


def test_non_finite_values_are_null_and_an_all_rejected_round_is_named(run_fedtune, monkeypatch, caplog):
    from fedtune.strategies.fedavg import FedAvg

    real_update = FedAvg.local_update

    def poisoned(self, client, message):
        reply = real_update(self, client, message)
        reply.tensors = {k: torch.full_like(v, float("nan")) for k, v in reply.tensors.items()}
        client.report.loss = float("nan")  # a diverged client: its loss is NaN too
        return reply

    monkeypatch.setattr(FedAvg, "local_update", poisoned)
    with caplog.at_level("WARNING"):
        summary, out = run_fedtune("strategy=fedavg")
    rows = _strict_rows(out / "metrics.jsonl")
    assert [r["comm/rejected_updates"] for r in rows] == [2, 2]
    assert all(r["train/loss"] is None for r in rows)
    assert summary["final"]["train/loss"] != summary["final"]["train/loss"]  # NaN in memory ...
    assert json.loads((out / "summary.json").read_text(), parse_constant=lambda t: pytest.fail(t))[
        "final"]["train/loss"] is None  # ... null on disk
    named = [m for m in caplog.messages if "every update" in m]
    assert [m.split(":")[0] for m in named] == ["round 0", "round 1"]


def test_summary_after_resume_has_the_runs_choices_and_whole_wall_time(tmp_path, monkeypatch):
    from fedtune import checkpoint
    from fedtune.strategies.fedavg import FedAvg

    out = tmp_path / "run"
    real_aggregate = FedAvg.aggregate
    monkeypatch.setattr(FedAvg, "aggregate", lambda *a: (time.sleep(0.5), real_aggregate(*a))[1])
    started = {"logger": "none", "strategy": "fedavg", "model": "tiny"}
    run(compose_config([*FAST, "num_rounds=3"]), out_dir=out, choices=started)
    monkeypatch.setattr(FedAvg, "aggregate", real_aggregate)
    first_wall = checkpoint.load(out / "checkpoint")["wall_s"]
    assert first_wall >= 3 * 0.5

    t0 = time.perf_counter()  # `fedtune resume=DIR` composes the defaults: logger=wandb
    summary = run(compose_config([*FAST, "num_rounds=4"]), out_dir=out, resume=True,
                  choices={"logger": "wandb", "strategy": "fedavg", "model": "tiny"})
    second_wall = time.perf_counter() - t0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["choices"] == started
    assert first_wall < on_disk["time/wall_s"] <= first_wall + second_wall
    assert summary["time/wall_s"] == on_disk["time/wall_s"]


def test_comm_time_is_the_channels_own_time_for_the_model_exchange(run_fedtune, monkeypatch):
    """``time/comm_s`` is what the channel measured on the round's downloads and uploads."""
    from fedtune.comm import channel as channel_module

    real = channel_module.serialize

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return real(*args, **kwargs)

    monkeypatch.setattr(channel_module, "serialize", slow)
    for r in read_metrics(run_fedtune("strategy=fedavg", "num_rounds=1")[1]):
        assert r["time/comm_s"] >= 4 * 0.1  # 2 clients x (down + up), each serialized once
        assert r["time/aggregate_s"] < 0.1


@pytest.mark.parametrize(("overrides", "arm"), [
    ((), {"name": "fedavg", "strategy": "fedavg", "full_parameters": False}),
    (("lora.enabled=false", "local.lr=1e-3"), {"name": "fedavg-full", "strategy": "fedavg", "full_parameters": True}),
    (("strategy=fedcybgd", "lora.enabled=false"), {"name": "fedcybgd", "strategy": "fedcybgd", "full_parameters": True}),
])
def test_summary_names_the_arm_the_report_groups_by(run_fedtune, overrides, arm):
    summary, out = run_fedtune("num_rounds=1", *overrides)
    assert summary["arm"] == arm
    assert json.loads((out / "summary.json").read_text())["arm"] == arm
