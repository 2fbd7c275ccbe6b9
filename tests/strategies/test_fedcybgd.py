"""FedCyBGD: blocks, compression, schedule, client memory, the FedAvg reduction, exact bytes end to end."""

import json
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, read_metrics
from safetensors.torch import load_file, save
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedtune import cli
from fedtune.client.runtime import ClientRuntime, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel, Message
from fedtune.data.format import Tokenized
from fedtune.errors import ConfigError
from fedtune.models.blocks import block_layout, only_layers, set_partial_state
from fedtune.models.lora import get_trainable_state
from fedtune.strategies.fedcybgd import FedCyBGD
from fedtune.strategies.fedcybgd_compress import (
    decode_pruned,
    encode_pruned,
    magnitude_mask,
    pack_bits,
    unpack_bits,
)

LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _llama(num_layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _strategy(model, *, num_clients=2, **kwargs):
    s = FedCyBGD(**kwargs)
    s.setup(initial_state=get_trainable_state(model), num_clients=num_clients, server=SimpleNamespace(model=model))
    return s


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- settings


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"num_blocks": 0}, "strategy.num_blocks=0"), ({"prune_ratio": 1.0}, "strategy.prune_ratio=1.0"),
    ({"prune_ratio": -0.1}, "strategy.prune_ratio=-0.1"), ({"num_blocks": 5}, "strategy.num_blocks=5"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        _strategy(_llama(), **kwargs)
    assert "\n" not in str(err.value)


def test_lora_model_is_refused():
    with pytest.raises(ConfigError, match="lora.enabled=false"):
        FedCyBGD().setup(initial_state={"base_model.model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2)},
                         num_clients=2)


@pytest.mark.parametrize(("args", "needle"), [
    (["lora.enabled=false", "strategy.prune_ratio=1.0"], "strategy.prune_ratio=1.0"),
    (["lora.enabled=false", "strategy.num_blocks=5"], "strategy.num_blocks=5"),
])
def test_cli_exit_2_one_line(monkeypatch, tmp_path, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", *FAST, "strategy=fedcybgd", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not any(tmp_path.rglob("metrics.jsonl"))


# ---- blocks and compression


def test_blocks_are_contiguous_and_cover_every_parameter():
    names = list(get_trainable_state(_llama()))
    two = block_layout(names, layers_path="model.layers", num_blocks=2)
    assert two.layers == ((0, 1), (2, 3))
    assert "model.embed_tokens.weight" in two.keys[0] and {"model.norm.weight", "lm_head.weight"} <= set(two.keys[1])
    assert two.frame == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    three = block_layout(names, layers_path="model.layers", num_blocks=3)
    assert three.layers == ((0,), (1,), (2, 3))
    for layout in (two, three, block_layout(names, layers_path="model.layers", num_blocks=1)):
        assert sorted(k for keys in layout.keys for k in keys) == sorted(names)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=False))
    g = block_layout(list(get_trainable_state(gpt2)), layers_path="transformer.h", num_blocks=2)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(g.keys[0])
    assert {"transformer.ln_f.weight", "lm_head.weight"} <= set(g.keys[1])


def test_pruning_keeps_the_largest_and_round_trips_sparse():
    t = torch.tensor([[0.5, -3.0, 0.1, 2.0], [-0.2, 1.0, 0.0, -4.0]])
    assert magnitude_mask(t, 0.5).tolist() == [[False, True, False, True], [False, True, False, True]]
    mask = torch.rand(37) > 0.5
    assert pack_bits(mask).shape == (5,) and torch.equal(unpack_bits(pack_bits(mask), 37), mask)
    w = torch.randn(64, 32)
    wire = encode_pruned("w", w, 0.25)
    assert wire["w::kept"].shape == (64 * 32 - 512,) and wire["w::bitmap"].shape == (256,)
    dense = decode_pruned(wire, {"w": w.shape})["w"]
    assert (dense == 0).sum() == 512 and torch.equal(dense, w * magnitude_mask(w, 0.25))
    assert encode_pruned("w", w, 0.0) == {"w": w}  # nothing pruned: dense
    assert torch.equal(encode_pruned("n", w[0], 0.5)["n"], w[0])  # vectors (norms) are never pruned
    assert set(encode_pruned("w", w, 0.01)) == {"w"}  # below 1/32 the sparse form would be larger


def test_only_layers_drops_and_restores():
    model = _llama()
    full = model.model.layers
    with only_layers(model, "model.layers", [3, 0]):
        assert len(model.model.layers) == 2 and model.model.layers[0] is full[0]
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 40)
    assert model.model.layers is full
    with pytest.raises(KeyError, match="nope"):
        set_partial_state(model, {"nope": torch.zeros(1)})


def test_swapping_the_layer_list_is_seen_by_the_structure_cache():
    """Inside FedCyBGD's full-depth forward (``_layers_as``) and after it, the cached parameter list is the
    model's current one (a stale list would count dropped layers as held, or miss them)."""
    from fedtune.strategies.fedcybgd import _layers_as
    from fedtune.tensors import module_parameters

    model = _llama()
    full = model.model.layers
    with only_layers(model, "model.layers", [0]):
        reduced = len(module_parameters(model))
        with _layers_as(model, "model.layers", full):
            assert len(module_parameters(model)) == len(list(model.parameters())) > reduced
        assert len(module_parameters(model)) == len(list(model.parameters())) == reduced


# ---- schedule, download, client


def test_schedule_cycles_clients_and_blocks_and_compresses_the_download():
    model = _llama()
    s = _strategy(model, num_clients=3, num_blocks=2, prune_ratio=0.5)
    full = dict(s.global_state)
    seen = []
    for r in range(4):
        msgs = s.broadcast(r, s.select(r, [0, 1, 2]))
        (cid, msg), = msgs.items()
        block = msg.meta["block"]
        seen.append((cid, block))
        layers = {int(m.group(1)) for k in msg.tensors if (m := LAYER.match(k))}
        if r == 0:  # nothing updated: layers 2, 3 dropped; the head and final norm still travel, whole
            assert layers == {0, 1} and torch.equal(msg.tensors["lm_head.weight"], full["lm_head.weight"])
            assert not any("::" in k for k in msg.tensors)
        if r == 1:  # block 0 updated: its matrices pruned, sent sparse; its norms dense
            assert layers == {0, 1, 2, 3} and "model.embed_tokens.weight::kept" in msg.tensors
            assert "model.layers.0.input_layernorm.weight" in msg.tensors
            assert "model.layers.2.mlp.up_proj.weight" in msg.tensors  # own block: whole
        delta = {k: torch.ones_like(full[k]) for k in s.layout.keys[block]}
        s.aggregate(r, {cid: Message(tensors=delta, meta={"num_examples": 1})})
    assert seen == [(0, 0), (1, 1), (2, 0), (0, 1)]
    assert all(torch.allclose(s.global_state[k], full[k] + 2) for k in full)  # every block updated twice
    restored = FedCyBGD(num_blocks=2)
    restored.load_state_dict(s.state_dict())
    assert restored.updated == {0, 1} and restored.next_round == 4


def _runtime(model):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 40, (6,), generator=g) for _ in range(8)]
    data = Tokenized(input_ids=ids, labels=[t.clone() for t in ids])
    return ClientRuntime(model=model, data=data, shards={0: list(range(8)), 1: list(range(8))},
                         local=LocalConfig(batch_size=4, lr=1e-2, max_steps=2), store=ClientStore(),
                         channel=Channel(), seed=0, pad_id=0, device=torch.device("cpu"))


def test_client_trains_only_its_block_and_holds_only_the_kept_layers():
    model = _llama()
    s = _strategy(model, num_blocks=2)
    runtime, channel = _runtime(model), Channel()
    (cid, msg), = s.broadcast(0, s.select(0, [0, 1])).items()
    result = runtime.run(s, round_idx=0, client_id=cid, message=channel.send(msg, round_idx=0, client_id=cid,
                                                                            direction="down"))
    own = s.layout.keys[0]
    assert set(result.message.tensors) == set(own) and result.message.meta == {"num_examples": 8}
    assert all(result.message.tensors[k].abs().sum() > 0 for k in own if "norm" not in k)
    assert len(model.model.layers) == 4 and all(p.requires_grad and p.grad is None for p in model.parameters())
    # held: the kept parameters (block 0 + final norm + head; layers 2, 3 out) + gradient, AdamW
    # exp_avg and exp_avg_sq of block 0 + one fp32 step counter per block-0 tensor
    state = s.global_state
    kept = [t for k, t in state.items() if not (m := LAYER.match(k)) or int(m.group(1)) < 2]
    assert result.report.mem_bytes == _nbytes(kept) + 3 * _nbytes(state[k] for k in own) + 4 * len(own)
    full_param = 4 * _nbytes(state.values()) + 4 * len(state)
    assert result.report.mem_bytes < 0.6 * full_param


# ---- end to end


def test_one_block_no_pruning_is_full_parameter_fedavg(run_fedtune):
    common = ["lora.enabled=false", "num_clients=1"]
    _, a = run_fedtune("strategy=fedcybgd", "strategy.num_blocks=1", "strategy.prune_ratio=0", *common)
    _, b = run_fedtune("strategy=fedavg", *common)
    sa, sb = (load_file(out / "adapter" / "model.safetensors") for out in (a, b))
    assert sa.keys() == sb.keys()
    # theta + (theta' - theta) is theta' only to fp32 rounding; round 2's AdamW steps amplify that to ~3e-5
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-4), k
    ra, rb = read_metrics(a), read_metrics(b)
    for x, y in zip(ra, rb):
        assert x["eval/loss"] == pytest.approx(y["eval/loss"], rel=1e-5)
        assert x["mem/client_peak_bytes"] == y["mem/client_peak_bytes"]
        assert x["comm/up_bytes"] == y["comm/up_bytes"]  # delta vs state: same names and shapes
        assert 0 <= x["comm/down_bytes"] - y["comm/down_bytes"] <= 16  # + meta {"block": 0} in the header


def _payload(tensors, meta):
    return len(save(tensors, metadata={"meta": json.dumps(meta, sort_keys=True), "codec": "{}"}))


def test_two_blocks_two_rounds_exact_bytes_and_memory(run_fedtune):
    _, out = run_fedtune("strategy=fedcybgd", "lora.enabled=false", "strategy.num_blocks=2",
                         "strategy.prune_ratio=0.1")
    rows = read_metrics(out)
    shapes = {k: v.shape for k, v in load_file(out / "adapter" / "model.safetensors").items()}

    def block(name):  # 4 layers: block 0 = embeddings + layers 0-1; block 1 = layers 2-3 + norm + head
        m = LAYER.match(name)
        return int(m.group(1)) // 2 if m else (0 if name.startswith("model.embed_tokens") else 1)

    blocks = [[k for k in shapes if block(k) == b] for b in (0, 1)]
    zeros = {k: torch.zeros(s) for k, s in shapes.items()}

    def pruned(name):
        n = math.prod(shapes[name])
        if len(shapes[name]) < 2:
            return {name: zeros[name]}
        return {f"{name}::kept": torch.zeros(n - math.floor(0.1 * n)),
                f"{name}::bitmap": torch.zeros(math.ceil(n / 8), dtype=torch.uint8)}

    frame1 = {k: zeros[k] for k in ("model.norm.weight", "lm_head.weight")}
    down0 = _payload({**{k: zeros[k] for k in blocks[0]}, **frame1}, {"block": 0})
    down1 = _payload({**{k: zeros[k] for k in blocks[1]}, **{n: t for k in blocks[0] for n, t in pruned(k).items()}},
                     {"block": 1})
    ups = [_payload({k: zeros[k] for k in blocks[b]}, {"num_examples": 30}) for b in (0, 1)]
    assert [r["comm/down_bytes"] for r in rows] == [down0, down1]
    assert [r["comm/up_bytes"] for r in rows] == ups
    assert [r["fedcybgd/block"] for r in rows] == [0, 1]
    # client memory: held parameters (layers 2-3 dropped in round 0) + 3 x the block + AdamW step counters
    size = {k: 4 * math.prod(s) for k, s in shapes.items()}
    held0 = sum(size[k] for k in shapes if block(k) == 0 or k in frame1)
    mem = [held0 + 3 * sum(size[k] for k in blocks[0]) + 4 * len(blocks[0]),
           sum(size.values()) + 3 * sum(size[k] for k in blocks[1]) + 4 * len(blocks[1])]
    assert [r["mem/client_peak_bytes"] for r in rows] == mem
    assert max(mem) < 0.7 * (4 * sum(size.values()) + 4 * len(shapes))  # full-parameter FedAvg's client


# ---- train/loss: the full-depth model's task loss; the proxy's is train/proxy_loss


def test_train_loss_is_the_full_models_and_the_proxy_loss_is_logged_apart():
    """Round 0 trains block 0 with layers 2-3 dropped. One step: train/loss is the untrained full model's loss
    on the batch, train/proxy_loss that of the 2-layer proxy the client trains; training follows the proxy."""
    from fedtune.seeding import Purpose, generator
    from fedtune.train.local import batch_order

    model = _llama()
    s = _strategy(model, num_blocks=2)
    runtime = _runtime(model)
    runtime.local.max_steps = 1
    (cid, msg), = s.broadcast(0, s.select(0, [0, 1])).items()
    report = runtime.run(s, round_idx=0, client_id=cid, message=msg).report
    fresh = _llama()
    idx = next(batch_order(list(range(8)), batch_size=4, num_steps=1, generator=generator(0, 0, cid, Purpose.TRAIN)))
    batch = {"input_ids": torch.stack([runtime.data.input_ids[i] for i in idx])}
    batch["labels"] = batch["input_ids"].clone()
    with torch.no_grad():
        full = fresh(**batch).loss.item()
        with only_layers(fresh, "model.layers", [0, 1]):
            proxy = fresh(**batch).loss.item()
    assert abs(full - proxy) > 1e-3  # the dropped layers matter
    assert report.loss == pytest.approx(full, rel=1e-5)
    assert report.terms["proxy_loss"] == pytest.approx(proxy, rel=1e-5)


def test_proxy_and_full_losses_end_to_end(run_fedtune):
    _, out = run_fedtune("strategy=fedcybgd", "lora.enabled=false", "strategy.num_blocks=2", "strategy.prune_ratio=0")
    rows = read_metrics(out)
    assert rows[0]["train/loss"] != pytest.approx(rows[0]["train/proxy_loss"], rel=1e-4)  # layers 2-3 dropped
    assert rows[1]["train/loss"] == rows[1]["train/proxy_loss"]  # block 0 updated: no layer dropped
