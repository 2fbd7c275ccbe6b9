"""End to end on the tiny model, in-process: every strategy yaml, exact bytes, pinned loss, determinism."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file, save

from fedtune.config import CONF_DIR

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
# Strategies that cannot run on the default config (LoRA on) get these overrides in test_every_strategy_runs.
EXTRA = {"kd": ["strategy.public_samples=10"]}  # per-strategy needs
TIME_KEYS = ("time/", "mem/process")  # wall clock and process RSS vary run to run


def _adapter_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs(run_fedtune, strategy):
    summary, out = run_fedtune(f"strategy={strategy}", "local.max_steps=6", *EXTRA.get(strategy, []))
    rows = read_metrics(out)
    assert [r["round_idx"] for r in rows] == [0, 1]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["eval/loss"])
        assert isinstance(r["comm/up_bytes"], int)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert (out / "summary.json").exists() and (out / "partition.json").exists()
    assert summary["choices"] == {} or summary["choices"]["strategy"] == strategy


def test_fedavg_bytes_are_exact_from_adapter_shapes(run_fedtune):
    summary, out = run_fedtune("strategy=fedavg", "lora.r=8")
    rows = read_metrics(out)
    adapter = _adapter_state(out)  # what save_pretrained wrote: the adapter's names and shapes
    values = sum(t.numel() for t in adapter.values())
    assert values == summary["model/trainable_params"]
    # Independent path: the same tensors serialized directly, one payload per client and direction.
    zeros = {k: torch.zeros_like(v) for k, v in adapter.items()}
    down = len(save(zeros, metadata={"meta": "{}", "codec": "{}"}))
    up = len(save(zeros, metadata={"meta": json.dumps({"num_examples": 30}), "codec": "{}"}))
    for r in rows:
        # 2 clients x 30 examples each (60 synthetic training examples, iid)
        assert r["comm/down_bytes"] == 2 * down, r
        assert r["comm/up_bytes"] == 2 * up
    assert 0 < up - values * 4 < 8 * 1024  # everything but the fp32 data is the header (tensor names)
    assert rows[-1]["comm/total_bytes"] == sum(r["comm/up_bytes"] + r["comm/down_bytes"] for r in rows)


def test_rank_16_is_about_twice_rank_8(run_fedtune):
    # attention/MLP LoRA only (no embeddings), so the payload is the low-rank matrices alone
    r8 = read_metrics(run_fedtune("lora.r=8", "lora.modules_to_save=[]", "num_rounds=1")[1])[0]["comm/up_bytes"]
    r16 = read_metrics(run_fedtune("lora.r=16", "lora.modules_to_save=[]", "num_rounds=1")[1])[0]["comm/up_bytes"]
    assert r16 / r8 == pytest.approx(2.0, rel=0.02)


def test_bf16_uplink_halves_the_data(run_fedtune):
    fp32 = read_metrics(run_fedtune("num_rounds=1")[1])[0]
    bf16 = read_metrics(run_fedtune("num_rounds=1", "comm.up=bf16")[1])[0]
    assert bf16["comm/down_bytes"] == fp32["comm/down_bytes"]
    assert bf16["comm/up_bytes"] / fp32["comm/up_bytes"] == pytest.approx(0.5, abs=0.03)


def test_baselines_send_nothing(run_fedtune):
    for strategy in ("centralized", "local"):
        rows = read_metrics(run_fedtune(f"strategy={strategy}")[1])
        assert all(r["comm/up_bytes"] == 0 and r["comm/down_bytes"] == 0 for r in rows)


def test_local_reports_each_client_and_mean(run_fedtune):
    row = read_metrics(run_fedtune("strategy=local")[1])[-1]
    per_client = [row["eval/client0/loss"], row["eval/client1/loss"]]
    assert row["eval/loss"] == pytest.approx(sum(per_client) / 2)


@pytest.mark.parametrize(("rounds", "atol"), [(1, 1e-7), (2, 1e-4)])
def test_fedavg_equals_gradualdiff_end_to_end(run_fedtune, rounds, atol):
    # mean(theta_i) vs theta_g + mean(theta_i - theta_g): equal up to fp32 rounding after one round
    # (measured 2e-9); the next round's AdamW steps divide by sqrt(v) of tiny gradients and amplify that
    # rounding (measured 2e-5 on values of ~0.1 after two rounds), hence the looser bound there.
    _, a = run_fedtune("strategy=fedavg", "strategy.weighting=uniform", f"num_rounds={rounds}")
    _, b = run_fedtune("strategy=gradualdiff", "strategy.weighting=uniform", "strategy.server_lr=1.0",
                       f"num_rounds={rounds}")
    sa, sb = _adapter_state(a), _adapter_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol, rtol=0), k


def _without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_same_seed_same_metrics_different_seed_differs(run_fedtune):
    a = read_metrics(run_fedtune("seed=3")[1])
    b = read_metrics(run_fedtune("seed=3")[1])
    c = read_metrics(run_fedtune("seed=4")[1])
    assert _without_time(a) == _without_time(b)
    assert _without_time(a) != _without_time(c)


def test_pinned_loss_of_a_deterministic_fedavg_run(run_fedtune):
    rows = read_metrics(run_fedtune("seed=0", "strategy=fedavg")[1])
    # Read back from this exact run on the reference machine (torch 2.13 CPU); a change here means
    # the maths changed: check it was meant to.
    assert rows[0]["train/loss"] == pytest.approx(PINNED["train0"], rel=1e-4)
    assert rows[-1]["eval/loss"] == pytest.approx(PINNED["eval1"], rel=1e-4)


# Re-pinned when the synthetic eval set became disjoint from train (different examples); the
# independent recomputation of the first round is test_one_fedavg_round_by_a_second_path below.
PINNED = {"train0": 4.2451551755269366, "eval1": 3.7116673787434897}


def test_run_refuses_to_overwrite(run_fedtune, tmp_path):
    from fedtune.config import compose_config
    from fedtune.errors import ConfigError
    from fedtune.run import run

    _, out = run_fedtune("num_rounds=1")
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose_config(["logger=none"]), out_dir=out)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_nan_update_is_rejected(run_fedtune, monkeypatch):
    from fedtune.strategies.fedavg import FedAvg

    original = FedAvg.local_update

    def poisoned(self, client, message):
        reply = original(self, client, message)
        if client.client_id == 1:
            reply.tensors = {k: torch.full_like(v, float("nan")) for k, v in reply.tensors.items()}
        return reply

    monkeypatch.setattr(FedAvg, "local_update", poisoned)
    summary, out = run_fedtune("strategy=fedavg")
    rows = read_metrics(out)
    assert [r["comm/rejected_updates"] for r in rows] == [1, 1]
    assert all(math.isfinite(r["eval/loss"]) for r in rows)


def test_one_fedavg_round_by_a_second_path(run_fedtune):
    """The round that the pinned numbers come from, recomputed without fedtune's loop, trainer, channel,
    aggregation or evaluation: a plain AdamW loop per client from the same initial adapter, batches in
    the same seeded order, the example-weighted mean of the two adapters, the eval NLL summed by hand."""
    import torch.nn.functional as F
    from conftest import FAST

    from fedtune.config import compose_config
    from fedtune.data.format import IGNORE_INDEX, collate
    from fedtune.models.lora import get_trainable_state, set_trainable_state
    from fedtune.seeding import Purpose, derive_seed, generator
    from fedtune.world import build_world

    overrides = ["seed=0", "strategy=fedavg", "num_rounds=1"]
    row = read_metrics(run_fedtune(*overrides)[1])[0]

    cfg = compose_config([*FAST, *overrides])
    world = build_world(cfg, device=torch.device("cpu"))
    model, data, pad = world.model, world.task.train, world.tokenizer.pad_token_id
    initial = {k: v.clone() for k, v in get_trainable_state(model).items()}
    states, sizes, losses = [], [], []
    for cid, shard in world.shards.items():
        set_trainable_state(model, initial)
        torch.manual_seed(derive_seed(0, 0, cid, Purpose.TRAIN))
        gen = generator(0, 0, cid, Purpose.TRAIN)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
        model.train()
        order = [shard[j] for j in torch.randperm(len(shard), generator=gen).tolist()]  # 3 steps < one pass
        step_losses = []
        for step in range(cfg.local.max_steps):
            batch = collate(data, order[step * cfg.local.batch_size:(step + 1) * cfg.local.batch_size], pad_id=pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.local.grad_clip)
            opt.step()
            step_losses.append(loss.item())
        states.append({k: v.detach().double() for k, v in get_trainable_state(model).items()})
        sizes.append(len(shard))
        losses.append(sum(step_losses) / len(step_losses))
    mean = {k: sum(s[k] * n for s, n in zip(states, sizes)) / sum(sizes) for k in states[0]}
    set_trainable_state(model, {k: v.float() for k, v in mean.items()})
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(world.task.eval)):
            batch = collate(world.task.eval, [i], pad_id=pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][0, 1:]
            nll += F.cross_entropy(logits[0, :-1], labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    assert row["train/loss"] == pytest.approx(sum(n * x for n, x in zip(sizes, losses)) / sum(sizes), rel=1e-5)
    assert row["eval/loss"] == pytest.approx(nll / count, rel=1e-4)
