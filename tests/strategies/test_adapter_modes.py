"""lora.mode=ffa|sb|alt with FedAvg on the tiny model: what crosses the wire, exact aggregation, bytes by hand."""

import copy

import pytest
import torch
from conftest import FAST, read_metrics

from fedtune.client.store import ClientStore
from fedtune.config import compose_config, validate
from fedtune.errors import ConfigError
from fedtune.models.lora import frozen_keys, get_frozen_state, get_trainable_state, set_trainable_state
from fedtune.strategies.base import check_exchange
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.kd import KD
from fedtune.world import build_world, client_runtime, make_channel

BASE = [*FAST, "lora.modules_to_save=[]", "lora.dropout=0"]
R = 8  # conf/lora/default.yaml
HEADER_PER_TENSOR = 200  # safetensors: a JSON entry per tensor (long peft names) bounds the overhead


class Sim:
    """The runner's round on one process (sequential engine), with the channel, minus logging."""

    def __init__(self, *overrides):
        cfg = compose_config([*BASE, *overrides])
        self.world = build_world(cfg, device=torch.device("cpu"))
        self.strategy, self.model = self.world.strategy, self.world.model
        self.channel = make_channel(cfg)
        self.runtime = client_runtime(cfg, self.world, store=ClientStore(), channel=self.channel)

    def round(self, round_idx, clients=(0, 1), messages=None):
        s = self.strategy
        messages = messages or s.broadcast(round_idx, list(clients))
        downs, ups = {}, {}
        for cid, msg in messages.items():
            downs[cid] = self.channel.send(msg, round_idx=round_idx, client_id=cid, direction="down")
            result = self.runtime.run(s, round_idx=round_idx, client_id=cid, message=downs[cid])
            ups[cid] = self.channel.send(result.take_message(), round_idx=round_idx, client_id=cid, direction="up")
        s.aggregate(round_idx, {cid: s.fold(round_idx, cid, m) for cid, m in ups.items()})
        return downs, ups

    def up_bytes(self, round_idx, cid):
        return self.channel.bytes_by_client(round_idx)[(cid, "up")]


def _mean(replies, key):
    n = {cid: m.meta["num_examples"] for cid, m in replies.items()}
    return sum(n[c] * replies[c].tensors[key].double() for c in replies) / sum(n.values())


def _data_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values())


# ---- FFA-LoRA

def test_ffa_sends_b_only_keeps_a_and_averages_exactly():
    sim = Sim("lora.mode=ffa")
    a0 = get_frozen_state(sim.model)
    assert a0 and all(".lora_A." in k for k in a0)
    downs, ups = sim.round(0)
    for msg in [*downs.values(), *ups.values()]:
        assert msg.tensors.keys() == {k.replace("lora_A", "lora_B") for k in a0}  # only B, both ways
    assert all(torch.equal(a0[k], v) for k, v in get_frozen_state(sim.model).items())  # A never trained
    # the same A in every process: a second world (another worker, same config) built it identically
    assert all(torch.equal(a0[k], v) for k, v in get_frozen_state(Sim("lora.mode=ffa").model).items())
    for kb, b in sim.strategy.global_state.items():  # (mean B_i) A == mean (B_i A), by a second path
        ka = kb.replace("lora_B", "lora_A")
        products = {c: type(m)(tensors={"w": m.tensors[kb] @ a0[ka]}, meta=m.meta) for c, m in ups.items()}
        assert torch.allclose((b @ a0[ka]).double(), _mean(products, "w"), atol=1e-6)


def test_ffa_uplink_is_the_b_bytes_counted_by_hand():
    ab, ffa = Sim(), Sim("lora.mode=ffa")
    ab.round(0)
    ffa.round(0)
    data_ab = _data_bytes(get_trainable_state(ab.model))
    data_ffa = _data_bytes(get_trainable_state(ffa.model))
    # tiny (hidden 128, mlp 256, r 8): per layer A = 8192, B = 9216 values (gate/up's B are 256 x 8)
    assert (data_ab, data_ffa) == (4 * 4 * (8192 + 9216), 4 * 4 * 9216)
    n = len(get_trainable_state(ffa.model))
    got_ab, got_ffa = ab.up_bytes(0, 0), ffa.up_bytes(0, 0)
    assert data_ffa < got_ffa < data_ffa + n * HEADER_PER_TENSOR
    assert data_ab < got_ab < data_ab + 2 * n * HEADER_PER_TENSOR
    assert got_ffa / got_ab == pytest.approx(9216 / (8192 + 9216), abs=0.01)  # ~half


# ---- Fed-SB

@pytest.mark.parametrize("init", ["identity", "svd"])
def test_sb_switch_keeps_the_model_and_then_only_r_crosses(init):
    sim = Sim("lora.mode=sb", f"lora.sb_init={init}")
    _, ups = sim.round(0)
    ab_keys = set(sim.strategy.global_state)
    ab = {k: v.clone() for k, v in sim.strategy.global_state.items()}
    assert all(ups[0].tensors.keys() == ab_keys for _ in ups)  # round 0: plain LoRA
    set_trainable_state(sim.model, sim.strategy.global_state)
    ids = torch.tensor([sim.world.task.eval.input_ids[0].tolist()])
    with torch.no_grad():
        before = sim.model(input_ids=ids).logits
    messages = sim.strategy.broadcast(1, [0, 1])  # the switch: A, B frozen, R = I or B A re-factored
    r_keys = set(sim.strategy.global_state)
    assert r_keys and all(k.endswith(".lora_B.default.R.weight") for k in r_keys)
    assert frozen_keys(sim.model) == ab_keys
    frozen = get_frozen_state(sim.model)
    if init == "identity":
        assert all(torch.equal(v, torch.eye(R)) for v in sim.strategy.global_state.values())
        assert all(torch.equal(frozen[k], ab[k]) for k in ab_keys)
    for rk, r in sim.strategy.global_state.items():
        bk = rk.replace(".lora_B.default.R.weight", ".lora_B.weight")
        ak = bk.replace("lora_B", "lora_A")
        b2, a2 = frozen[bk].double(), frozen[ak].double()
        assert torch.allclose(b2 @ r.double() @ a2, ab[bk].double() @ ab[ak].double(), atol=1e-6)  # the same weight
        if init == "svd":  # orthonormal factors; R the singular values of B A (a second path: svdvals)
            assert torch.allclose(b2.T @ b2, torch.eye(R, dtype=torch.float64), atol=1e-5)
            assert torch.allclose(a2 @ a2.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
            s = torch.linalg.svdvals(ab[bk].double() @ ab[ak].double())[:R]
            assert torch.allclose(r.double(), torch.diag(s), atol=1e-6)
            assert s[0] > 0
    set_trainable_state(sim.model, sim.strategy.global_state)
    with torch.no_grad():
        after = sim.model(input_ids=ids).logits
    assert torch.equal(after, before) if init == "identity" else torch.allclose(after, before, atol=1e-5)
    assert messages[0].tensors.keys() == ab_keys | r_keys  # first contact: the frozen factors once
    downs, ups = sim.round(1, messages=messages)
    for cid, m in ups.items():
        assert m.tensors.keys() == r_keys and all(v.shape == (R, R) for v in m.tensors.values())
        assert len(r_keys) * R * R * 4 < sim.up_bytes(1, cid) < len(r_keys) * (R * R * 4 + HEADER_PER_TENSOR)
    for k, v in sim.strategy.global_state.items():  # FedAvg of R: B (mean R_i) A == mean B R_i A
        assert torch.allclose(v.double(), _mean(ups, k), atol=1e-6)
    downs, _ = sim.round(2)
    assert downs[0].tensors.keys() == r_keys  # the factors were sent once


def test_sb_server_holds_the_factors_its_clients_decoded():
    """With a lossy downlink the server freezes what the clients decode (not the exact aggregate), so the
    global R is evaluated on the same B, A the clients train with."""
    sim = Sim("lora.mode=sb", "comm.down=int8")
    sim.round(0)
    exact = {k: v.clone() for k, v in sim.strategy.global_state.items()}
    messages = sim.strategy.broadcast(1, [0, 1])
    server = get_frozen_state(sim.model)
    down = sim.channel.send(messages[0], round_idx=1, client_id=0, direction="down")
    assert all(torch.equal(down.tensors[k], server[k]) for k in server)
    assert any(not torch.equal(exact[k], server[k]) for k in server)  # int8 did change them
    worker = Sim("lora.mode=sb", "comm.down=int8")  # another process's resident model: still plain LoRA
    worker.runtime.run(sim.strategy, round_idx=1, client_id=0, message=down)
    loaded = get_frozen_state(worker.model)
    assert loaded.keys() == server.keys() and all(torch.equal(v, server[k]) for k, v in loaded.items())
    sim.round(1, messages=messages)
    entry = sim.runtime.store.get(1)["sb_factors"]
    assert all(torch.equal(entry[k], server[k]) for k in server)
    restored = Sim("lora.mode=sb", "comm.down=int8")  # resume: a fresh server process loads the checkpoint
    restored.strategy.load_state_dict(sim.strategy.state_dict())
    again = get_frozen_state(restored.model)
    assert again.keys() == server.keys() and all(torch.equal(v, server[k]) for k, v in again.items())


def test_sb_end_to_end_three_rounds(run_fedtune):
    _, out = run_fedtune("lora.mode=sb", "num_rounds=3", "lora.modules_to_save=[]", "local.max_steps=5")
    rows = read_metrics(out)
    losses = [r["eval/loss"] for r in rows]
    assert losses[0] > losses[1] > losses[2], losses
    modules = 4 * 7  # tiny: 4 layers x 7 target modules
    for r in rows[1:]:  # R only: r*r*4 bytes a module, each of 2 clients
        assert 2 * modules * R * R * 4 < r["comm/up_bytes"] < 2 * modules * (R * R * 4 + HEADER_PER_TENSOR)
    assert rows[1]["comm/down_bytes"] > rows[0]["comm/down_bytes"] > 20 * rows[2]["comm/down_bytes"]


# ---- alternating (lora.mode=alt)

@pytest.mark.parametrize("strategy", ["fedavg", "gradualdiff"])
def test_alt_trains_and_sends_b_then_a_and_averages_exactly(strategy):
    """Round 0: only B crosses (both ways with down_delta after the first contact), A stays; round 1: only
    A, B stays; each new factor is the mean of the clients' (FedAvg: states; GradualDiff: global + mean
    delta), so the product is exact against the idle factor every client shared."""
    sim = Sim("lora.mode=alt", f"strategy={strategy}", "strategy.weighting=examples")
    start = {k: v.clone() for k, v in sim.strategy.global_state.items()}
    a_keys = {k for k in start if ".lora_A." in k}
    b_keys = {k for k in start if ".lora_B." in k}
    assert a_keys and b_keys and start.keys() == a_keys | b_keys
    for round_idx, (trained, idle) in enumerate([(b_keys, a_keys), (a_keys, b_keys), (b_keys, a_keys)]):
        before = {k: v.clone() for k, v in sim.strategy.global_state.items()}
        downs, ups = sim.round(round_idx)
        assert all(m.meta["alt"] == ("B" if trained is b_keys else "A") for m in downs.values())
        assert all(m.tensors.keys() == trained for m in ups.values())  # only the round's factor goes up
        after = sim.strategy.global_state
        assert after.keys() == start.keys()
        assert all(torch.equal(after[k], before[k]) for k in idle)  # the idle factor is as it was
        assert all(not torch.equal(after[k], before[k]) for k in trained)  # the trained one moved
        for k in trained:  # by hand: FedAvg the mean state, GradualDiff the global plus the mean delta
            want = _mean(ups, k) + (before[k].double() if strategy == "gradualdiff" else 0)
            assert torch.allclose(after[k].double(), want, atol=1e-6)
        for kb in b_keys:  # exact: mean_i(B_i) A == mean_i(B_i A) and B mean_i(A_i) == mean_i(B A_i)
            ka = kb.replace("lora_B", "lora_A")
            base = {k: before[k] if strategy == "gradualdiff" else 0 for k in (ka, kb)}  # deltas: + global
            prods = {}
            for c, m in ups.items():
                b_i = m.tensors[kb] + base[kb] if trained is b_keys else before[kb]
                a_i = m.tensors[ka] + base[ka] if trained is a_keys else before[ka]
                prods[c] = type(m)(tensors={"w": b_i @ a_i}, meta=m.meta)
            assert torch.allclose((after[kb] @ after[ka]).double(), _mean(prods, "w"), atol=1e-5)
    assert frozen_keys(sim.model) == frozenset()  # both factors trainable again between rounds (eval, load)


def test_alt_uplink_is_about_half_of_plain_lora_and_down_delta_skips_the_idle_factor():
    ab, alt = Sim(), Sim("lora.mode=alt", "comm.down_delta=true")
    ab.round(0)
    _, ups0 = alt.round(0)
    # tiny (hidden 128, mlp 256, r 8): per layer A = 8192, B = 9216 values: round 0 sends B
    assert ab.up_bytes(0, 0) > alt.up_bytes(0, 0) > 4 * 4 * 9216
    assert alt.up_bytes(0, 0) / ab.up_bytes(0, 0) == pytest.approx(9216 / (8192 + 9216), abs=0.01)
    b_keys = set(ups0[0].tensors.keys())
    a_keys = {k.replace("lora_B", "lora_A") for k in b_keys}
    assert b_keys and all(".lora_B." in k for k in b_keys)
    for round_idx in range(1, 6):  # down: only what the last round changed, never the idle factor again
        downs, ups = alt.round(round_idx)
        changed, trained = (b_keys, a_keys) if round_idx % 2 else (a_keys, b_keys)
        assert all(m.tensors.keys() == changed for m in downs.values()), round_idx
        assert all(m.meta["down"] == "delta" for m in downs.values())
        assert ups[0].tensors.keys() == trained
        for cid in (0, 1):  # the client trains from the global state (to a rounding: held + delta)
            held = alt.runtime.store.get(cid)["down_held"]
            assert all(torch.allclose(held[k], alt.strategy._last_global[k], atol=1e-6) for k in held)


def test_down_delta_sends_a_tensor_the_server_changed_back_to_an_earlier_value():
    """Versions follow changes of value between broadcasts: a tensor changed and changed back is sent."""
    sim = Sim("comm.down_delta=true")
    sim.round(0)
    s = sim.strategy
    assert s.broadcast(1, [0])[0].tensors.keys() == s.global_state.keys()  # round 0 changed every tensor
    key = next(iter(s.global_state))
    s.global_state = {**s.global_state, key: s.global_state[key] + 1.0}  # (broadcasts without rounds)
    assert s.broadcast(2, [0])[0].tensors.keys() == {key}
    s.global_state = {**s.global_state, key: s.global_state[key] - 1.0}
    assert s.broadcast(3, [0])[0].tensors.keys() == {key}
    assert s.broadcast(4, [0])[0].tensors == {}


def test_down_delta_leaves_out_a_rounding_of_a_version_the_client_holds_also_after_resume():
    """The client's copy of an unchanged tensor off by an ulp (as ``held + delta`` can be): not sent, and
    the versions come back with the strategy's state (a resumed server sends the same)."""
    sim = Sim("comm.down_delta=true")
    sim.round(0)
    s = sim.strategy
    s.broadcast(1, [0])  # client 0 now holds every tensor's version
    key = next(iter(s.global_state))
    s._held[0][key] = torch.nextafter(s._held[0][key], s._held[0][key] + 1)  # one ulp off the global value
    resumed = Sim("comm.down_delta=true").strategy
    resumed.load_state_dict(copy.deepcopy(s.state_dict()))
    for strategy in (resumed, s):
        assert strategy.broadcast(2, [0])[0].tensors == {}


def test_alt_end_to_end_learns(run_fedtune):
    _, out = run_fedtune("lora.mode=alt", "num_rounds=4", "lora.modules_to_save=[]", "local.max_steps=5")
    losses = [r["eval/loss"] for r in read_metrics(out)]
    assert losses[-1] < losses[1] < losses[0], losses


# ---- which strategies, which settings

def test_modes_are_checked_against_the_strategy_and_the_config():
    check_exchange(FedAvg(), lora_mode="sb", down_delta=True, schedule="sync")
    with pytest.raises(ConfigError, match="lora.mode=ffa"):
        check_exchange(KD(), lora_mode="ffa", down_delta=False, schedule="sync")
    with pytest.raises(ConfigError, match="comm.down_delta"):
        check_exchange(KD(), lora_mode="lora", down_delta=True, schedule="sync")
    with pytest.raises(ConfigError, match="lora.mode=sb.*schedule=sync"):
        check_exchange(FedAvg(), lora_mode="sb", down_delta=False, schedule="async")
    with pytest.raises(ConfigError, match="lora.mode=alt.*schedule=sync"):
        check_exchange(FedAvg(), lora_mode="alt", down_delta=False, schedule="semi_sync")
    with pytest.raises(ConfigError, match="lora.mode=alt"):
        check_exchange(KD(), lora_mode="alt", down_delta=False, schedule="sync")
    with pytest.raises(ConfigError, match="lora.mode=bogus"):
        validate(compose_config([*FAST, "lora.mode=bogus"]))
    with pytest.raises(ConfigError, match="lora.sb_init=qr"):
        validate(compose_config([*FAST, "lora.mode=sb", "lora.sb_init=qr"]))
    with pytest.raises(ConfigError, match="lora.mode=ffa needs LoRA"):
        validate(compose_config([*FAST, "lora.mode=ffa", "lora.enabled=false"]))
    with pytest.raises(ConfigError, match="comm.down_delta"):
        validate(compose_config([*FAST, "comm.down_delta=3"]))
    with pytest.raises(ConfigError, match="lora.mode=ffa"):  # wired into the build
        build_world(compose_config([*FAST, "strategy=fedcybgd", "lora.mode=ffa"]), device=torch.device("cpu"))
