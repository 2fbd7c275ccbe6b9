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
