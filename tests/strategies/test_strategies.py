"""Strategies with fake clients: hand-computed 2-client rounds."""

from types import SimpleNamespace

import pytest
import torch
from fakes import FakeClient, one_round

from fedtune.client.store import ClientStore
from fedtune.errors import ConfigError
from fedtune.strategies.centralized import TRAINER_ID, Centralized
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.gradualdiff import GradualDiff
from fedtune.strategies.local import Local

INIT = {"w": torch.tensor([1.0, 2.0])}
ASYNC = SimpleNamespace(synchronous=False)  # the server context of a schedule=async|semi_sync run


def _clients():
    # client 0: +1.0 on 10 examples; client 1: +4.0 on 30 examples
    return {0: FakeClient(0, 1.0, 10), 1: FakeClient(1, 4.0, 30)}


def test_fedavg_two_clients_by_hand():
    s = FedAvg(weighting="examples")
    s.setup(initial_state=INIT, num_clients=2)
    _, replies = one_round(s, _clients())
    assert torch.equal(replies[1].tensors["w"], torch.tensor([5.0, 6.0]))  # uploads the trained state
    assert replies[1].meta == {"num_examples": 30}
    # (10 * [2, 3] + 30 * [5, 6]) / 40 = [4.25, 5.25]
    assert torch.allclose(s.global_state["w"], torch.tensor([4.25, 5.25]))


def test_gradualdiff_two_clients_by_hand():
    s = GradualDiff(server_lr=0.5, weighting="uniform")
    s.setup(initial_state=INIT, num_clients=2)
    _, replies = one_round(s, _clients())
    assert torch.equal(replies[0].tensors["w"], torch.tensor([1.0, 1.0]))  # uploads the delta
    # mean delta = (1 + 4) / 2 = 2.5; theta += 0.5 * 2.5
    assert torch.allclose(s.global_state["w"], torch.tensor([2.25, 3.25]))


def test_fedavg_equals_gradualdiff_with_server_lr_1_and_same_weights():
    torch.manual_seed(0)
    init = {"a": torch.randn(4, 3), "b": torch.randn(7)}
    for weighting in ("examples", "uniform"):
        fa, gd = FedAvg(weighting=weighting), GradualDiff(server_lr=1.0, weighting=weighting)
        fa.setup(initial_state=init, num_clients=3)
        gd.setup(initial_state=init, num_clients=3)
        for r in range(3):
            clients = {c: FakeClient(c, 0.1 * (c + 1) * (r + 1), 5 + 10 * c) for c in range(3)}
            one_round(fa, clients, r)
            clients = {c: FakeClient(c, 0.1 * (c + 1) * (r + 1), 5 + 10 * c) for c in range(3)}
            one_round(gd, clients, r)
        for k in init:
            assert torch.allclose(fa.global_state[k], gd.global_state[k], atol=1e-6)


def test_centralized_pools_the_round_and_sends_nothing():
    s = Centralized()
    s.setup(initial_state=INIT, num_clients=3)
    messages = s.broadcast(0, [0, 1, 2])
    assert list(messages) == [TRAINER_ID] and messages[TRAINER_ID].pool == (0, 1, 2)
    assert messages[TRAINER_ID].is_empty()
    trainer = FakeClient(TRAINER_ID, 1.0, 99)
    assert s.local_update(trainer, messages[TRAINER_ID]).is_empty()
    assert s.local_update(trainer, messages[TRAINER_ID]).is_empty()  # continues from its own state
    assert torch.equal(trainer.state["trainable"]["w"], torch.tensor([3.0, 4.0]))
    store = ClientStore()
    store.put(TRAINER_ID, trainer.state)
    assert torch.equal(s.eval_states(store)["global"]["w"], torch.tensor([3.0, 4.0]))


def test_local_keeps_each_client_separate():
    s = Local()
    s.setup(initial_state=INIT, num_clients=2)
    clients, store = _clients(), ClientStore()
    for _ in range(2):
        for cid, msg in s.broadcast(0, [0, 1]).items():
            assert msg.is_empty()
            s.local_update(clients[cid], msg)
            store.put(cid, clients[cid].state)
    states = s.eval_states(store)
    assert torch.equal(states["client0"]["w"], torch.tensor([3.0, 4.0]))
    assert torch.equal(states["client1"]["w"], torch.tensor([9.0, 10.0]))


def test_bad_strategy_settings():
    with pytest.raises(ConfigError, match="strategy.weighting"):
        FedAvg(weighting="median")
    with pytest.raises(ConfigError, match="strategy.server_lr"):
        GradualDiff(server_lr=0)


def test_stale_deltas_count_less_in_absolute_terms():
    from fedtune.comm.channel import Message

    # the schedule's staleness weights (schedule.staleness_exponent=0.5): (1 + 0)^-0.5 = 1, (1 + 3)^-0.5 = 0.5
    s = GradualDiff(server_lr=1.0, weighting="uniform")
    s.setup(initial_state={"w": torch.tensor([0.0])}, num_clients=2, server=ASYNC)
    replies = {0: Message(tensors={"w": torch.tensor([2.0])}, meta={"num_examples": 1, "staleness": 0,
                                                                    "staleness_weight": 1.0}),
               1: Message(tensors={"w": torch.tensor([4.0])}, meta={"num_examples": 1, "staleness": 3,
                                                                    "staleness_weight": 0.5})}
    s.aggregate(0, replies)
    # 0.5 * 2 + 0.5 * (1 + 3)^-0.5 * 4 = 1 + 1 = 2
    assert torch.allclose(s.global_state["w"], torch.tensor([2.0]))
    f = FedAvg(weighting="uniform")  # staleness_exponent=1.0: (1 + 1)^-1 = 0.5
    f.setup(initial_state={"w": torch.tensor([10.0])}, num_clients=2, server=ASYNC)
    f.aggregate(0, {0: Message(tensors={"w": torch.tensor([0.0])}, meta={"num_examples": 1, "staleness": 1,
                                                                        "staleness_weight": 0.5})})
    # a = 1 * (1 + 1)^-1 = 0.5 -> 0.5 * 0 + 0.5 * 10
    assert torch.allclose(f.global_state["w"], torch.tensor([5.0]))


@pytest.mark.parametrize("fold", [False, True], ids=["whole", "folded"])
def test_fedavg_and_gradualdiff_fold_replies_as_they_arrive(fold):
    """Sync rounds fold each reply into a running mean as it arrives (the server then holds one
    accumulator, not every update): the same numbers by hand as above, with the tensors dropped."""
    fa, gd = FedAvg(weighting="examples"), GradualDiff(server_lr=0.5, weighting="uniform")
    for s in (fa, gd):
        s.setup(initial_state=INIT, num_clients=2)
    one_round(fa, _clients(), fold=fold)
    one_round(gd, _clients(), fold=fold)
    assert torch.equal(fa.global_state["w"], torch.tensor([4.25, 5.25]))
    assert torch.equal(gd.global_state["w"], torch.tensor([2.25, 3.25]))
    reply = fa.local_update(FakeClient(0, 1.0, 10), fa.broadcast(1, [0])[0])
    held = fa.fold(1, 0, reply)
    assert held.tensors == {} and held.meta == {"num_examples": 10, "folded": True}
    assert fa._running.count == 1 and fa._running.total == 10.0


def test_folding_matches_the_batch_mean_over_rounds():
    torch.manual_seed(1)
    init = {"a": torch.randn(5, 4), "b": torch.randn(9)}
    for cls in (FedAvg, GradualDiff):
        whole, folded = cls(weighting="examples"), cls(weighting="examples")
        whole.setup(initial_state=init, num_clients=4)
        folded.setup(initial_state=init, num_clients=4)
        for r in range(3):
            one_round(whole, {c: FakeClient(c, 0.37 * (c + 1) - r, 3 + 7 * c) for c in range(4)}, r)
            one_round(folded, {c: FakeClient(c, 0.37 * (c + 1) - r, 3 + 7 * c) for c in range(4)}, r, fold=True)
        for k in init:  # float64 accumulation either way: equal to fp32 rounding
            assert torch.allclose(whole.global_state[k], folded.global_state[k], rtol=0, atol=1e-6)


def test_async_rounds_keep_replies_whole():
    s = FedAvg()
    s.setup(initial_state=INIT, num_clients=2, server=ASYNC)
    reply = s.local_update(FakeClient(0, 1.0, 10), s.broadcast(0, [0])[0])
    assert s.fold(0, 0, reply) is reply  # staleness is known only when the schedule aggregates it


def test_sequential_engine_sends_each_update_up_before_the_next_client_trains():
    from fedtune.client.runtime import ClientResult
    from fedtune.engine.sequential import SequentialEngine

    events = []

    class Runtime:
        def run(self, strategy, *, round_idx, client_id, message):
            events.append(("train", client_id, message))
            return ClientResult(message=f"update {client_id}", report=None, seconds=0.0)

    engine = SequentialEngine()
    engine.start(Runtime())
    downloads = ((events.append(("down", cid, m)), (cid, m))[1] for cid, m in {3: "m3", 1: "m1"}.items())
    order = []
    for cid, result in engine.run_round(None, round_idx=0, downloads=downloads):
        events.append(("up", cid, result.take_message()))
        order.append(cid)
    assert events == [("down", 3, "m3"), ("train", 3, "m3"), ("up", 3, "update 3"),
                      ("down", 1, "m1"), ("train", 1, "m1"), ("up", 1, "update 1")]
    assert order == [3, 1]
