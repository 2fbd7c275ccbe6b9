"""The compact wire format and entropy coding: exact round trips, and byte counts written out by hand.

Expected payloads below are spelled byte by byte from the layout in fedtune/comm/wire.py's docstring
(varint = LEB128; value tags: 0 None, 2 True, 3 int, 4 float, 5 JSON, 6 decimal string, 7 shape,
8 pair, 9 word+number, 10 word, 11 text; dtype codes: 0 float32, 2 bfloat16, 4 int8; +0x80 same shape).
"""

import json
import struct

import pytest
import torch
import zstandard
from safetensors.torch import save

from fedtune.comm.channel import Channel, Message
from fedtune.comm.spec import make_codec
from fedtune.comm.wire import Table, decode, encode

SPECS = ["none", "bf16", "int8", "nf4", "topk0.01+int8", "randk0.1", "fp16", "fp4", "sign", "int2", "int3s@32",
         "topk0.1+tern"]


def _raw(t: torch.Tensor) -> list[int]:
    return list(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _send(ch: Channel, msg: Message, *, client_id: int = 0, direction: str = "up", round_idx: int = 0) -> Message:
    return ch.send(msg, round_idx=round_idx, client_id=client_id, direction=direction)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k


def _tiny_lora_r8() -> dict[str, torch.Tensor]:
    """The names and shapes of the default ``tiny`` model's trainable state at lora.r=8 (read from a run:
    4 layers x 7 LoRA-wrapped linears x (A, B), plus the trained embeddings and lm_head), random values."""
    linears = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 128), "self_attn.v_proj": (128, 128),
               "self_attn.o_proj": (128, 128), "mlp.gate_proj": (128, 256), "mlp.up_proj": (128, 256),
               "mlp.down_proj": (256, 128)}
    gen, prefix, shapes = torch.Generator().manual_seed(0), "base_model.model.model.", {}
    for layer in range(4):
        for name, (fan_in, fan_out) in linears.items():
            shapes[f"{prefix}layers.{layer}.{name}.lora_A.weight"] = (8, fan_in)
            shapes[f"{prefix}layers.{layer}.{name}.lora_B.weight"] = (fan_out, 8)
    shapes[f"{prefix}embed_tokens.weight"] = shapes["base_model.model.lm_head.weight"] = (93, 128)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


# ---- exact round trips, both formats --------------------------------------------------------------

def _many_dtypes() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=gen)
    return {
        "fp32": torch.randn(3, 4, generator=gen), "fp16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(2, 2, generator=gen).bfloat16(),
        "int8": torch.randint(-128, 128, (7,), dtype=torch.int8, generator=gen),
        "uint8": torch.randint(0, 256, (2, 3), dtype=torch.uint8, generator=gen),
        "int32": torch.randint(-2**31, 2**31 - 1, (3,), dtype=torch.int32, generator=gen),
        "int64": torch.tensor([-2**62, 0, 2**62 + 5]), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25), "empty": torch.zeros(0, 3), "transposed": base.t(), "strided": base[::2, 1::2],
    }


@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_every_dtype_and_layout_round_trips_exactly_in_both_formats(entropy):
    tensors = _many_dtypes()
    assert not tensors["transposed"].is_contiguous() and not tensors["strided"].is_contiguous()
    meta = {"num_examples": 7, "loss": 0.1 + 0.2, "name": "hello world!", "none": None, "flag": True,
            "list": [1, "x", {"b": 2, "a": 1}], "nested": {"z": 1.5}, "neg": -12345678901234567890}
    got = {wire: _send(Channel(wire=wire, entropy=entropy), Message(tensors=tensors, meta=meta))
           for wire in ("safetensors", "compact")}
    for msg in got.values():
        _assert_same(msg.tensors, tensors)
        assert msg.meta == json.loads(json.dumps(meta, sort_keys=True))
        assert list(msg.meta) == sorted(meta)
    assert got["compact"].meta == got["safetensors"].meta


def test_meta_with_non_string_keys_takes_the_json_form_like_safetensors():
    meta = {1: "a", 2: [3]}
    got = {w: _send(Channel(wire=w), Message(tensors={"w": torch.ones(2)}, meta=meta)).meta
           for w in ("safetensors", "compact")}
    assert got["compact"] == got["safetensors"] == {"1": "a", "2": [3]}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_every_codec_decodes_identically_over_both_formats(spec, entropy):
    gen = torch.Generator().manual_seed(2)
    tensors = {"layer.lora_A.weight": torch.randn(8, 128, generator=gen),
               "layer.lora_B.weight": torch.randn(128, 8, generator=gen).bfloat16(),
               "norm.weight": torch.randn(16, generator=gen), "counts": torch.arange(5)}
    got = {}
    for wire in ("safetensors", "compact"):
        ch = Channel(up=make_codec(spec, seed=3), wire=wire, entropy=entropy)
        got[wire] = [_send(ch, Message(tensors=tensors, meta={"num_examples": 4}), round_idx=r) for r in range(2)]
    for s, c in zip(got["safetensors"], got["compact"]):
        _assert_same(c.tensors, s.tensors)
        assert c.meta == s.meta == {"num_examples": 4}


def test_the_receiver_never_aliases_the_sender():
    t = {"w": torch.zeros(10), "i": torch.zeros(4, dtype=torch.int64)}
    got = _send(Channel(wire="compact", entropy="zstd"), Message(tensors=t)).tensors
    assert all(got[k].data_ptr() != t[k].data_ptr() for k in t)
    t["w"] += 1
    t["i"] += 1
    assert torch.equal(got["w"], torch.zeros(10)) and torch.equal(got["i"], torch.zeros(4, dtype=torch.int64))
    got["w"] += 2  # the receiver may write into its copy
    assert torch.equal(t["w"], torch.ones(10))


# ---- byte counts by hand ----------------------------------------------------------------------------

A = torch.arange(6, dtype=torch.float32).reshape(2, 3)
B = torch.tensor([1, -2, 3, -4], dtype=torch.int8)


def _first_payload() -> bytes:
    # strings "lora.A" (0), "lora.B" (1: 5 bytes shared with "lora.A"), "num_examples" (2)
    strings = [3, 0, 6, *b"lora.A", 5, 1, *b"B", 0, 12, *b"num_examples"]
    meta = [2, 2, 3, 14]  # one entry: key 2, int 7 (zigzag 14)
    codec_meta = [0]
    tensors = [2, 0, 0, 2, 2, 3, *_raw(A), 1, 4, 1, 4, *_raw(B)]  # id, dtype, ndim, dims, raw
    return bytes(strings + meta + codec_meta + tensors)


def _second_payload() -> bytes:
    return bytes([0, 2, 2, 3, 14, 0, 2, 0, 0x80, *_raw(A), 1, 4 | 0x80, *_raw(B)])  # no strings, no shapes


def test_payload_bytes_are_the_documented_layout():
    table = Table()
    msg = ({"lora.A": A, "lora.B": B}, {"num_examples": 7}, {})
    assert encode(*msg, table) == _first_payload()
    assert encode(*msg, table) == _second_payload()
    # a new name later: only it is added (front-coded against the table's last string, "num_examples")
    absmax = torch.tensor([2.5], dtype=torch.bfloat16)
    third = encode({"lora.A": A, "lora.A::absmax": absmax}, {"num_examples": 7}, {}, table)
    assert third == bytes([1, 0, 14, *b"lora.A::absmax", 2, 2, 3, 14, 0, 2, 0, 0x80, *_raw(A), 3, 2, 1, 1,
                           *_raw(absmax)])
    assert table.strings == ["lora.A", "lora.B", "num_examples", "lora.A::absmax"]


def test_meta_values_are_packed_by_kind():
    meta = {"a": None, "b": True, "c": -3, "d": 0.5, "e": [1, 2], "f": "16x16", "g": "64", "h": "128x8:e8",
            "i": "r123", "j": "float32", "k": "hello world!", "l": "relu"}
    payload = encode({}, meta, {}, Table())
    # strings: the keys, and the words of values: "e" (of e8, also a key), "float", "r", "relu"
    words = ["a", "b", "c", "d", "e", "f", "float", "g", "h", "i", "j", "k", "l", "r", "relu"]
    front_coded = {"float": [1, 4, *b"loat"], "relu": [1, 3, *b"elu"]}  # 1 byte shared with "f", "r"
    strings = [15]
    for w in words:
        strings += front_coded[w] if w in front_coded else [0, 1, ord(w)]
    ids = {w: i for i, w in enumerate(words)}
    values = [
        [0], [2], [3, 5], [4, *struct.pack("<d", 0.5)], [5, 6, *b"[1, 2]"], [7, 2, 16, 16], [6, 0x80, 0x01],
        [8, 7, 2, 0x80, 0x01, 8, 9, ids["e"], 8], [9, ids["r"], 123], [9, ids["float"], 32],
        [11, 12, *b"hello world!"], [10, ids["relu"]],
    ]
    meta_bytes = [2 * len(meta)]
    for key, value in zip(sorted(meta), values):
        meta_bytes += [ids[key], *value]
    assert payload == bytes(strings + meta_bytes + [0, 0])
    assert decode(payload, Table()) == ({}, meta, {})


def test_the_table_is_counted_once_per_client_and_direction_and_again_for_new_names():
    ch = Channel(wire="compact")
    msg = Message(tensors={"lora.A": A, "lora.B": B}, meta={"num_examples": 7})
    for cid, direction in [(0, "up"), (0, "up"), (0, "down"), (1, "up"), (0, "down"), (1, "up")]:
        _send(ch, msg, client_id=cid, direction=direction)
    first, second = len(_first_payload()), len(_second_payload())
    assert [t.num_bytes for t in ch.transfers] == [first, second, first, first, second, second]
    assert first - second == (26 - 1) + (3 + 2)  # the strings section (26 bytes, else 1), the two shapes
    bigger = Message(tensors={"lora.A": A, "lora.A::absmax": torch.tensor([2.5], dtype=torch.bfloat16)},
                     meta={"num_examples": 7})
    _send(ch, bigger)
    _send(ch, bigger)
    assert ch.transfers[-2].num_bytes - ch.transfers[-1].num_bytes == (17 - 1) + 2  # "lora.A::absmax", its shape


def test_the_tables_survive_state_dict():
    msg = Message(tensors={"lora.A": A, "lora.B": B}, meta={"num_examples": 7})
    ch = Channel(wire="compact")
    _send(ch, msg)
    state = ch.state_dict()
    resumed = Channel(wire="compact")
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain data: survives any serializer
    _send(resumed, msg)
    _send(Channel(wire="compact"), msg)  # a fresh channel sends the table again
    assert resumed.transfers[0].num_bytes == len(_second_payload())


def test_tiny_lora_header_is_under_one_percent_of_the_payload():
    state = _tiny_lora_r8()
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert (len(state), raw) == (58, 373_760)
    compact, st = Channel(wire="compact"), Channel()
    for r in range(2):
        _send(compact, Message(tensors=state, meta={"num_examples": 30}), round_idx=r)
    _send(st, Message(tensors=state, meta={"num_examples": 30}))
    first, later = (t.num_bytes - raw for t in compact.transfers)
    assert first < 0.005 * raw  # with the name table (measured: 1424 bytes, 0.38%)
    assert later == 3 + 1 + 58 * 2 + 3  # counts + meta (key, tag, 30) + (id, code) a tensor: 123 bytes
    assert st.transfers[0].num_bytes - raw > 7000  # safetensors: the JSON header every time


# ---- zstd ------------------------------------------------------------------------------------------

def _zstd_len(payload: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=3).compress(payload))


def test_zstd_counts_the_compressed_length_of_the_safetensors_payload():
    codes = torch.round(torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) * 20).to(torch.int8)
    tensors = {"w": codes, "b": torch.ones(8)}
    ch = Channel(entropy="zstd")
    got = _send(ch, Message(tensors=tensors, meta={"num_examples": 3}))
    plain = save(tensors, metadata={"meta": '{"num_examples": 3}', "codec": "{}"})
    assert ch.transfers[0].num_bytes == _zstd_len(plain) < len(plain)
    _assert_same(got.tensors, tensors)


def test_zstd_counts_the_compressed_length_of_the_compact_payload():
    ch = Channel(wire="compact", entropy="zstd")
    msg = Message(tensors={"lora.A": A, "lora.B": B}, meta={"num_examples": 7})
    got = [_send(ch, msg) for _ in range(2)]
    assert [t.num_bytes for t in ch.transfers] == [_zstd_len(_first_payload()), _zstd_len(_second_payload())]
    for g in got:
        _assert_same(g.tensors, msg.tensors)
        assert g.meta == {"num_examples": 7}


def test_defaults_are_the_safetensors_wire_without_entropy_coding():
    from fedtune.config import compose_config
    from fedtune.world import make_channel

    ch = Channel()
    assert (ch.wire, ch.entropy) == ("safetensors", "none")
    assert (make_channel(compose_config([])).wire, make_channel(compose_config([])).entropy) == ("safetensors", "none")
    ch = make_channel(compose_config(["comm.wire=compact", "comm.entropy=zstd"]))
    assert (ch.wire, ch.entropy) == ("compact", "zstd")
