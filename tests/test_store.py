"""The client store: LRU spill to disk above a size limit, exact round trip."""

import torch

from fedtune.engine.store import ClientStore


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
    assert {c: torch.equal(v["trainable"]["w"], states[c]["trainable"]["w"]) for c, v in store.state_dict().items()} \
        == {0: True, 1: True, 2: True, 3: True}
    assert store.get(99) == {}


def test_run_spills_with_a_small_limit(run_fedtune):
    summary, out = run_fedtune("strategy=local", "num_clients=3", "store.max_memory_mb=0.5")
    assert list((out / "client_store").glob("client_*.pt"))  # adapters + AdamW of 3 clients > 0.5 MB


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
