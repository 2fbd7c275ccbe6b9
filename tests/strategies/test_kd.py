"""KD-FedLLM: the public set, the logit maths, the bytes."""

import json
import math

import pytest
import torch
from conftest import FAST, read_metrics
from safetensors.torch import save

from fedtune.comm.channel import Message
from fedtune.data.schema import Splits
from fedtune.errors import ConfigError
from fedtune.models.lora import get_trainable_state
from fedtune.strategies.kd import KD


def test_public_set_is_carved_out_disjoint_and_deterministic():
    rows = [{"prompt": str(i), "response": "x"} for i in range(50)]
    a = KD(public_samples=10).prepare_splits(Splits(train=list(rows), eval=[]), seed=0)
    kd = KD(public_samples=10)
    b = kd.prepare_splits(Splits(train=list(rows), eval=[]), seed=0)
    assert len(b.train) == 40 and len(kd.public_examples) == 10
    assert {r["prompt"] for r in b.train}.isdisjoint({r["prompt"] for r in kd.public_examples})
    assert a.train == b.train


def test_aggregate_averages_tempered_probabilities_by_hand():
    kd = KD(public_samples=1, temperature=1.0, server_kd_steps=0, weighting="examples")
    kd.setup(initial_state={"w": torch.zeros(1)}, num_clients=2)
    # client 0 (10 examples): p = [0.25, 0.75]; client 1 (30 examples): p = [0.5, 0.5]
    replies = {0: Message(tensors={"logits": torch.tensor([[0.0, math.log(3.0)]])}, meta={"num_examples": 10}),
               1: Message(tensors={"logits": torch.tensor([[1.0, 1.0]])}, meta={"num_examples": 30})}
    kd.aggregate(0, replies)
    assert torch.allclose(kd.teacher, torch.tensor([[0.25 * 0.25 + 0.75 * 0.5, 0.25 * 0.75 + 0.75 * 0.5]]))
    down = kd.broadcast(1, [0])[0].tensors
    assert torch.equal(down["probs"], kd.teacher)  # the knowledge goes back down
    assert not any(k.startswith("adapter.") for k in down)  # downlink=logits: no weights


def test_topk_upload_and_reconstruction():
    kd = KD(public_samples=1, temperature=2.0, logit_topk=2, server_kd_steps=0)
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    up = kd._upload(logits)
    assert up["topk_indices"].dtype == torch.int32 and up["topk_indices"].tolist() == [[0, 2]]
    probs = kd._probs(up)
    expected = torch.softmax(torch.tensor([3.0, 2.0]) / 2.0, dim=0)
    assert torch.allclose(probs, torch.tensor([[expected[0], 0.0, expected[1], 0.0]]))


def test_bad_kd_settings():
    for kwargs, key in [({"public_samples": 0}, "strategy.public_samples"), ({"temperature": 0}, "strategy.temperature"),
                        ({"downlink": "x"}, "strategy.downlink"), ({"public_data": "nope"}, "strategy.public_data"),
                        ({"logit_topk": 0}, "strategy.logit_topk")]:
        with pytest.raises(ConfigError, match=key):
            KD(**kwargs)


def _public_positions(overrides):
    from fedtune.config import compose_config
    from fedtune.world import build_world

    world = build_world(compose_config([*FAST, *overrides]), device=torch.device("cpu"))
    kd = world.strategy
    return sum(int((lab[1:] != -100).sum()) for lab in kd.public.labels), len(world.tokenizer)


@pytest.mark.parametrize("topk", [None, 3])
def test_generation_logit_bytes_are_exact(run_fedtune, topk):
    overrides = ["strategy=kd", "strategy.public_samples=8", "strategy.server_kd_steps=2",
                 f"strategy.logit_topk={'null' if topk is None else topk}"]
    _, out = run_fedtune(*overrides)
    rows = read_metrics(out)
    n, vocab = _public_positions(overrides)
    meta = {"meta": json.dumps({"num_examples": 26}), "codec": "{}"}  # (60 - 8) / 2 clients
    if topk is None:
        per_client = len(save({"logits": torch.zeros(n, vocab)}, metadata=meta))
    else:
        per_client = len(save({"topk_values": torch.zeros(n, topk), "topk_indices": torch.zeros(n, topk, dtype=torch.int32),
                               "num_classes": torch.zeros(1, dtype=torch.long)}, metadata=meta))
    assert [r["comm/up_bytes"] for r in rows] == [2 * per_client] * 2
    assert rows[0]["comm/down_bytes"] == 0  # no knowledge yet in round 0
    assert rows[1]["comm/down_bytes"] > 0 and math.isfinite(rows[1]["train/server_kd_loss"])


# ---- the client side: clients distil back; which adapter a client starts from; the downlinks end to end


def _tiny_kd(**kwargs):
    from tiny_models import kd_with_teacher, one_shard_runtime, tiny_llama

    model = tiny_llama(False)
    return model, kd_with_teacher(model, **kwargs), one_shard_runtime


def _kl_to_teacher(kd, logits):
    return torch.nn.functional.kl_div(torch.log_softmax(logits / kd.temperature, dim=-1), kd.teacher,
                                      reduction="batchmean").item()


def test_clients_distil_towards_the_aggregated_knowledge():
    """Same batches, with and without the client KD term: the KD term changes the update and pulls the
    uploaded logits towards the teacher."""
    kl = {}
    for weight in (0.0, 5.0):
        model, kd, runtime = _tiny_kd(kd_weight=weight)
        reply = runtime(model, 4).run(kd, round_idx=1, client_id=0, message=kd.broadcast(1, [0])[0])
        kl[weight] = _kl_to_teacher(kd, reply.message.tensors["logits"])
        if weight:
            assert reply.report.terms["kd_loss"] > 0
        else:
            assert "kd_loss" not in reply.report.terms
    assert kl[5.0] < kl[0.0] - 1e-3, kl


@pytest.mark.parametrize("downlink", ["logits", "adapter", "both"])
def test_downlink_decides_what_the_client_starts_from(downlink):
    """No local steps: the uploaded logits are those of the state the client started from. ``adapter`` and
    ``both``: the global one sent down; ``logits``: the client's own, kept in its store."""
    from fedtune.strategies.kd import _rows

    model, kd, runtime = _tiny_kd(downlink=downlink)
    init = get_trainable_state(model)
    kd.global_state = {k: v + 0.01 for k, v in init.items()}
    own = {k: v - 0.01 for k, v in init.items()}
    rt = runtime(model, 0)
    rt.store.put(0, {"trainable": own})
    msg = kd.broadcast(1, [0])[0]
    assert any(k.startswith("adapter.") for k in msg.tensors) == (downlink != "logits")
    assert ("probs" in msg.tensors) == (downlink != "adapter")
    got = rt.run(kd, round_idx=1, client_id=0, message=msg).message.tensors["logits"]
    expected_state = own if downlink == "logits" else kd.global_state
    for k, v in get_trainable_state(model).items():
        assert torch.equal(v, expected_state[k]), k
    fresh = type(model)(model.config)
    fresh.load_state_dict(expected_state)
    with torch.no_grad():
        want = torch.cat([_rows(fresh(input_ids=ids[None]).logits, ids[None]) for ids in kd.public.input_ids])
    assert torch.allclose(got, want, atol=1e-5)


def _adapter_bytes(overrides, extra=None):
    from fedtune.config import compose_config
    from fedtune.world import build_world

    world = build_world(compose_config([*FAST, *overrides]), device=torch.device("cpu"))
    tensors = {f"adapter.{k}": torch.zeros_like(v) for k, v in get_trainable_state(world.model).items()}
    return len(save({**tensors, **(extra or {})}, metadata={"meta": "{}", "codec": "{}"}))


def test_adapter_and_both_downlinks_end_to_end(run_fedtune):
    common = ["strategy=kd", "strategy.public_samples=8", "strategy.server_kd_steps=2"]
    n, vocab = _public_positions(common)
    adapter = _adapter_bytes(common)
    both1 = _adapter_bytes(common, {"probs": torch.zeros(n, vocab)})
    rows = {d: read_metrics(run_fedtune(*common, f"strategy.downlink={d}")[1]) for d in ("adapter", "both")}
    # 2 clients; round 0 has no knowledge yet; from round 1 `both` sends the knowledge with the adapter
    assert [r["comm/down_bytes"] for r in rows["adapter"]] == [2 * adapter, 2 * adapter]
    assert [r["comm/down_bytes"] for r in rows["both"]] == [2 * adapter, 2 * both1]
    assert rows["adapter"][0]["comm/up_bytes"] == rows["both"][0]["comm/up_bytes"]  # logits up either way
    for r in (*rows["adapter"], *rows["both"]):
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["eval/loss"])
    assert "train/kd_loss" not in rows["adapter"][0] and math.isfinite(rows["both"][1]["train/kd_loss"])


def test_public_set_from_another_data_config_end_to_end(run_fedtune):
    """strategy.public_data=synthetic: the public set comes from conf/data/synthetic.yaml, the training split is
    not carved (all 60 examples stay with the clients), and the logits cover the public set's positions."""
    overrides = ["strategy=kd", "strategy.public_data=synthetic", "strategy.public_samples=8",
                 "strategy.server_kd_steps=2"]
    summary, out = run_fedtune(*overrides)
    rows = read_metrics(out)
    n, vocab = _public_positions(overrides)
    assert summary["data/train_examples"] == 60 and n > 0
    per_client = len(save({"logits": torch.zeros(n, vocab)},
                          metadata={"meta": json.dumps({"num_examples": 30}), "codec": "{}"}))
    assert [r["comm/up_bytes"] for r in rows] == [2 * per_client] * 2
    assert math.isfinite(rows[1]["train/server_kd_loss"]) and math.isfinite(rows[1]["train/kd_loss"])
