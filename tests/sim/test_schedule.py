"""Schedules and the simulated clock: hand-computed arrivals, staleness weights, determinism."""

import copy

import pytest
import torch
from conftest import read_metrics
from omegaconf import OmegaConf

from fedtune.comm.channel import Message
from fedtune.errors import ConfigError
from fedtune.sim.clock import ClientProfile, client_profiles, client_time
from fedtune.sim.schedule import Schedule, staleness_weight


def _msgs(*cids):
    return {c: Message(tensors={"w": torch.tensor([float(c)])}, meta={"num_examples": 1}) for c in cids}


def test_staleness_weight_by_hand():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert staleness_weight(1, 1.0) == pytest.approx(0.5)


def test_client_time_by_hand():
    p = ClientProfile(speed=2.0, up_bps=1000.0, down_bps=4000.0, latency_s=0.1)
    # 1e9 flops at 1e9 flops/s x2 = 2 s; 500 B up = 0.5 s; 2000 B down = 0.5 s; 2 x 0.1 latency
    assert client_time(p, flops=1e9, flops_per_s=1e9, up_bytes=500, down_bytes=2000) == pytest.approx(3.2)
    assert client_time(ClientProfile(1.0, None, None, 0.0), flops=5e9, flops_per_s=1e9, up_bytes=10**9,
                       down_bytes=10**9) == pytest.approx(5.0)


def test_profiles_are_deterministic():
    clients = OmegaConf.create({"speed": {"dist": "lognormal", "value": 1.0, "sigma": 0.5}})
    net = OmegaConf.create({"up_mbps": 8, "down_mbps": 16, "latency_ms": 10, "spread": 0.3})
    a = client_profiles(clients, net, num_clients=5, seed=1)
    assert a == client_profiles(clients, net, num_clients=5, seed=1)
    assert a != client_profiles(clients, net, num_clients=5, seed=2)


def test_sync_waits_for_the_slowest():
    s = Schedule()
    s.push(_msgs(0, 1, 2), {0: 1.0, 1: 5.0, 2: 2.0})
    ready, stats = s.collect()
    assert sorted(ready) == [0, 1, 2] and stats["time/sim_round_s"] == 5.0 and s.version == 1


def test_semi_sync_first_m_drop_or_carry():
    s = Schedule(mode="semi_sync", min_clients=2, late="drop")
    s.push(_msgs(0, 1, 2), {0: 3.0, 1: 1.0, 2: 2.0})
    ready, stats = s.collect()
    assert sorted(ready) == [1, 2] and stats["time/sim_round_s"] == 2.0 and stats["clients/dropped_late"] == 1
    s = Schedule(mode="semi_sync", min_clients=2, late="carry")
    s.push(_msgs(0, 1, 2), {0: 3.0, 1: 1.0, 2: 2.0})
    s.collect()
    s.push(_msgs(3, 4), {3: 1.0, 4: 1.5})
    ready, stats = s.collect()
    assert sorted(ready) == [0, 3, 4]  # client 0 carried over, one round stale
    assert ready[0].meta["staleness"] == 1 and ready[3].meta["staleness"] == 0
    assert stats["comm/staleness_mean"] == pytest.approx(1 / 3)


def test_semi_sync_carry_keeps_the_straggler_late():
    """A carried update lands at its true arrival time, with its true staleness (by hand)."""
    s = Schedule(mode="semi_sync", min_clients=2, late="carry")
    s.push(_msgs(0, 1, 2), {0: 1000.0, 1: 100.0, 2: 300.0})  # client 0 arrives at t=1000
    ready, stats = s.collect()
    assert sorted(ready) == [1, 2] and stats["time/sim_clock_s"] == 300.0 and stats["clients/dropped_late"] == 0
    seen = []
    for _ in range(3):  # each round: clients 1 and 2 again, 100 s and 300 s -> rounds end at 600, 900, 1200
        cids = s.dispatch(seed=0, round_idx=s.version, num_clients=3, clients_per_round=3, sampled=[0, 1, 2])
        assert cids == [1, 2]  # client 0 is still in flight: no new work for it
        s.push(_msgs(*cids), {1: 100.0, 2: 300.0})
        ready, stats = s.collect()
        seen.append((sorted(ready), stats["time/sim_clock_s"]))
        if 0 not in ready:
            assert stats["time/sim_clock_s"] < 1000.0 and stats["comm/staleness_mean"] == 0.0
    assert seen == [([1, 2], 600.0), ([1, 2], 900.0), ([0, 1, 2], 1200.0)]
    # dispatched at version 0, aggregated by the 4th server step (version 3): 3 steps stale
    assert ready[0].meta["staleness"] == 3 and ready[1].meta["staleness"] == 0
    assert stats["comm/staleness_mean"] == pytest.approx(1.0) and stats["time/sim_round_s"] == 300.0
    assert ready[0].meta["staleness_weight"] == 0.5  # (1 + 3)^-0.5
    assert s.pending == [] and s.dispatch(seed=0, round_idx=4, num_clients=3, clients_per_round=3,
                                          sampled=[0, 1, 2]) == [0, 1, 2]


def test_semi_sync_carry_dispatch_skips_busy_clients_drop_does_not():
    for late, expect in (("carry", [1, 3]), ("drop", [0, 1, 3])):
        s = Schedule(mode="semi_sync", min_clients=1, late=late)
        s.push(_msgs(0, 1), {0: 50.0, 1: 1.0})
        s.collect()
        assert s.dispatch(seed=0, round_idx=1, num_clients=4, clients_per_round=3, sampled=[0, 1, 3]) == expect
    # every sampled client busy: nothing new is started, the server waits for the carried update
    s = Schedule(mode="semi_sync", min_clients=1, late="carry")
    s.push(_msgs(0, 1), {0: 50.0, 1: 1.0})
    s.collect()
    assert s.dispatch(seed=0, round_idx=1, num_clients=2, clients_per_round=1, sampled=[0]) == []
    s.push({}, {})
    ready, stats = s.collect()
    assert list(ready) == [0] and ready[0].meta["staleness"] == 1 and stats["time/sim_clock_s"] == 50.0


def test_semi_sync_carry_with_deadline_and_checkpoint():
    s = Schedule(mode="semi_sync", deadline_s=2.5, late="carry")
    s.push(_msgs(0, 1, 2), {0: 3.0, 1: 1.0, 2: 10.0})
    ready, stats = s.collect()  # the round ends at the deadline, 2.5; 0 and 2 are carried
    assert sorted(ready) == [1] and stats["time/sim_clock_s"] == 2.5
    restored = Schedule(mode="semi_sync", deadline_s=2.5, late="carry")
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    for sched in (s, restored):
        assert sched.dispatch(seed=0, round_idx=1, num_clients=3, clients_per_round=3, sampled=[0, 1, 2]) == [1]
        sched.push(_msgs(1), {1: 1.0})  # lands at 3.5: the round ends there; 0 (t=3) came in before
        ready, stats = sched.collect()
        assert sorted(ready) == [0, 1] and ready[0].meta["staleness"] == 1 and stats["time/sim_clock_s"] == 3.5
        assert [(p.arrival, p.client_id, p.version) for p in sched.pending] == [(10.0, 2, 0)]
    assert s.state_dict()["now"] == restored.state_dict()["now"] and s.version == restored.version == 2


def test_stale_updates_count_less_in_aggregation():
    from fedtune.strategies.fedavg import FedAvg

    strategy = FedAvg(weighting="uniform")
    s = Schedule(mode="async", buffer_size=2, staleness_exponent=0.5)
    s.version = 3  # both were dispatched at version 0; one is re-dispatched fresh below
    s.push({0: Message(meta={"num_examples": 1})}, {0: 1.0})
    s.version, s.pending[0].version = 3, 0
    s.push({1: Message(meta={"num_examples": 1})}, {1: 2.0})
    ready, _ = s.collect()
    stale, fresh = ready[0], ready[1]
    assert (stale.meta["staleness"], fresh.meta["staleness"]) == (3, 0)
    assert (stale.meta["staleness_weight"], fresh.meta["staleness_weight"]) == (0.5, 1.0)  # (1 + 3)^-0.5, (1 + 0)^-0.5
    assert strategy.aggregation_weights([stale, fresh]) == [pytest.approx(0.25), pytest.approx(0.5)]


def test_async_buffer_takes_the_earliest_arrivals():
    s = Schedule(mode="async", buffer_size=2)
    s.push(_msgs(0, 1, 2), {0: 5.0, 1: 1.0, 2: 3.0})
    ready, stats = s.collect()
    assert list(ready) == [1, 2] and stats["time/sim_clock_s"] == 3.0
    ready, stats = s.collect()
    assert list(ready) == [0] and stats["time/sim_clock_s"] == 5.0 and ready[0].meta["staleness"] == 1


def test_semi_sync_deadline():
    s = Schedule(mode="semi_sync", deadline_s=2.5)
    s.push(_msgs(0, 1, 2), {0: 3.0, 1: 1.0, 2: 2.0})
    ready, stats = s.collect()
    assert sorted(ready) == [1, 2] and stats["time/sim_round_s"] == 2.5


def test_async_buffer_and_staleness():
    s = Schedule(mode="async", buffer_size=1)
    assert len(s.dispatch(seed=0, round_idx=0, num_clients=4, clients_per_round=2, sampled=[])) == 2
    s.push(_msgs(0, 1), {0: 1.0, 1: 3.0})
    ready, _ = s.collect()  # t=1: client 0 arrives, version 0 -> 1
    assert list(ready) == [0] and ready[0].meta["staleness"] == 0
    busy = s.dispatch(seed=0, round_idx=1, num_clients=4, clients_per_round=2, sampled=[])
    assert len(busy) == 1 and 1 not in busy  # client 1 is still in flight
    s.push(_msgs(*busy), {busy[0]: 5.0})  # starts at t=1 with version 1, arrives t=6
    ready, stats = s.collect()  # t=3: client 1 arrives, trained on version 0 -> staleness 1
    assert list(ready) == [1] and ready[1].meta["staleness"] == 1 and stats["time/sim_clock_s"] == 3.0
    assert ready[1].meta["staleness_weight"] == pytest.approx(0.7071067811865476)  # (1 + 1)^-0.5


def test_bad_schedule_settings():
    with pytest.raises(ConfigError, match="schedule.mode"):
        Schedule(mode="eventually")
    with pytest.raises(ConfigError, match="semi_sync"):
        Schedule(mode="semi_sync")


@pytest.mark.parametrize("mode", ["semi_sync", "async"])
def test_modes_end_to_end(run_fedtune, mode):
    extra = ["schedule.min_clients=1"] if mode == "semi_sync" else ["schedule.buffer_size=1", "num_rounds=3"]
    _, out = run_fedtune("strategy=gradualdiff", f"schedule={mode}", "clients.speed.dist=choice",
                         "network=wan", *extra)
    rows = read_metrics(out)
    assert all(r["clients/aggregated"] == 1 for r in rows)
    assert all(r["time/sim_round_s"] > 0 for r in rows) and "comm/staleness_mean" in rows[-1]
    again = read_metrics(run_fedtune("strategy=gradualdiff", f"schedule={mode}", "clients.speed.dist=choice",
                                     "network=wan", *extra)[1])
    assert [r["time/sim_clock_s"] for r in rows] == [r["time/sim_clock_s"] for r in again]  # deterministic clock


def test_semi_sync_carry_end_to_end(run_fedtune):
    """Client 0 is 5x slower: its round-0 update is aggregated only once the clock passes its arrival."""
    _, out = run_fedtune("strategy=gradualdiff", "schedule=semi_sync", "schedule.min_clients=1",
                         "schedule.late=carry", "clients.speed.dist=choice", "clients.speed.choices=[1.0,5.0,1.0]",
                         "num_rounds=6", "eval.every=0", "eval.bleu_samples=0")
    rows = read_metrics(out)
    assert rows[0]["clients/participants"] == 2 and rows[0]["clients/aggregated"] == 1
    fast = rows[0]["time/sim_round_s"]  # the fast client's update (no network model: compute only)
    flops_per_s = float(OmegaConf.load(out / "config.yaml").clients.flops_per_s)
    arrival = 5.0 * (rows[0]["train/client_flops"] / flops_per_s - fast)  # the straggler's, from its FLOPs
    assert arrival > 4 * fast
    late = next(i for i, r in enumerate(rows) if r["comm/staleness_mean"] > 0)
    assert all(r["clients/participants"] == 1 for r in rows[1:late + 1])  # no new work while in flight
    assert rows[late - 1]["time/sim_clock_s"] < arrival <= rows[late]["time/sim_clock_s"]
    assert rows[late]["clients/aggregated"] == 2
    assert rows[late]["comm/staleness_mean"] == pytest.approx(late / 2)  # stale by `late` steps, and 0
