"""Split learning: the cut is exact, bytes per step match the tensors' shapes, bad settings fail."""

import json

import pytest
import torch
from conftest import read_metrics
from fakes import FakeClient
from omegaconf import OmegaConf
from safetensors.torch import save

from fedtune.data.format import collate
from fedtune.errors import ConfigError
from fedtune.models.build import tiny_llama
from fedtune.models.lora import apply_lora, get_trainable_state
from fedtune.models.split import base_of, client_forward, on_client, server_forward
from fedtune.models.tokenizer import word_level
from fedtune.strategies.split import Split

LORA = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None,
                         "modules_to_save": None})


def _model(layers=3):
    torch.manual_seed(0)
    tok = word_level(texts=["a b c d e f g h"])
    base = tiny_llama(tokenizer=tok, hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64)
    model = apply_lora(base, LORA, default_targets=["q_proj", "v_proj", "down_proj"],
                       default_modules_to_save=["lm_head"])
    with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, tok


def _batch():
    ids = torch.tensor([[2, 4, 5, 6, 7, 3], [2, 8, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100
    return ids, mask, labels


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_gradients_equal_whole_model_gradients(k):
    model, _ = _model()
    ids, mask, labels = _batch()
    whole = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    acts = client_forward(model, ids, mask, k)
    received = acts.detach().clone().requires_grad_(True)  # what crosses the wire
    loss = server_forward(model, received, mask, labels, k)
    loss.backward()
    acts.backward(received.grad)
    assert loss.item() == pytest.approx(whole.item(), rel=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, expected[n], atol=1e-6, rtol=1e-5), n
    # with k = every layer, the server only runs the norm and head: no server layer has a gradient source
    if k == 3:
        assert all(on_client(n, k) for n in expected if "layers." in n)


def test_bad_split_layer():
    model, _ = _model(layers=3)

    class W:  # the part of World that setup reads
        pass

    w = W()
    w.model = model
    for k in (0, 3):
        with pytest.raises(ConfigError, match=f"strategy.split_layer={k}"):
            Split(split_layer=k).setup(initial_state=get_trainable_state(model), num_clients=2, server=w)


def test_split_bytes_per_step_match_shapes(run_fedtune):
    from conftest import FAST

    from fedtune.config import compose_config
    from fedtune.seeding import Purpose, generator
    from fedtune.train.local import batch_order
    from fedtune.world import build_world

    overrides = ["strategy=split", "strategy.split_layer=2", "num_rounds=1", "local.max_steps=2"]
    summary, out = run_fedtune(*overrides)
    row = read_metrics(out)[0]
    # Independent path: the same batches, their padded widths, the tensors' raw sizes serialized.
    cfg = compose_config([*FAST, *overrides])
    world = build_world(cfg, device=torch.device("cpu"))
    hidden = cfg.model.builder.hidden_size
    up = down = 0
    for cid, shard in world.shards.items():
        for idx in batch_order(shard, batch_size=cfg.local.batch_size, num_steps=2, generator=generator(0, 0, cid, Purpose.TRAIN)):
            batch = collate(world.task.train, idx, pad_id=world.tokenizer.pad_token_id)
            b, t = batch["input_ids"].shape
            up += len(save({"activations": torch.zeros(b, t, hidden), "attention_mask": torch.zeros(b, t, dtype=torch.long),
                            "labels": torch.zeros(b, t, dtype=torch.long)}, metadata={"meta": "{}", "codec": "{}"}))
            down += len(save({"grad": torch.zeros(b, t, hidden)}, metadata={"meta": json.dumps({"loss": 1.0}),
                                                                              "codec": "{}"}))
    assert row["comm/up/activations_bytes"] == up
    # the loss value's JSON text varies in length ("1.0" vs "2.7172..."); the header is 8-byte padded
    assert 0 <= row["comm/down/gradients_bytes"] - down <= 4 * 24
    assert row["time/server_compute_s"] > 0 and row["train/client_flops"] > 0


def test_client_side_is_averaged_server_side_is_sequential():
    model, _ = _model(layers=3)
    init = get_trainable_state(model)
    s = Split(split_layer=1)
    s.setup(initial_state=init, num_clients=2, server=None)
    assert all(on_client(k, 1) for k in s.global_state)
    assert s.server_state and not any(on_client(k, 1) for k in s.server_state)
    clients = {0: FakeClient(0, 1.0, 10), 1: FakeClient(1, 3.0, 30)}
    replies = {}
    for cid, msg in s.broadcast(0, [0, 1]).items():
        clients[cid].set_trainable(msg.tensors)
        clients[cid].train()
        replies[cid] = type(msg)(tensors=clients[cid].get_trainable(), meta={"num_examples": clients[cid].num_examples})
    s.aggregate(0, replies)
    key = next(iter(init))
    # (10 * (x + 1) + 30 * (x + 3)) / 40 = x + 2.5
    assert torch.allclose(s.global_state[key], init[key] + 2.5)


# ---- a split update is a whole-model update: LoRA, and a tied LM head with full parameters


def _tied_llama(layers=3):
    """Full-parameter tiny Llama whose LM head IS its embedding table (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _runtime(model, *, steps=3, grad_clip=None, vocab=40):
    from fedtune.client.runtime import ClientRuntime, LocalConfig
    from fedtune.client.store import ClientStore
    from fedtune.comm.channel import Channel
    from fedtune.data.format import Tokenized

    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, vocab, (6,), generator=g) for _ in range(8)]  # one length: no padding
    data = Tokenized(input_ids=ids, labels=[t.clone() for t in ids])
    return ClientRuntime(model=model, data=data, shards={0: list(range(8))},
                         local=LocalConfig(batch_size=4, lr=1e-2, max_steps=steps, weight_decay=0.01,
                                           grad_clip=grad_clip),
                         store=ClientStore(), channel=Channel(), seed=0, pad_id=0, device=torch.device("cpu"))


def _server(rt):
    """The server context split's server half trains with: the runtime's model and local settings."""
    from fedtune.strategies.base import ServerContext

    return ServerContext(model=rt.model, tokenizer=None, task=None, device=rt.device, local=rt.local, seed=rt.seed)


def _build(kind):
    if kind == "tied_full":
        return _tied_llama()
    return _model()[0]


@pytest.mark.parametrize("kind", ["tied_full", "lora"])
@pytest.mark.parametrize("k", [1, 2])
def test_split_update_equals_whole_model_update(kind, k):
    """Same batches, same AdamW: the split halves end where whole-model training ends (both halves
    step; a tied head's gradient is the server's head part + the client's embedding part)."""

    from fedtune.seeding import Purpose, generator
    from fedtune.train.local import train_local

    model = _build(kind)
    init = get_trainable_state(model)
    s = Split(split_layer=k)
    rt = _runtime(model, vocab=base_of(model).config.vocab_size)
    s.setup(initial_state=init, num_clients=1, server=_server(rt))
    msg = s.broadcast(0, [0])[0]
    result = rt.run(s, round_idx=0, client_id=0, message=msg)
    got = {**result.message.tensors, **s.server_state}
    assert set(got) == set(init)

    whole = _build(kind)
    torch.manual_seed(0)
    train_local(whole, rt.data, rt.shards[0], num_steps=3, batch_size=4, lr=1e-2, weight_decay=0.01, grad_clip=None,
                generator=generator(0, 0, 0, Purpose.TRAIN), pad_id=0, device=torch.device("cpu"))
    expected = get_trainable_state(whole)
    for name, value in expected.items():
        assert not torch.equal(value, init[name]), name  # every trainable tensor moved (both halves stepped)
        assert torch.allclose(got[name], value, atol=1e-6, rtol=1e-5), name


def test_tied_split_bytes_per_step_and_instrumentation_by_hand():
    """A tied head: its weight goes up and its gradient down every step; round trips and FLOPs by hand."""

    k, V, H, inter, layers = 1, 40, 16, 32, 3
    model = _tied_llama(layers)
    s = Split(split_layer=k)
    rt = _runtime(model, grad_clip=1.0)
    s.setup(initial_state=get_trainable_state(model), num_clients=1, server=_server(rt))
    rep = rt.run(s, round_idx=0, client_id=0, message=s.broadcast(0, [0])[0]).report
    by = rt.channel.bytes_by(0)
    meta = {"meta": "{}", "codec": "{}"}
    up = len(save({"activations": torch.zeros(4, 6, H), "attention_mask": torch.zeros(4, 6, dtype=torch.long),
                   "labels": torch.zeros(4, 6, dtype=torch.long), "head_weight": torch.zeros(V, H)}, metadata=meta))
    down = len(save({"grad": torch.zeros(4, 6, H), "head_grad": torch.zeros(V, H)},
                    metadata={"meta": json.dumps({"loss": 1.0}), "codec": "{}"}))
    assert by["up/activations"] == 3 * up
    assert 0 <= by["down/gradients"] - 3 * down <= 3 * 24
    # per decoder layer: q, k, v, o (H x H each, as many kv heads as heads) + gate, up, down (H x inter) + 2 norms
    per_layer = 4 * H * H + 3 * H * inter + 2 * H
    tokens = 3 * 4 * 6
    assert rep.num_tokens == tokens and rep.round_trips == 3 + 1
    assert rep.flops == 6 * k * per_layer * tokens  # the client: its layers (the embedding is a lookup)
    assert rep.server_flops == 6 * ((layers - k) * per_layer + H + V * H) * tokens  # + final norm + tied head


def test_mid_update_traffic_has_its_own_codecs(run_fedtune):
    # comm.activations / comm.gradients replace comm.up / comm.down for split's per-step traffic only.
    from conftest import FAST

    from fedtune.config import compose_config
    from fedtune.seeding import Purpose, generator
    from fedtune.train.local import batch_order
    from fedtune.world import build_world

    base = ["strategy=split", "strategy.split_layer=2", "num_rounds=1", "local.max_steps=2"]
    _, plain_out = run_fedtune(*base)
    overrides = [*base, "comm.up=int8", "comm.activations=fp16", "comm.gradients=bf16"]
    _, out = run_fedtune(*overrides)
    plain, row = read_metrics(plain_out)[0], read_metrics(out)[0]
    cfg = compose_config([*FAST, *overrides])
    world = build_world(cfg, device=torch.device("cpu"))
    hidden = cfg.model.builder.hidden_size
    up = down = 0
    for cid, shard in world.shards.items():  # by hand: the activations cast to fp16 (their dtype in the meta)
        for idx in batch_order(shard, batch_size=cfg.local.batch_size, num_steps=2,
                               generator=generator(0, 0, cid, Purpose.TRAIN)):
            b, t = collate(world.task.train, idx, pad_id=world.tokenizer.pad_token_id)["input_ids"].shape
            up += len(save({"activations": torch.zeros(b, t, hidden, dtype=torch.float16),
                            "attention_mask": torch.zeros(b, t, dtype=torch.long),
                            "labels": torch.zeros(b, t, dtype=torch.long)},
                           metadata={"meta": "{}", "codec": json.dumps({"activations": "float32"})}))
            down += len(save({"grad": torch.zeros(b, t, hidden, dtype=torch.bfloat16)},
                             metadata={"meta": json.dumps({"loss": 1.0}), "codec": json.dumps({"grad": "float32"})}))
    assert row["comm/up/activations_bytes"] == up < 0.6 * plain["comm/up/activations_bytes"]
    assert 0 <= row["comm/down/gradients_bytes"] - down <= 4 * 24
    assert row["comm/up/model_bytes"] < 0.4 * plain["comm/up/model_bytes"]  # the adapter still goes as int8
    assert row["train/loss"] != plain["train/loss"]  # the server trained on rounded activations
