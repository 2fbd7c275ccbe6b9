"""comm.budget_bytes: the least lossy rung of comm.ladder whose payload fits, measured as sent."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import save

from fedtune.comm.budget import KEY, Budget
from fedtune.comm.channel import Channel, Message
from fedtune.comm.feedback import compress_with_feedback
from fedtune.comm.spec import make_codec
from fedtune.errors import ConfigError

LADDER = ["none", "bf16", "int8", "nf4", "int2", "sign", "topk0.01+sign"]


def _update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A": torch.randn(8, 512, generator=g), "a.lora_B": torch.randn(512, 8, generator=g) * 1e-3,
            "norm": torch.randn(16, generator=g)}


def _sizes(tensors) -> list[int]:
    """Each rung's safetensors payload by hand: its encoded tensors, its meta plus the rung key."""
    out = []
    for rung, spec in enumerate(LADDER):
        encoded, meta = make_codec(spec).encode(tensors)
        header = {"meta": "{}", "codec": json.dumps({**meta, KEY: str(rung)}, sort_keys=True)}
        out.append(len(save({k: v.contiguous() for k, v in encoded.items()}, metadata=header)))
    return out


def test_the_first_rung_that_fits_is_sent_and_counted() -> None:
    tensors = _update()
    sizes = _sizes(tensors)
    assert sizes == sorted(sizes, reverse=True)  # the ladder gets smaller rung by rung here
    for want in range(len(LADDER)):
        for budget in (sizes[want], sizes[want - 1] - 1 if want else sizes[0] + 100):
            codec = Budget(LADDER, budget_bytes=budget)
            rung, _, _ = codec.choose(tensors)
            assert rung == want, (budget, rung)
            channel = Channel(up=codec)
            got = channel.send(Message(tensors=tensors), round_idx=0, client_id=0, direction="up")
            assert channel.transfers[-1].num_bytes == sizes[want] <= max(budget, sizes[-1])
            # the receiver decodes with the rung that was sent
            ref = make_codec(LADDER[want])
            expect = ref.decode(*ref.encode(tensors))
            assert all(torch.equal(got.tensors[k], expect[k]) for k in tensors)


def test_nothing_fits_sends_the_last_rung() -> None:
    assert Budget(LADDER, budget_bytes=1).choose(_update())[0] == len(LADDER) - 1


def _steady(codec, tensors, **channel_args) -> tuple[int, int]:
    """(first, second) payload bytes of the same upload sent twice on one connection."""
    channel = Channel(up=codec, **channel_args)
    for _ in range(2):
        channel.send(Message(tensors=tensors), round_idx=0, client_id=0, direction="up")
    return channel.transfers[0].num_bytes, channel.transfers[1].num_bytes


@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_compact_wire_budget_is_the_steady_payload(entropy) -> None:
    tensors = _update()
    # each rung's steady payload through a channel (a ladder cut at that rung with budget 1 sends it)
    steady = [_steady(Budget(LADDER[: i + 1], budget_bytes=1), tensors, wire="compact", entropy=entropy)[1]
              for i in range(len(LADDER))]
    for want in range(1, len(LADDER)):
        codec = Budget(LADDER, budget_bytes=steady[want], wire="compact", entropy=entropy)
        assert codec.choose(tensors)[0] == min(i for i, b in enumerate(steady) if b <= steady[want])
        first, second = _steady(codec, tensors, wire="compact", entropy=entropy)
        assert second == steady[want] and first > second  # the name table: once, outside the budget


def test_error_feedback_sees_the_same_choice() -> None:
    tensors = _update()
    codec = Budget(LADDER, budget_bytes=5000)
    encoded, meta, residual = compress_with_feedback(codec, tensors, None)
    received = codec.decode(dict(encoded), meta)
    for k, t in tensors.items():
        assert torch.allclose(received[k] + residual[k], t, atol=1e-6)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="comm.budget_bytes=0"):
        Budget(LADDER, budget_bytes=0)
    with pytest.raises(ConfigError, match="comm.ladder"):
        Budget(["int8", "zip"], budget_bytes=10)
    with pytest.raises(ConfigError, match="comm.ladder"):
        Budget([], budget_bytes=10)


def test_a_run_within_budget(run_fedtune) -> None:
    # tiny r=8: the fp32 upload is ~380 kB; every client's upload must fit 40 kB (its meta aside).
    _, out = run_fedtune("comm.budget_bytes=40000", "num_rounds=2")
    _, ref = run_fedtune("num_rounds=2")
    rows, plain = read_metrics(out), read_metrics(ref)
    for row in rows:
        assert row["comm/up_bytes"] <= row["clients/participants"] * (40000 + 64)
    assert rows[-1]["comm/up_bytes"] < 0.15 * plain[-1]["comm/up_bytes"]


def test_budget_with_an_uplink_codec_is_refused(run_fedtune) -> None:
    with pytest.raises(ConfigError, match="comm.up=int8: comm.budget_bytes picks the uplink codec"):
        run_fedtune("comm.budget_bytes=1000", "comm.up=int8")
