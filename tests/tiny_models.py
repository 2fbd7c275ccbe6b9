"""A tiny Llama, a one-shard client runtime and a KD strategy with a fixed teacher, shared by the FLOPs
tests (tests/sim/test_flops_clock.py) and the KD tests (tests/strategies/test_kd.py)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.client.runtime import ClientRuntime, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel
from fedtune.data.format import Tokenized
from fedtune.models.lora import get_trainable_state
from fedtune.strategies.kd import KD

V, H, INTER, LAYERS, T = 40, 16, 32, 2, 6


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=INTER, tie_word_embeddings=tied))


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (T,), generator=g) for _ in range(n)]  # one length: no padding


def one_shard_runtime(model, steps):
    ids = rows(8, 1)
    data = Tokenized(input_ids=ids, labels=[t.clone() for t in ids])
    return ClientRuntime(model=model, data=data, shards={0: list(range(8))},
                         local=LocalConfig(batch_size=4, lr=1e-2, max_steps=steps), store=ClientStore(),
                         channel=Channel(), seed=0, pad_id=0, device=torch.device("cpu"))


def kd_with_teacher(model, **kwargs):
    kd = KD(public_samples=4, server_kd_steps=0, **kwargs)
    kd.setup(initial_state=get_trainable_state(model), num_clients=1)
    ids = rows(4, 2)
    kd.public = Tokenized(input_ids=ids, labels=[t.clone() for t in ids])
    g = torch.Generator().manual_seed(3)
    kd.teacher = torch.softmax(torch.randn(4 * (T - 1), V, generator=g), dim=-1)  # one row per next-token position
    return kd
