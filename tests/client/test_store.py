"""The client store: LRU spill to disk above a size limit, exact round trip."""

import pytest
import torch

from fedtune.client.store import ClientStore


def test_spills_least_recently_used_and_restores_exactly(tmp_path):
    store = ClientStore(max_memory_bytes=2 * 4000, spill_dir=tmp_path)  # room for two 1000-float entries
    states = {c: {"trainable": {"w": torch.full((1000,), float(c))}} for c in range(4)}
    for c, st in states.items():
        store.put(c, st)
    assert store.memory_bytes() <= 8000 and len(store) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_0.pt", "client_1.pt"]
    got = store.get(0)  # comes back from disk, and pushes another entry out
    assert torch.equal(got["trainable"]["w"], states[0]["trainable"]["w"])
    assert not (tmp_path / "client_0.pt").exists() and store.memory_bytes() <= 8000
    assert {c: torch.equal(store.get(c)["trainable"]["w"], states[c]["trainable"]["w"]) for c in store.ids()} \
        == {0: True, 1: True, 2: True, 3: True}
    assert store.get(99) == {}


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/process"))} for r in rows]


def test_spilling_run_equals_unspilled_run_and_resumes_exactly(run_fedtune, tmp_path):
    from conftest import FAST, read_metrics

    from fedtune.config import compose_config
    from fedtune.run import run

    common = ("strategy=local", "num_clients=3", "num_rounds=3")
    _, whole = run_fedtune(*common, "store.max_memory_mb=null")
    _, spilled = run_fedtune(*common, "store.max_memory_mb=0.5")  # adapters + AdamW of 3 clients > 0.5 MB
    assert list((spilled / "client_store").glob("client_*.pt"))
    assert _stable(read_metrics(spilled)) == _stable(read_metrics(whole))
    # the checkpoint keeps spilled clients as files beside it, and a resume from it is exact
    assert list((spilled / "checkpoint").glob("round_*.store/client_*.pt"))
    out = tmp_path / "resumed"
    run(compose_config([*FAST, *common, "num_rounds=2", "store.max_memory_mb=0.5"]), out_dir=out)
    run(compose_config([*FAST, *common, "store.max_memory_mb=0.5"]), out_dir=out, resume=True)
    assert _stable(read_metrics(out)) == _stable(read_metrics(whole))


def test_checkpoint_state_does_not_load_spilled_entries(tmp_path, monkeypatch):
    from fedtune import checkpoint

    store = ClientStore(max_memory_bytes=4000, spill_dir=tmp_path / "spill")  # room for one entry
    states = {c: {"trainable": {"w": torch.full((1000,), float(c))}} for c in range(4)}
    for c, st in states.items():
        store.put(c, st)
    assert len(store._on_disk) == 3
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a spilled entry was loaded"))
    checkpoint.save(tmp_path / "ckpt", 0, {"x": 1}, keep_last=1, store=store)
    monkeypatch.setattr(torch, "load", real_load)
    assert sorted(p.name for p in (tmp_path / "ckpt" / "round_00000.store").iterdir()) == \
        ["client_0.pt", "client_1.pt", "client_2.pt"]
    ckpt = checkpoint.load(tmp_path / "ckpt")
    restored = ClientStore(max_memory_bytes=4000, spill_dir=tmp_path / "spill2")
    restored.load_state_dict(ckpt["store"], base=tmp_path / "ckpt")
    assert restored.ids() == [0, 1, 2, 3]
    for c in range(4):
        assert torch.equal(restored.get(c)["trainable"]["w"], states[c]["trainable"]["w"])
    # the original store keeps working after the checkpoint linked its files, and a second checkpoint
    # prunes the first one's files with it
    assert torch.equal(store.get(0)["trainable"]["w"], states[0]["trainable"]["w"])
    checkpoint.save(tmp_path / "ckpt", 1, {"x": 2}, keep_last=1, store=store)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "round_00001.pt", "round_00001.store"]


def test_local_evaluates_clients_one_at_a_time_from_a_spilling_store(tmp_path):
    """The local baseline's eval states are read from the store on access: with the store's limit at
    two entries, walking 6 clients never holds more than the limit plus the one being evaluated."""
    from fedtune.strategies.local import Local

    store = ClientStore(max_memory_bytes=2 * 4000, spill_dir=tmp_path)
    for c in range(6):
        store.put(c, {"trainable": {"w": torch.full((1000,), float(c))}})
    strategy = Local()
    strategy.setup(initial_state={"w": torch.zeros(1000)}, num_clients=6)
    states = strategy.eval_states(store)
    assert list(states) == [f"client{c}" for c in range(6)] and len(states) == 6
    for name, state in states.items():
        assert torch.equal(state["w"], torch.full((1000,), float(name[len("client"):])))
        assert store.memory_bytes() <= 8000  # the store spilled another entry to make room
    assert "client9" not in states and "global" not in states
    store.put(0, {"trainable": {"w": torch.full((1000,), 7.0)}})  # read on access, not copied up front
    assert torch.equal(states["client0"]["w"], torch.full((1000,), 7.0))
    assert Local().eval_states.__func__(strategy, ClientStore()) == {"global": strategy.global_state}
