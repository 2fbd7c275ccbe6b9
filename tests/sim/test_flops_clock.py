"""Client FLOPs and the simulated clock, by independent hand counts.

FLOPs follow the project's convention: 6 x (parameters a token passes through) x tokens for a forward
and backward, 2 x for a forward alone. The parameter counts below come from the model config by hand.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, read_metrics
from tiny_models import INTER, LAYERS, H, T, V
from tiny_models import kd_with_teacher as _kd
from tiny_models import one_shard_runtime as _runtime
from tiny_models import tiny_llama as _llama

from fedtune.config import compose_config
from fedtune.data.format import collate
from fedtune.seeding import Purpose, generator
from fedtune.sim.clock import ClientProfile, client_time
from fedtune.tensors import module_parameters
from fedtune.train.local import batch_order, compute_params
from fedtune.world import build_world

# per layer: q, k, v, o (H x H) + gate, up, down (H x INTER) + 2 RMSNorm weights; then the final norm and
# the LM head (V x H, tied or not: a matmul for every token either way); the embedding is a lookup
PARAMS = LAYERS * (4 * H * H + 3 * H * INTER + 2 * H) + H + V * H


@pytest.mark.parametrize("tied", [True, False])
def test_compute_params_by_hand(tied):
    model = _llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert compute_params(model) == PARAMS


def test_compute_params_follows_a_change_of_structure():
    """The count is kept per model structure; dropping layers (FedCyBGD) and Fed-SB's switch (an r x r R per
    adapted layer) change it, by hand."""
    from fedtune.models.blocks import only_layers

    model = _llama(False)
    assert compute_params(model) == PARAMS  # counted (and kept) before the change
    with only_layers(model, "model.layers", [0]):
        assert compute_params(model) == PARAMS - (LAYERS - 1) * (4 * H * H + 3 * H * INTER + 2 * H)
        assert len(module_parameters(model)) == len(list(model.parameters()))
    assert compute_params(model) == PARAMS


def test_compute_params_counts_fed_sb_r_after_the_switch():
    from omegaconf import OmegaConf

    from fedtune.models.lora import apply_lora, to_sb

    r = 4
    cfg = OmegaConf.create({"enabled": True, "r": r, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                            "modules_to_save": [], "mode": "lora"})
    model = apply_lora(_llama(False), cfg, default_targets=[])
    lora = LAYERS * 2 * (r * H + H * r)  # A (r x H) and B (H x r) on q and v, every layer
    assert compute_params(model) == PARAMS + lora
    to_sb(model)
    assert compute_params(model) == PARAMS + lora + LAYERS * 2 * r * r


@pytest.mark.parametrize("tied", [True, False])
def test_kd_client_flops_by_hand(tied):
    """2 steps of 4 x 6 private tokens (forward + backward), 2 public KD batches of 4 x 6 tokens (forward +
    backward: the KD term's gradient flows through them), then the upload's forward over 4 x 6 public tokens."""
    model = _llama(tied)
    kd = _kd(model, kd_weight=0.5)
    report = _runtime(model, 2).run(kd, round_idx=1, client_id=0, message=kd.broadcast(1, [0])[0]).report
    assert report.num_tokens == 2 * 4 * T
    assert report.flops == 6 * PARAMS * (2 * 4 * T) + 6 * PARAMS * (2 * 4 * T) + 2 * PARAMS * (4 * T)


def test_kd_logs_the_task_loss_and_the_kd_term_apart():
    """train/loss = the plain LM loss of the client's batch; the KD term is reported on its own."""
    model = _llama(False)
    kd = _kd(model, kd_weight=0.5, temperature=2.0)
    fresh = _llama(False)
    report = _runtime(model, 1).run(kd, round_idx=1, client_id=0, message=kd.broadcast(1, [0])[0]).report
    # by hand, on the untrained model: the first private batch and the first public batch
    rt = _runtime(fresh, 1)
    idx = next(batch_order(rt.shards[0], batch_size=4, num_steps=1, generator=generator(0, 1, 0, Purpose.TRAIN)))
    batch = collate(rt.data, idx, pad_id=0)
    with torch.no_grad():
        task = fresh(**batch).loss.item()
        pub_idx = next(batch_order(list(range(4)), batch_size=4, num_steps=1, generator=generator(0, 1, 0, Purpose.KD_PUBLIC)))
        pub = collate(kd.public, pub_idx, pad_id=0)
        student = fresh(input_ids=pub["input_ids"]).logits[:, :-1].reshape(-1, V)
        target = torch.cat([kd.teacher[i * (T - 1):(i + 1) * (T - 1)] for i in pub_idx])
        kl = F.kl_div(F.log_softmax(student / 2.0, dim=-1), target, reduction="batchmean").item() * 4.0
    assert report.loss == pytest.approx(task, rel=1e-5)
    assert report.terms["kd_loss"] == pytest.approx(kl, rel=1e-5)


# ---- the clock


def test_client_time_with_round_trips_and_server_compute_by_hand():
    p = ClientProfile(speed=2.0, up_bps=1000.0, down_bps=4000.0, latency_s=0.1)
    # client 1e9 flops at 1e9/s x2 = 2 s; server 3e9 flops at 1.5e9/s = 2 s (the client's speed does not
    # apply); 500 B up = 0.5 s; 2000 B down = 0.5 s; 4 round trips x (0.1 up + 0.1 down) = 0.8 s
    assert client_time(p, flops=1e9, flops_per_s=1e9, up_bytes=500, down_bytes=2000, round_trips=4,
                       server_flops=3e9, server_flops_per_s=1.5e9) == pytest.approx(5.8)
    # the server's throughput defaults to the reference client's: 3 s
    assert client_time(p, flops=1e9, flops_per_s=1e9, up_bytes=500, down_bytes=2000, round_trips=4,
                       server_flops=3e9) == pytest.approx(6.8)
    # one round trip (download, then upload) by default; no network: compute only
    assert client_time(p, flops=0.0, flops_per_s=1e9, up_bytes=0, down_bytes=0) == pytest.approx(0.2)
    assert client_time(ClientProfile(1.0, None, None, 0.5), flops=1e9, flops_per_s=1e9, up_bytes=10, down_bytes=10,
                       round_trips=9, server_flops=1e9) == pytest.approx(2.0)


LATENCY_ONLY = ["num_clients=1", "network=wan", "network.spread=0", "network.up_mbps=1e12", "network.down_mbps=1e12",
                "network.latency_ms=40", "clients.flops_per_s=1e30", "num_rounds=1", "eval.bleu_samples=0"]


@pytest.mark.parametrize(("strategy", "round_trips"), [("split", 3 + 1), ("fedavg", 1)])
def test_split_pays_a_round_trip_per_step(run_fedtune, strategy, round_trips):
    """Bandwidth and compute made free: a round lasts round trips x (40 ms up + 40 ms down). Split: the
    download, then 3 steps (activations up, gradients down), then the upload; FedAvg: download, upload."""
    _, out = run_fedtune(f"strategy={strategy}", *LATENCY_ONLY)
    row = read_metrics(out)[0]
    assert row["time/sim_round_s"] == pytest.approx(round_trips * 2 * 0.040, abs=1e-6)


def test_split_charges_the_server_half_by_hand(run_fedtune):
    """No network: the round is the client's FLOPs plus the server's, both at the reference 1e11 FLOP/s;
    6 x (its layers) x tokens and 6 x (server layers + final norm + head) x tokens, by hand from the config."""
    _, out = run_fedtune("strategy=split", "strategy.split_layer=1", "num_clients=1", "num_rounds=1",
                         "eval.bleu_samples=0", "lora.enabled=false", "model.builder.num_layers=2")
    row = read_metrics(out)[0]
    cfg = compose_config([*FAST, "strategy=split", "num_clients=1", "lora.enabled=false", "model.builder.num_layers=2"])
    vocab = len(build_world(cfg, device=torch.device("cpu")).tokenizer)
    h, inter = 128, 256  # conf/model/tiny.yaml
    server = (4 * h * h + 3 * h * inter + 2 * h) + h + vocab * h  # layer 1, the final norm, the (untied) head
    client = 4 * h * h + 3 * h * inter + 2 * h  # layer 0
    tokens = row["train/tokens"]
    assert row["train/client_flops"] == 6 * client * tokens
    assert row["time/sim_round_s"] == pytest.approx((6 * client * tokens + 6 * server * tokens) / 1e11, rel=1e-9)
