"""The channel counts len() of the serialized payload and never aliases the sender's tensors."""

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save

from fedtune.comm import channel as channel_module
from fedtune.comm.channel import Channel, Message
from fedtune.comm.spec import make_codec
from fedtune.errors import ConfigError


def _expected_len(tensors, meta, codec_meta):
    """Independent size: safetensors = 8-byte length + JSON header (space-padded to 8) + raw data."""
    header = {"__metadata__": {"meta": json.dumps(meta, sort_keys=True), "codec": json.dumps(codec_meta, sort_keys=True)}}
    offset = 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    return len(save(tensors, metadata=header["__metadata__"])), offset


def test_bytes_equal_serialized_length_and_hand_formula():
    ch = Channel()
    t = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    msg = Message(tensors=t, meta={"num_examples": 7})
    ch.send(msg, round_idx=0, client_id=1, direction="up")
    counted = ch.transfers[0].num_bytes
    expected, data_bytes = _expected_len(t, {"num_examples": 7}, {})
    assert counted == expected
    assert data_bytes == (12 + 5) * 4
    # header: 8-byte length prefix + JSON; the data portion is exact.
    header_len = struct.unpack("<Q", save(t, metadata={"meta": '{"num_examples": 7}', "codec": "{}"})[:8])[0]
    assert counted == 8 + header_len + data_bytes


def test_bf16_about_half_of_fp32():
    t = {"w": torch.randn(256, 256)}
    fp32, bf16 = Channel(), Channel(up=make_codec("bf16"))
    fp32.send(Message(tensors=t), round_idx=0, client_id=0, direction="up")
    got = bf16.send(Message(tensors=t), round_idx=0, client_id=0, direction="up")
    n32, n16 = fp32.transfers[0].num_bytes, bf16.transfers[0].num_bytes
    data = 256 * 256
    assert n32 - 4 * data == pytest.approx(n16 - 2 * data, abs=64)  # same small header either way
    assert got.tensors["w"].dtype == torch.float32  # decoded back to the original dtype
    assert torch.allclose(got.tensors["w"], t["w"], rtol=1e-2, atol=1e-2)
    assert not torch.equal(got.tensors["w"], t["w"])  # bf16 is lossy


def test_fp16_roundtrip_and_directions_counted_separately():
    ch = Channel(up=make_codec("fp16"), down=make_codec("none"))
    t = {"w": torch.randn(100)}
    ch.send(Message(tensors=t), round_idx=2, client_id=0, direction="down")
    ch.send(Message(tensors=t), round_idx=2, client_id=0, direction="up")
    by = ch.bytes_by(2)
    assert by["down"] == len(save(t, metadata={"meta": "{}", "codec": "{}"}))
    assert 0 < by["down"] - 8 - 400 < 128  # length prefix + 100 x 4 data bytes + a small JSON header
    # up: 2 bytes a value, plus the dtype to restore in the header
    assert by["up"] == len(save({"w": t["w"].half()}, metadata={"meta": "{}", "codec": '{"w": "float32"}'}))
    assert ch.bytes_by(1) == {"up": 0, "down": 0}


def test_receiver_never_aliases_sender():
    ch = Channel()
    t = {"w": torch.zeros(10)}
    got = ch.send(Message(tensors=t), round_idx=0, client_id=0, direction="down").tensors["w"]
    assert got.data_ptr() != t["w"].data_ptr()
    t["w"] += 1
    assert torch.equal(got, torch.zeros(10))


def test_empty_message_sends_nothing():
    ch = Channel()
    got = ch.send(Message(pool=(1, 2)), round_idx=0, client_id=0, direction="down")
    assert ch.transfers == [] and got.pool == (1, 2)


def test_unknown_codec_is_a_config_error():
    with pytest.raises(ConfigError, match="comm.up=zip"):
        make_codec("zip", key="comm.up")


def test_channel_times_each_transfer_and_comm_time_is_the_model_exchange(monkeypatch):
    from fedtune.comm import channel as channel_module

    real = channel_module.serialize

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(channel_module, "serialize", slow)
    ch = Channel()
    msg = Message(tensors={"w": torch.ones(3)})
    ch.send(msg, round_idx=0, client_id=0, direction="down")
    ch.send(msg, round_idx=0, client_id=0, direction="up", kind="activations")  # mid-update traffic
    ch.send(msg, round_idx=1, client_id=0, direction="up")
    ch.send(Message(), round_idx=0, client_id=1, direction="up")  # nothing crosses: no record
    assert len(ch.transfers) == 3 and all(t.seconds >= 0.05 for t in ch.transfers)
    assert ch.seconds(0) == ch.transfers[0].seconds  # the model exchange of round 0 only
    assert ch.seconds(0, kinds=("activations",)) == ch.transfers[1].seconds


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                                   torch.int8, torch.uint8, torch.bool, torch.bfloat16])
def test_serialize_writes_safetensors_own_bytes_for_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    big = (10 * torch.randn(6, 5, generator=g)).to(dtype)
    view = big[2:4] if dtype != torch.bfloat16 else big[2:4].clone()  # (the torch path refuses shared memory)
    tensors = {"b.weight": big, "a": view, "scalar": torch.tensor(3).to(dtype), "empty": torch.zeros(0, 4, dtype=dtype)}
    header = {"meta": "{}", "codec": "{}"}
    payload = channel_module.serialize(tensors, header)
    expected = save({k: v.clone() for k, v in tensors.items()}, metadata=header)  # (clones: torch refuses views)
    # the same bytes up to the order of the metadata's keys (a hash map in safetensors: any order, each call)
    assert len(payload) == len(expected) and payload[:8] == expected[:8]
    n = 8 + int.from_bytes(payload[:8], "little")
    assert json.loads(payload[8:n]) == json.loads(expected[8:n]) and payload[n:] == expected[n:]
    back, got_header = channel_module.deserialize(payload)
    assert got_header == header and all(torch.equal(back[k], v) and back[k].dtype == dtype for k, v in tensors.items())


def test_serialize_takes_the_numpy_path_where_numpy_holds_the_dtype(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("safetensors.torch.save called")

    monkeypatch.setattr(channel_module, "st_save", refuse)
    assert channel_module.serialize({"w": torch.ones(2, 3), "i": torch.arange(4)}, {"meta": "{}"})
    with pytest.raises(AssertionError):  # bf16: numpy has no such dtype, the torch path is taken
        channel_module.serialize({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, {"meta": "{}"})
