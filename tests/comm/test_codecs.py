"""Codecs: round trips (exact or bounded), top-k selection, index encodings, bytes through the real
Channel against hand-computed sizes, compositions, the small-tensor rule, error feedback, bad specs."""

import json
import math

import pytest
import torch

from fedtune.comm.channel import Channel, Message, serialize
from fedtune.comm.codec import MIN_NUMEL, Cast, Compose, Identity
from fedtune.comm.feedback import compress_with_feedback, corrected
from fedtune.comm.quantize import CODEBOOKS, FourBit, Int8
from fedtune.comm.sparse import RandomK, TopK, decode_indices, encode_indices, topk_indices
from fedtune.comm.spec import make_codec
from fedtune.errors import ConfigError

SPECS = ["none", "fp32", "fp16", "bf16", "int8", "int8@64", "nf4", "fp4@32", "topk0.1", "randk0.1",
         "topk0.01+int8", "topk0.1+nf4", "topk0.1+fp16", "randk0.5+bf16", "topk1.0"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _send(codec, tensors, meta=None):
    """(received tensors, counted bytes, header entries {name: (dtype, shape)}, codec meta, header length)."""
    ch = Channel(up=codec)
    got = ch.send(Message(tensors=tensors, meta=meta or {}), round_idx=0, client_id=0, direction="up")
    encoded, codec_meta = codec.encode(tensors)
    payload = serialize(encoded, {"meta": json.dumps(meta or {}, sort_keys=True),
                                  "codec": json.dumps(codec_meta, sort_keys=True)})
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len])
    entries = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    assert ch.transfers[0].num_bytes == len(payload)
    return got.tensors, len(payload), entries, codec_meta, header_len


def _data_bytes(entries):
    size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "U16": 2, "I32": 4}
    return sum(size[d] * math.prod(s) for d, s in entries.values())


# ---- the grammar ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "kind"), [
    ("none", Identity), ("fp32", Identity), ("fp16", Cast), ("BF16", Cast), ("int8", Int8), ("int8@64", Int8),
    ("nf4", FourBit), ("fp4@128", FourBit), ("topk0.01", TopK), ("randk0.1", RandomK), ("topk1", TopK),
    ("topk0.01+int8", Compose), ("topk0.1+nf4@33", Compose), ("randk0.1+fp16", Compose), ("topk0.1+none", TopK),
])
def test_grammar(spec, kind):
    assert isinstance(make_codec(spec), kind)
    assert make_codec("int8@64").block_size == 64 and make_codec("int8").block_size == 256
    assert make_codec("nf4").block_size == 64 and make_codec("fp4").quant_type == "fp4"


@pytest.mark.parametrize("spec", ["zip", "int8@0", "int8@", "nf4@x", "topk0", "topk1.5", "topk", "randk-0.1",
                                  "int8+topk0.1", "topk0.1+topk0.1", "nf4+int8", "topk0.1+", "", "fp16+int8"])
def test_unknown_spec_is_one_line_config_error(spec):
    with pytest.raises(ConfigError) as exc:
        make_codec(spec, key="comm.up")
    msg = str(exc.value)
    assert msg.startswith(f"comm.up={spec}: ") and "\n" not in msg
    if spec in ("topk0", "topk1.5"):  # well-formed but out of range: says what is wrong with the fraction
        assert f"the topk fraction {spec[4:]} must be in (0, 1]" in msg
    else:
        assert "int8[@B]" in msg and "topkF" in msg and "randkF" in msg


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_every_codec_keeps_names_shapes_dtypes_through_the_channel(spec):
    g = _gen()
    tensors = {"a.weight": torch.randn(37, 29, generator=g), "b": torch.randn(300, generator=g).bfloat16(),
               "c": torch.randn(16, 32, generator=g).half(), "small": torch.randn(10, generator=g),
               "labels": torch.arange(500)}
    got, *_ = _send(make_codec(spec), tensors, meta={"num_examples": 3})
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].shape == t.shape and got[k].dtype == t.dtype, k
    assert torch.equal(got["labels"], tensors["labels"])
    if "fp16" not in spec and "bf16" not in spec:  # small tensors are left alone (casts still cast them)
        assert torch.equal(got["small"], tensors["small"])


@pytest.mark.parametrize("spec", ["none", "fp32", "topk1.0", "topk1", "randk1"])
def test_lossless_codecs_are_exact(spec):
    x = {"w": torch.randn(64, 64, generator=_gen()), "v": torch.randn(1000, generator=_gen(1))}
    got, num_bytes, entries, _, _ = _send(make_codec(spec), x)
    assert all(torch.equal(got[k], x[k]) for k in x)
    assert _data_bytes(entries) == (4096 + 1000) * 4  # k=1: all values, no indices


@pytest.mark.parametrize(("spec", "rel"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_casts_relative_error(spec, rel):
    x = torch.randn(64, 64, generator=_gen()) * 10
    got = make_codec(spec).decode(*make_codec(spec).encode({"w": x}))["w"]
    assert ((got - x).abs() <= rel * x.abs()).all()


def _block_absmax(x, block_size):
    flat = x.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    return blocks.abs().amax(1).repeat_interleave(block_size)[: flat.numel()]


@pytest.mark.parametrize("block_size", [256, 64, 100])
def test_int8_error_is_at_most_half_a_step_per_block(block_size):
    x = torch.randn(37, 29, generator=_gen()) * torch.linspace(0.01, 10, 29)  # blocks of very different scale
    codec = Int8(block_size=block_size)
    encoded, meta = codec.encode({"w": x})
    assert encoded["w"].dtype == torch.int8 and encoded["w"].shape == x.shape
    assert meta == {"@int8": str(block_size)}
    got = codec.decode(encoded, meta)["w"]
    bound = _block_absmax(x, block_size) / 254 * (1 + 1e-6) + 1e-7
    assert ((got - x).abs().reshape(-1) <= bound).all()
    assert (got - x).abs().max() > 0  # lossy


@pytest.mark.parametrize(("quant_type", "rel_l2"), [("nf4", 0.10), ("fp4", 0.13)])
def test_4bit_error_is_at_most_half_the_widest_codebook_gap(quant_type, rel_l2):
    x = torch.randn(61, 67, generator=_gen())
    codec = FourBit(quant_type=quant_type)
    encoded, meta = codec.encode({"w": x})
    assert encoded["w"].numel() == math.ceil(x.numel() / 2) and meta["w"] == "61x67"
    got = codec.decode(encoded, meta)["w"]
    code = sorted(CODEBOOKS[quant_type])
    half_gap = max(b - a for a, b in zip(code, code[1:])) / 2  # nf4 0.152, fp4 0.167: nearest-entry rounding
    assert ((got - x).abs().reshape(-1) <= _block_absmax(x, 64) * half_gap * (1 + 1e-6)).all()
    # measured on N(0,1): nf4 0.092, fp4 0.122 relative L2 error (block 64)
    assert (got - x).norm() / x.norm() < rel_l2


# bitsandbytes 0.50 quantize_4bit(x, blocksize=64) of this x, packed bytes in hex (importing bitsandbytes
# costs ~6 s, so the live comparison below is marked slow)
_X4 = ((torch.arange(271) * 37) % 101 - 50).float() / 8  # exact values; odd count: a padding nibble
_BNB = {
    "nf4": "04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a"
           "04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a"
           "04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c06e18e7",
    "fp4": "bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7"
           "bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7"
           "bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be2a12d73c5be2a630",
}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_bytes_are_bitsandbytes_bytes(quant_type):
    encoded, meta = FourBit(quant_type=quant_type).encode({"w": _X4})
    assert encoded["w"].numpy().tobytes().hex() == _BNB[quant_type]
    assert encoded["w::absmax"].tolist() == [6.25, 6.25, 6.25, 6.25, 6.125]


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_live_bitsandbytes(quant_type):
    bnb = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(64 * 20 + 7, generator=_gen())
    encoded, meta = FourBit(quant_type=quant_type).encode({"w": x})
    packed, state = bnb.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(encoded["w"], packed.flatten()) and torch.equal(encoded["w::absmax"], state.absmax)
    assert torch.equal(bnb.get_4bit_type(quant_type, device="cpu"), torch.tensor(CODEBOOKS[quant_type]))
    ours = FourBit(quant_type=quant_type).decode(encoded, meta)["w"]
    assert torch.equal(ours, bnb.dequantize_4bit(packed, state).flatten())


@pytest.mark.parametrize("spec", ["int8", "nf4", "topk0.1", "topk0.1+int8", "randk0.5+nf4"])
def test_half_precision_inputs_come_back_in_their_dtype(spec):
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(32, 32, generator=_gen()).to(dtype)
        codec = make_codec(spec)
        got = codec.decode(*codec.encode({"w": x}))["w"]
        assert got.dtype == dtype and got.shape == x.shape and torch.isfinite(got).all()


@pytest.mark.parametrize("spec", ["int8", "nf4", "fp4", "topk0.1", "topk0.01+int8", "randk1+int8"])
def test_non_finite_values_stay_non_finite(spec):
    x = torch.randn(64, 64, generator=_gen())
    x[3, 5], x[60, 1] = float("nan"), float("inf")
    got, *_ = _send(make_codec(spec), {"w": x})
    assert not torch.isfinite(got["w"][3, 5]) and not torch.isfinite(got["w"][60, 1])


# ---- top-k and random-k --------------------------------------------------------------------------

def test_topk_keeps_exactly_ceil_k_n_largest_and_zeros_the_rest():
    x = torch.randn(300, generator=_gen())
    codec = TopK(fraction="0.07")  # 0.07 * 300 == 21.000000000000004 in floats: must keep 21, not 22
    got = codec.decode(*codec.encode({"w": x}))["w"]
    kept = got != 0
    assert int(kept.sum()) == 21
    assert torch.equal(got[kept], x[kept])
    assert x[kept].abs().min() > x[~kept].abs().max()


def test_topk_ties_go_to_the_lower_index():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 3.0] * 40)  # 280 elements; |2| ties at the cut
    assert topk_indices(x[:7], 3).tolist() == [1, 2, 6] and topk_indices(x[:7], 4).tolist() == [1, 2, 4, 6]
    codec = TopK(fraction="0.5")
    got = codec.decode(*codec.encode({"w": x}))["w"]
    # 140 kept: the 40 threes and the first 100 of the 160 |2|s by index
    twos = torch.nonzero(x.abs() == 2).flatten()
    assert torch.equal(torch.nonzero(got.abs() == 2).flatten(), twos[:100])
    assert int((got != 0).sum()) == 140


def test_randk_sends_no_indices_and_is_reproducible():
    x = torch.randn(64, 64, generator=_gen())
    codec = RandomK(fraction="0.1", seed=7)
    (enc1, meta1), (enc2, meta2) = codec.encode({"w": x}), codec.encode({"w": x.clone()})
    assert enc1.keys() == {"w::values"} and meta1 == meta2 and torch.equal(enc1["w::values"], enc2["w::values"])
    got, num_bytes, entries, _, _ = _send(codec, {"w": x})
    kept = got["w"] != 0
    assert int(kept.sum()) == 410 and torch.equal(got["w"][kept], x[kept])
    assert entries == {"w::values": ("F32", [410])}
    # a new round (new content) or another seed draws other positions
    assert codec.encode({"w": x + 1})[1] != meta1 and RandomK(fraction="0.1", seed=8).encode({"w": x})[1] != meta1


# ---- index encodings -----------------------------------------------------------------------------

@pytest.mark.parametrize(("idx", "n", "encoding", "num_bytes"), [
    (torch.arange(0, 1000, 2), 1000, "b", 125),                       # dense: a bitmap
    (torch.arange(9, 10000, 10), 10000, "e4", 500),                   # gaps of 10: one nibble each
    (torch.arange(99, 100000, 100), 100000, "e8", 1000),              # gaps of 100: one byte each
    (torch.arange(999, 1000000, 1000), 1000000, "e16", 2000),         # gaps of 1000: two bytes each
    (torch.tensor([200000, 400000, 600000]), 700000, "d32", 12),       # e16 would need 4 x 2 bytes each
    (torch.arange(500), 500, "all", 0),
])
def test_index_encoding_is_the_smallest(idx, n, encoding, num_bytes):
    data, got = encode_indices(idx, n)
    assert got == encoding
    assert (0 if data is None else data.numel() * data.element_size()) == num_bytes
    assert torch.equal(decode_indices(data, got, n), idx)


@pytest.mark.parametrize("encoding", ["b", "e4", "e8", "e16", "d32"])
def test_every_index_encoding_round_trips_at_the_escape_edges(encoding):
    gaps = torch.tensor([1, 15, 16, 17, 30, 31, 255, 256, 257, 510, 511, 65535, 65536, 65537, 200000, 1, 1])
    idx = torch.cumsum(gaps, 0) - 1
    n = int(idx[-1]) + 5
    data, got = encode_indices(idx, n, encoding)
    assert got == encoding and torch.equal(decode_indices(data, encoding, n), idx)


def test_index_encodings_measured_on_512x512():
    """k=1%: e8, 8.7 bits an index (bitmap 32768 B, int32 10488 B); k=10%: e4, ~5 bits (bitmap 32768 B)."""
    x = torch.randn(512, 512, generator=_gen())
    for k, encoding, max_bytes in [(2622, "e8", 2900), (26215, "e4", 17000)]:
        data, got = encode_indices(topk_indices(x, k), x.numel())
        assert got == encoding and data.numel() * data.element_size() < max_bytes


# ---- bytes through the real channel, against hand-computed sizes ---------------------------------

def test_int8_bytes_64x64():
    x = torch.randn(64, 64, generator=_gen())
    got, num_bytes, entries, meta, header_len = _send(make_codec("int8@64"), {"w": x})
    assert entries == {"w": ("I8", [64, 64]), "w::absmax": ("F32", [64])}
    assert meta == {"@int8": "64"}
    assert num_bytes == 8 + header_len + 4096 + 64 * 4  # int8 values + fp32 absmax per block of 64
    assert header_len <= 200  # two entries and the meta
    assert num_bytes / _send(make_codec("none"), {"w": x})[1] < 0.28


def test_nf4_bytes_64x64():
    _, num_bytes, entries, meta, header_len = _send(make_codec("nf4"), {"w": torch.randn(64, 64, generator=_gen())})
    assert entries == {"w": ("U8", [2048]), "w::absmax": ("F32", [64])}
    assert meta == {"w": "64x64", "@nf4": "64"}
    assert num_bytes == 8 + header_len + 2048 + 64 * 4


def test_topk_and_composition_bytes_64x64():
    x = torch.zeros(64, 64)
    x.view(-1)[::10] = torch.arange(1, 411, dtype=torch.float32)  # the 410 = ceil(0.1 * 4096) kept, 10 apart
    _, num_bytes, entries, meta, header_len = _send(make_codec("topk0.1"), {"w": x})
    assert entries == {"w::values": ("F32", [410]), "w::idx": ("U8", [205])}  # 410 one-nibble gaps
    assert meta == {"w": "64x64:e4"}
    assert num_bytes == 8 + header_len + 410 * 4 + 205
    got, num_bytes, entries, meta, header_len = _send(make_codec("topk0.1+int8"), {"w": x})
    assert entries == {"w::values": ("I8", [410]), "w::values::absmax": ("F32", [2]), "w::idx": ("U8", [205])}
    assert meta == {"w": "64x64:e4", "@int8": "256"}
    assert num_bytes == 8 + header_len + 410 + 2 * 4 + 205
    assert header_len < 300  # the whole header, meta included
    assert (got["w"] - x).abs().max() <= 410 / 254


def test_small_tensors_travel_as_they_are():
    """Break-even measured: below ~25 (short names) to ~65 (LoRA-length names) elements, an extra
    header entry costs more than quantizing or sparsifying saves; MIN_NUMEL=256 leaves a margin."""
    name = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tiny = {name: torch.randn(16, generator=_gen())}
    fp32 = _send(make_codec("none"), tiny)[1]
    assert _send(Int8(min_numel=1), tiny)[1] > fp32 and _send(TopK(fraction="0.1", min_numel=1), tiny)[1] > fp32
    below = {name: torch.randn(MIN_NUMEL - 1, generator=_gen())}
    for spec in ("int8", "nf4", "topk0.1", "randk0.1", "topk0.01+int8"):
        assert _send(make_codec(spec), below)[1] == _send(make_codec("none"), below)[1]
    at = {name: torch.randn(MIN_NUMEL, generator=_gen())}
    assert _send(make_codec("int8"), at)[1] < 0.55 * _send(make_codec("none"), at)[1]


def test_composition_encodes_the_kept_values():
    x = torch.randn(128, 128, generator=_gen())
    for spec, bound in [("topk0.1+int8", 1 / 254), ("topk0.1+nf4", 0.1520), ("topk0.1+fp16", 2**-11)]:
        codec = make_codec(spec)
        got = codec.decode(*codec.encode({"w": x}))["w"]
        kept = topk_indices(x, 1639)
        assert torch.equal(torch.nonzero(got.reshape(-1)).flatten(), kept)  # same support as plain top-k
        err = (got.reshape(-1)[kept] - x.reshape(-1)[kept]).abs()
        assert err.max() <= bound * x.abs().max() * (1 + 1e-6), spec


# ---- error feedback ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["topk0.05", "topk0.1+int8", "randk0.1", "nf4", "bf16", "none"])
def test_error_feedback_conserves_the_sum(spec):
    codec, g = make_codec(spec), _gen()
    residual, sent_sum, true_sum = None, torch.zeros(64, 64), torch.zeros(64, 64)
    for _ in range(6):
        update = {"w": 0.01 * torch.randn(64, 64, generator=g), "n": torch.tensor([3])}
        encoded, meta, residual = compress_with_feedback(codec, update, residual)
        received = codec.decode(encoded, meta)
        assert torch.equal(received["n"], update["n"]) and "n" not in residual
        sent_sum += received["w"]
        true_sum += update["w"]
        torch.testing.assert_close(sent_sum + residual["w"], true_sum, rtol=0, atol=1e-6)
    if spec != "none":
        assert residual["w"].abs().max() > 0
    else:
        assert residual["w"].abs().max() == 0


def test_error_feedback_matches_the_channel_and_keeps_absent_residuals():
    codec = make_codec("topk0.1+int8")
    update = {"w": torch.randn(32, 32, generator=_gen()), "b": torch.randn(32, 32, generator=_gen(1)).bfloat16()}
    residual = {"w": torch.randn(32, 32, generator=_gen(2)), "old": torch.ones(3)}
    encoded, meta, new_residual = compress_with_feedback(codec, update, residual)
    assert torch.equal(new_residual["old"], residual["old"]) and new_residual["b"].dtype == torch.float32
    # the client sends corrected(update, residual): the channel delivers exactly decode(encoded)
    got = Channel(up=codec).send(Message(tensors=corrected(update, residual)), round_idx=0, client_id=0,
                                 direction="up").tensors
    ref = codec.decode(encoded, meta)
    assert all(torch.equal(got[k], ref[k]) for k in update)
    torch.testing.assert_close(got["w"] + new_residual["w"], update["w"] + residual["w"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["b"].float() + new_residual["b"], update["b"].float(), rtol=0, atol=1e-6)
