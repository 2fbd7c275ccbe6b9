"""Per-tensor codecs (``comm.up=randk0.75+sign|classifier:int3``, :class:`fedtune.comm.codec.ByName`):
routing by name, decoded values and bytes against hand-written references, two rules of the same codec
kind, the channel (both wire formats), error feedback, the grammar, and exact resume in a whole run."""

import json
import math
import sys

import pytest
import torch
from conftest import FAST, read_metrics
from safetensors.torch import save

from fedtune import cli
from fedtune.comm.channel import Channel, Message
from fedtune.comm.codec import ByName, Identity
from fedtune.comm.feedback import compress_with_feedback
from fedtune.comm.spec import make_codec
from fedtune.config import compose_config, validate
from fedtune.errors import ConfigError
from fedtune.run import run

A, B, W, BIAS = "m.layer.lora_A.weight", "m.layer.lora_B.weight", "m.classifier.weight", "m.classifier.bias"


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(8, 64, generator=g), B: torch.randn(64, 8, generator=g) * 0.01,
            W: torch.randn(10, 60, generator=g), BIAS: torch.randn(10, generator=g)}


def _roundtrip(codec, tensors):
    return codec.decode(*codec.encode(dict(tensors)))


# ---- hand-written references of the documented rules (not the codecs' own code) -------------------

def _sign_ref(x, block):
    """sign(x) times the block's mean |x|, the scale rounded to bf16."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        scale = torch.tensor(sum(abs(v) for v in chunk.tolist()) / chunk.numel()).to(torch.bfloat16).float()
        out[start:start + block] = torch.where(chunk >= 0, scale, -scale)
    return out.reshape(x.shape)


def _int8_ref(x, block):
    """round(127 x / absmax) absmax / 127 per block."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        absmax = max(abs(v) for v in chunk.tolist())
        out[start:start + block] = torch.tensor([round(127 * v / absmax) * absmax / 127 for v in chunk.tolist()])
    return out.reshape(x.shape)


def test_each_tensor_takes_its_rules_codec():
    x = _tensors()
    codec = make_codec("sign|classifier:int8@128", key="comm.up")
    assert isinstance(codec, ByName)
    got = _roundtrip(codec, x)
    torch.testing.assert_close(got[A], _sign_ref(x[A], 256), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[B], _sign_ref(x[B], 256), rtol=0, atol=1e-8)
    torch.testing.assert_close(got[W], _int8_ref(x[W], 128), rtol=1e-6, atol=1e-7)
    assert torch.equal(got[BIAS], x[BIAS])  # 10 values: below MIN_NUMEL, sent as they are


def test_data_and_payload_bytes_by_hand():
    x = _tensors()
    codec = make_codec("sign|classifier:int8@128")
    encoded, meta = codec.encode(dict(x))
    # lora_A/B: 512 signs = 64 bytes + 2 bf16 scales; classifier: 600 int8 codes + 5 fp32 absmax; bias: 10 fp32
    data = 2 * (64 + 2 * 2) + (600 + 5 * 4) + 10 * 4
    assert sum(t.numel() * t.element_size() for t in encoded.values()) == data == 796
    ch = Channel(up=codec)
    ch.send(Message(tensors=dict(x)), round_idx=0, client_id=0, direction="up")
    payload = save({k: t.contiguous() for k, t in encoded.items()},
                   metadata={"meta": json.dumps({}), "codec": json.dumps(meta, sort_keys=True)})
    assert ch.transfers[0].num_bytes == 8 + int.from_bytes(payload[:8], "little") + data


def test_two_rules_of_one_kind_keep_their_own_block_size():
    """sign at block 256 for the LoRA factors, at 64 for the head: their ``@sign`` parameters must not
    overwrite each other (the head's carries its rule's number)."""
    x = _tensors()
    codec = make_codec("sign|classifier:sign@64")
    encoded, meta = codec.encode(dict(x))
    assert meta["@sign"] == "256" and meta["@sign/1"] == "64"
    assert encoded[f"{W}::scale"].numel() == math.ceil(600 / 64) and encoded[f"{A}::scale"].numel() == 2
    got = codec.decode(encoded, meta)
    torch.testing.assert_close(got[W], _sign_ref(x[W], 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[A], _sign_ref(x[A], 256), rtol=0, atol=1e-6)


def test_first_matching_rule_wins_with_wildcards_and_case():
    x = _tensors()
    codec = make_codec("none|lora_A:int8|lora:sign|*.bias:fp16|LORA_B:int3")
    assert [codec.route(k) for k in (A, B, W, BIAS)] == [1, 2, 0, 3]  # LORA_B: case matters, lora: first
    encoded, meta = codec.encode(dict(x))
    assert encoded[A].dtype == torch.int8 and encoded[BIAS].dtype == torch.float16
    assert f"{B}::scale" in encoded and encoded[W] is x[W]
    got = codec.decode(encoded, meta)
    assert torch.equal(got[W], x[W]) and torch.equal(got[BIAS], x[BIAS].half().float())
    torch.testing.assert_close(got[A], _int8_ref(x[A], 256), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[B], _sign_ref(x[B], 256), rtol=0, atol=1e-8)


@pytest.mark.parametrize("wire", ["safetensors", "compact"])
def test_through_the_channel(wire):
    codec = make_codec("randk0.5+sign|classifier.weight:int3@64", seed=3)  # the bias: default codec
    ch = Channel(up=codec, wire=wire)
    for r in range(2):  # the compact wire's second payload refers to names the first one sent
        x = _tensors(seed=r)
        got = ch.send(Message(tensors=dict(x)), round_idx=r, client_id=0, direction="up").tensors
        want = _roundtrip(codec, x)
        assert list(got) == list(x) if wire == "compact" else sorted(got) == sorted(x)  # safetensors: hash order
        for k in x:
            assert torch.equal(got[k], want[k]), k
        assert not torch.equal(got[W], x[W]) and (got[A] == 0).sum() == 256  # half of lora_A dropped


def test_error_feedback_carries_what_each_rule_dropped():
    codec, g = make_codec("randk0.5+sign|classifier:int2"), torch.Generator().manual_seed(1)
    residual, sent, true = None, dict.fromkeys(_tensors(), 0), dict.fromkeys(_tensors(), 0)
    for _ in range(4):
        update = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in _tensors().items()}
        target = {k: v + (residual[k] if residual else 0) for k, v in update.items()}
        encoded, meta, residual = compress_with_feedback(codec, update, residual)
        received = codec.decode(encoded, meta)
        for k in update:
            torch.testing.assert_close(received[k] + residual[k], target[k], rtol=0, atol=1e-7)
            sent[k] = sent[k] + received[k]
            true[k] = true[k] + update[k]
    for k in sent:
        torch.testing.assert_close(sent[k] + residual[k], true[k], rtol=0, atol=1e-6)
    assert residual[W].abs().max() > 0 and residual[A].abs().max() > 0


# ---- the grammar ---------------------------------------------------------------------------------

def test_grammar():
    codec = make_codec("randk0.75+sign|classifier:int3", seed=5)
    assert isinstance(codec, ByName) and codec.name == "randk0.75+sign|classifier:int3"
    assert [c.name for c in codec.codecs] == ["randk0.75+sign", "int3"] and codec.patterns == ["classifier"]
    assert codec.codecs[0].first.seed == 5
    assert isinstance(make_codec("none|classifier:fp32"), Identity)  # all lossless: no routing at all
    assert isinstance(make_codec("fp32|classifier:int8").codecs[0], Identity)


@pytest.mark.parametrize("spec", ["sign|classifier", "sign|:int8", "sign|classifier:int9", "sign|a b:int8",
                                  "bogus|classifier:int8", "sign|classifier:randk2"])
def test_malformed_rules_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError) as exc:
        make_codec(spec, key="comm.up")
    msg = str(exc.value)
    assert msg.startswith(f"comm.up={spec}: ") and "\n" not in msg


def test_bad_rule_on_the_command_line_is_exit_2(monkeypatch, tmp_path, capsys):
    arg = "comm.up=sign|classifier"
    with pytest.raises(ConfigError, match="must be <pattern>:<codec>"):
        validate(compose_config([arg]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", "logger=none", arg])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("fedtune: error: comm.up=sign|")
    assert not (tmp_path / "outputs").exists()


# ---- a whole run -----------------------------------------------------------------------------------

def test_run_resumes_exactly_with_per_tensor_codecs_and_error_feedback(tmp_path):
    common = [*FAST, "strategy=gradualdiff", "comm.up=randk0.5+sign|lora_A:int3", "comm.error_feedback=true",
              "comm.wire=compact", "comm.entropy=zstd", "checkpoint.keep_last=1"]
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    run(compose_config([*common, "num_rounds=4"]), out_dir=straight)
    run(compose_config([*common, "num_rounds=2"]), out_dir=resumed)
    run(compose_config([*common, "num_rounds=4"]), out_dir=resumed, resume=True)
    stable = [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in read_metrics(straight)]
    assert [{k: r[k] for k in s} for r, s in zip(read_metrics(resumed), stable)] == stable
    # the rule took effect: lora_A at 3 bits costs more than at randk0.5 + 1 bit
    run(compose_config([*FAST, *common[len(FAST):], "comm.up=randk0.5+sign", "num_rounds=1"]), out_dir=plain)
    assert read_metrics(straight)[0]["comm/up_bytes"] > read_metrics(plain)[0]["comm/up_bytes"]
