"""Mechanisms no other test guarded: each test here fails under a mutation of tests/mutations.toml
(`make mutation-check`) that survived the rest of the suite. Expectations are computed by hand or by
a second path, never read back from the code under test."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from conftest import FAST, read_metrics

from fedtune import checkpoint
from fedtune.client.runtime import ClientRuntime, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel, Message
from fedtune.seeding import derive_seed, sample_clients, seed_global

VOLATILE = ("time/", "mem/process")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _runtime(shards, seed=0) -> ClientRuntime:
    """A client runtime without a model: enough for strategies whose update never trains."""
    return ClientRuntime(model=None, data=None, shards=shards, local=LocalConfig(batch_size=1, lr=0.1),
                         store=ClientStore(), channel=Channel(), seed=seed, pad_id=0, device=torch.device("cpu"))


class Probe:
    """A strategy whose local update records what the client saw and draws from torch's global RNG."""

    def __init__(self):
        self.seen = []

    def local_update(self, client, message):
        self.seen.append({"id": client.client_id, "indices": list(client.indices), "budget": client.budget,
                          "draw": torch.rand(4)})
        return Message()


# ---- client runtime -------------------------------------------------------------------------------

def test_runtime_pools_the_shards_and_the_step_budget():
    shards = {0: [4, 0], 1: [7, 2, 5], 2: [9]}
    runtime, probe = _runtime(shards), Probe()
    runtime.run(probe, round_idx=0, client_id=-1, message=Message(pool=(0, 1)))  # the centralized trainer
    runtime.run(probe, round_idx=0, client_id=1, message=Message())  # a normal client: its own shard
    assert [(s["indices"], s["budget"]) for s in probe.seen] == [([0, 2, 4, 5, 7], 2), ([2, 5, 7], 1)]


def test_runtime_seeds_each_client_update_independently():
    """A client's random draws depend on (seed, round, client) only, not on who ran before it."""
    alone, after = Probe(), Probe()
    torch.manual_seed(0)
    _runtime({0: [0], 1: [1]}).run(alone, round_idx=0, client_id=1, message=Message())
    torch.manual_seed(0)
    runtime = _runtime({0: [0], 1: [1]})
    for cid in (0, 1):
        runtime.run(after, round_idx=0, client_id=cid, message=Message())
    runtime.run(after, round_idx=1, client_id=1, message=Message())
    _runtime({0: [0], 1: [1]}, seed=1).run(after, round_idx=0, client_id=1, message=Message())
    client0, client1, client1_next, client1_seed1 = (s["draw"] for s in after.seen)
    assert torch.equal(alone.seen[0]["draw"], client1)
    for other in (client0, client1_next, client1_seed1):  # another client, round or seed: other draws
        assert not torch.equal(other, client1)


# ---- the persistent baselines keep their optimizer ----------------------------------------------

def _adam_steps(entry) -> set[float]:
    return {float(s["step"]) for s in entry["optimizer"]["state"].values()}


def test_persistent_baselines_keep_adamw_state_across_rounds(run_fedtune):
    # FAST: 2 clients, 2 rounds, local.max_steps=3. Local: each client makes 3 steps a round, one AdamW
    # carried across rounds -> step 6 after round 1.
    _, out = run_fedtune("strategy=local")
    memory = checkpoint.load(out / "checkpoint")["store"]["memory"]
    assert sorted(memory) == [0, 1]
    assert all(_adam_steps(memory[c]) == {6.0} for c in (0, 1))
    # Centralized: one trainer on both shards, 3 x 2 steps a round -> 12 after two rounds.
    _, out = run_fedtune("strategy=centralized")
    assert [r["train/steps"] for r in read_metrics(out)] == [6, 6]
    memory = checkpoint.load(out / "checkpoint")["store"]["memory"]
    assert list(memory) == [-1] and _adam_steps(memory[-1]) == {12.0}


def test_error_feedback_setting_reaches_the_client_store(run_fedtune):
    _, out = run_fedtune("strategy=gradualdiff", "comm.up=topk0.1", "comm.error_feedback=true", "num_rounds=1")
    memory = checkpoint.load(out / "checkpoint")["store"]["memory"]
    assert sorted(memory) == [0, 1]
    for c in (0, 1):  # top-10% dropped 90% of each LoRA matrix's entries: they wait in the residual
        residual = memory[c]["ef_residual"]
        assert residual and any(r.abs().sum() > 0 for r in residual.values())


# ---- checkpoint and resume ----------------------------------------------------------------------

def test_checkpoint_latest_is_the_newest_round(tmp_path):
    for r in range(3):
        checkpoint.save(tmp_path, r, {"x": r}, keep_last=5)
    got = checkpoint.load(tmp_path)
    assert (got["round_idx"], got["x"]) == (2, 2)
    assert sorted(p.name for p in tmp_path.glob("round_*.pt")) == [f"round_0000{r}.pt" for r in range(3)]


def test_in_process_resume_is_exact_and_drops_rows_after_the_checkpoint(tmp_path):
    from fedtune.config import compose_config
    from fedtune.run import run

    common = [*FAST, "strategy=fedavg"]
    run(compose_config([*common, "num_rounds=3"]), out_dir=tmp_path / "reference")
    out = tmp_path / "resumed"
    run(compose_config([*common, "num_rounds=2"]), out_dir=out)
    with (out / "metrics.jsonl").open("a") as f:  # killed after logging round 2, before its checkpoint
        f.write(json.dumps({"round_idx": 2, "train/loss": 123.0}) + "\n")
    run(compose_config([*common, "num_rounds=3"]), out_dir=out, resume=True)
    rows = read_metrics(out)
    assert [r["round_idx"] for r in rows] == [0, 1, 2]
    assert _stable(rows) == _stable(read_metrics(tmp_path / "reference"))


def test_resume_restores_the_rng_states(tmp_path):
    """The RNG states saved with a checkpoint are the ones a resumed run continues from. The round loop
    draws from none of python's or numpy's global RNGs (every draw is derived from seed, round and
    client), so after one more round they are still exactly the saved ones."""
    from fedtune.config import compose_config
    from fedtune.run import run

    out = tmp_path / "run"
    run(compose_config([*FAST, "num_rounds=1"]), out_dir=out)
    saved = checkpoint.load(out / "checkpoint")["rng"]
    random.seed(12345)
    np.random.seed(12345)
    run(compose_config([*FAST, "num_rounds=2"]), out_dir=out, resume=True)
    assert random.getstate() == saved["python"]
    now = np.random.get_state()
    assert now[0] == saved["numpy"][0] and np.array_equal(now[1], saved["numpy"][1]) and now[2:] == saved["numpy"][2:]


# ---- the client store -----------------------------------------------------------------------------

def test_store_get_makes_an_entry_most_recently_used(tmp_path):
    store = ClientStore(max_memory_bytes=2 * 4000, spill_dir=tmp_path)  # room for two 1000-float entries
    for c in (0, 1):
        store.put(c, {"w": torch.full((1000,), float(c))})
    store.get(0)  # now 1 is the least recently used
    store.put(2, {"w": torch.full((1000,), 2.0)})
    assert [p.name for p in tmp_path.glob("client_*.pt")] == ["client_1.pt"]


# ---- seeding and client sampling ------------------------------------------------------------------

def test_seed_global_draws_as_torch_manual_seed_does():
    """The CPU shortcut seeds the same generator: dropout masks and torch.rand draws are torch.manual_seed's."""
    for device in ("cpu", "meta"):  # (another device type takes torch.manual_seed itself)
        torch.manual_seed(1)
        seed_global(123, torch.device(device))
        got = (torch.rand(5), torch.nn.functional.dropout(torch.ones(8), 0.5))
        torch.manual_seed(123)
        assert torch.equal(got[0], torch.rand(5)) and torch.equal(got[1], torch.nn.functional.dropout(torch.ones(8), 0.5))


def test_derive_seed_depends_on_every_key():
    keys = (7, 3, 11, 2)
    base = derive_seed(*keys)
    assert derive_seed(*keys) == base and 0 <= base < 2**63
    for i in range(len(keys)):
        changed = list(keys)
        changed[i] += 1
        assert derive_seed(*changed) != base, i


def test_sample_clients_draws_a_fresh_uniform_sample_each_round():
    rounds, n, k = 2000, 10, 3
    samples = [sample_clients(seed=0, round_idx=r, num_clients=n, clients_per_round=k) for r in range(rounds)]
    for s in samples:
        assert len(s) == k and s == sorted(set(s)) and all(0 <= c < n for c in s)
    assert samples[5] == sample_clients(seed=0, round_idx=5, num_clients=n, clients_per_round=k)
    # each client takes part in ~k/n of the rounds: binomial(2000, 0.3), sd ~20.5; 80 is ~4 sd
    counts = np.bincount([c for s in samples for c in s], minlength=n)
    assert np.all(np.abs(counts - rounds * k / n) < 80), counts
    # 2000 rounds of 3 out of 10 see nearly all 120 subsets; a sample fixed across rounds sees one
    assert len({tuple(s) for s in samples}) > 100
    other_seed = [sample_clients(seed=1, round_idx=r, num_clients=n, clients_per_round=k) for r in range(20)]
    assert other_seed != samples[:20]
    assert sample_clients(seed=0, round_idx=0, num_clients=4, clients_per_round=4) == [0, 1, 2, 3]


def test_clients_per_round_clients_take_part_each_round(run_fedtune, monkeypatch):
    """The round loop trains exactly the sampled clients: 2 of 3 each round, the ones sample_clients draws."""
    from fedtune.strategies.fedavg import FedAvg

    trained = []
    original = FedAvg.local_update

    def record(self, client, message):
        trained.append((client.round_idx, client.client_id))
        return original(self, client, message)

    monkeypatch.setattr(FedAvg, "local_update", record)
    _, out = run_fedtune("num_clients=3", "clients_per_round=2", "strategy=fedavg", "eval.every=0")
    assert [r["clients/participants"] for r in read_metrics(out)] == [2, 2]
    expect = [(r, c) for r in range(2) for c in sample_clients(seed=0, round_idx=r, num_clients=3, clients_per_round=2)]
    assert trained == expect


# ---- the channel ----------------------------------------------------------------------------------

def test_channel_delivers_meta_with_the_tensors():
    from fedtune.comm.spec import make_codec

    meta = {"num_examples": 30, "staleness": 2, "note": "x" * 100}
    for spec in ("none", "topk0.1+int8"):
        channel = Channel(up=make_codec(spec))
        msg = Message(tensors={"w": torch.randn(32, 32)}, meta=meta)
        assert channel.send(msg, round_idx=0, client_id=0, direction="up").meta == meta
        # the meta is counted: a 100-character shorter note costs 100 bytes less, give or take the
        # header's padding to a multiple of 8 bytes (safetensors)
        short = Message(tensors=msg.tensors, meta={**meta, "note": ""})
        channel.send(short, round_idx=0, client_id=0, direction="up")
        assert abs(channel.transfers[0].num_bytes - channel.transfers[1].num_bytes - 100) < 8
    # meta alone (no tensors) still travels
    assert Channel().send(Message(meta={"k": 1}), round_idx=0, client_id=0, direction="down").meta == {"k": 1}


# ---- partitioners ---------------------------------------------------------------------------------

def test_dirichlet_redraws_until_every_client_has_min_size():
    from fedtune.data.partition import Dirichlet

    examples = [{"label": i % 10} for i in range(600)]
    for seed in range(3):
        parts = Dirichlet(alpha=0.3, min_size=25, max_tries=1000)(examples, num_clients=10, seed=seed)
        assert min(map(len, parts)) >= 25, sorted(map(len, parts))
        assert sorted(i for p in parts for i in p) == list(range(600))
