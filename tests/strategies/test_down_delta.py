"""comm.down_delta: the server sends each client global - what it holds, and tracks what it decoded."""

from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, read_metrics
from fakes import FakeClient

from fedtune.comm.channel import Channel
from fedtune.comm.spec import make_codec
from fedtune.config import compose_config
from fedtune.run import run
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.gradualdiff import GradualDiff

CODECS = ["int8", "topk0.1+int8", "randk0.2", "nf4", "bf16"]


def _init():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(16, 32, generator=g), "b": torch.randn(300, generator=g), "c": torch.randn(8, generator=g)}


def _strategy(cls, codec="int8", delta=True, init=None):
    s = cls()
    server = SimpleNamespace(synchronous=True, down_delta=delta, down_codec=make_codec(codec), lora_mode="lora")
    s.setup(initial_state=init or _init(), num_clients=3, server=server)
    return s


def _send(channel, messages, round_idx):
    return {cid: channel.send(m, round_idx=round_idx, client_id=cid, direction="down") for cid, m in messages.items()}


@pytest.mark.parametrize("cls", [FedAvg, GradualDiff])
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("wire", ["safetensors", "compact"])
def test_client_state_equals_the_servers_tracked_copy_bit_for_bit(cls, codec, wire):
    s = _strategy(cls, codec)
    channel = Channel(down=make_codec(codec), wire=wire)
    clients = {c: FakeClient(c, 0.01 * (c + 1), 10 + c) for c in range(3)}
    for round_idx, ids in enumerate([[0, 1], [0, 1], [1, 2], [0, 2]]):  # client 2 first appears in round 2
        downs = _send(channel, s.broadcast(round_idx, ids), round_idx)
        replies = {}
        for cid in ids:
            first = round_idx == 0 or (cid == 2 and round_idx == 2)
            assert downs[cid].meta["down"] == ("full" if first else "delta")
            if first:  # first contact: the full state, as the codec delivers it
                assert downs[cid].tensors.keys() == s.global_state.keys()
            replies[cid] = s.local_update(clients[cid], downs[cid])
            held = clients[cid].state["down_held"]
            assert held.keys() == s._held[cid].keys() == s.global_state.keys()
            assert all(torch.equal(held[k], s._held[cid][k]) for k in held), (round_idx, cid)
            if cls is FedAvg:  # the client trained from the state it holds
                assert all(torch.equal(replies[cid].tensors[k], held[k] + clients[cid].step) for k in held)
        s.aggregate(round_idx, {cid: s.fold(round_idx, cid, m) for cid, m in replies.items()})


def test_deltas_do_not_pile_up_errors_a_full_broadcast_keeps():
    """With a fixed global state and top-10% downlink, what the client holds converges to it under
    down_delta (each delta sends part of what is still missing); a full broadcast misses 90% forever."""
    errors = {}
    for delta in (True, False):
        s = _strategy(FedAvg, "topk0.1", delta=delta)
        channel, client = Channel(down=make_codec("topk0.1")), FakeClient(0, 0.0, 1)
        errors[delta] = []
        for round_idx in range(6):
            down = _send(channel, s.broadcast(round_idx, [0]), round_idx)[0]
            got = s.received(client, down).tensors
            errors[delta].append(float((got["a"] - s.global_state["a"]).norm() / s.global_state["a"].norm()))
    assert errors[False][0] == errors[False][-1] > 0.5
    assert errors[True][0] == errors[False][0]  # the first contact is a full broadcast
    assert all(b < a for a, b in zip(errors[True], errors[True][1:]))
    assert errors[True][-1] < 0.3 * errors[False][-1]


def test_unchanged_tensors_are_not_sent_so_bytes_drop():
    """A tensor the client already holds exactly is not sent (with a lossy codec, what it still lacks is)."""
    s = _strategy(FedAvg, "none")
    channel, client = Channel(), FakeClient(0, 0.0, 1)
    s.received(client, _send(channel, s.broadcast(0, [0]), 0)[0])
    s.global_state = {**s.global_state, "b": s.global_state["b"] + 1.0}  # only b changed since
    down = _send(channel, s.broadcast(1, [0]), 1)[0]
    assert down.tensors.keys() == {"b"}
    got = s.received(client, down).tensors
    assert got.keys() == s.global_state.keys() and torch.equal(got["a"], s._held[0]["a"])
    assert torch.equal(got["b"], s.global_state["b"])
    full, delta = (channel.bytes_by_client(r)[(0, "down")] for r in (0, 1))
    assert delta < 0.5 * full, (delta, full)


def test_a_state_of_other_keys_is_sent_whole():
    s = _strategy(FedAvg, "int8")
    client = FakeClient(0, 0.0, 1)
    s.received(client, s.broadcast(0, [0])[0])
    s.global_state = {"r": torch.eye(4)}  # Fed-SB's switch: the keys change
    message = s.broadcast(1, [0])[0]
    assert message.meta["down"] == "full" and message.tensors.keys() == {"r"}
    assert s.received(client, message).tensors.keys() == {"r"}


def test_off_by_default_sends_the_global_state_and_keeps_nothing():
    s = _strategy(FedAvg, "int8", delta=False)
    client = FakeClient(0, 0.5, 1)
    message = s.broadcast(0, [0])[0]
    assert message.meta == {} and message.tensors is s.global_state
    s.local_update(client, message)
    assert client.state == {}


# ---- end to end: bytes, and exact resume of the tables on both sides

FLEET = [*FAST, "num_clients=3", "clients_per_round=2", "lora.modules_to_save=[]", "lora.dropout=0"]


def test_down_delta_end_to_end_with_a_lossy_codec(run_fedtune):
    _, full = run_fedtune(*FLEET[len(FAST):], "comm.down=int2", "num_rounds=3")
    _, delta = run_fedtune(*FLEET[len(FAST):], "comm.down=int2", "num_rounds=3", "comm.down_delta=true")
    full_rows, delta_rows = read_metrics(full), read_metrics(delta)
    assert full_rows[0]["eval/loss"] == delta_rows[0]["eval/loss"]  # round 0: everyone's first contact
    # the same fixed-rate codec costs the same bytes (+ the meta flag) ...
    assert all(abs(d["comm/down_bytes"] - f["comm/down_bytes"]) < 200 for f, d in zip(full_rows, delta_rows))
    # ... but the clients train from (nearly) the global state, not a 2-bit copy of it
    assert delta_rows[-1]["train/loss"] != full_rows[-1]["train/loss"]


RESUME = {"down_delta": ["comm.down=int8", "comm.down_delta=true"], "sb": ["lora.mode=sb", "comm.down=int8"],
          # alternating factors, the idle one's error-feedback residual waiting in the store for its next round
          "alt": ["lora.mode=alt", "strategy=gradualdiff", "comm.up=sign", "comm.error_feedback=true",
                  "comm.down_delta=true"]}


@pytest.mark.parametrize("case", list(RESUME))
def test_resume_is_exact(tmp_path, case):
    """The server's tables (what each client holds; Fed-SB's factors) and the clients' store entries come
    back with the checkpoint: a run resumed after round 2 ends identical to an uninterrupted one."""
    overrides = [*FLEET, *RESUME[case]]
    run(compose_config([*overrides, "num_rounds=4"]), out_dir=tmp_path / "reference")
    out = tmp_path / "resumed"
    run(compose_config([*overrides, "num_rounds=2"]), out_dir=out)
    run(compose_config([*overrides, "num_rounds=4"]), out_dir=out, resume=True)
    stable = [[{k: v for k, v in r.items() if not k.startswith(("time/", "mem/process"))} for r in read_metrics(d)]
              for d in (out, tmp_path / "reference")]
    assert stable[0] == stable[1]
