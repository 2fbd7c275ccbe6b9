"""Low-bit codecs (sign, tern, int2, int3 and their stochastic variants): hand-made bytes, a pure-python
reference of the documented rules, block edges, scale dtype, non-finite values, deterministic and
unbiased stochastic rounding, error bounds, bytes through the real Channel, error feedback, the grammar."""

import json
import math

import pytest
import torch
from safetensors.torch import save

from fedtune.comm.channel import Channel, Message
from fedtune.comm.codec import MIN_NUMEL, Compose
from fedtune.comm.feedback import compress_with_feedback
from fedtune.comm.lowbit import LowBit
from fedtune.comm.sparse import topk_indices
from fedtune.comm.spec import make_codec
from fedtune.errors import ConfigError

KINDS = ["sign", "tern", "int2", "int3"]
ALL = KINDS + [k + "s" for k in KINDS]
# written out, not imported: the documented levels in units of the block's scale
REF_LEVELS = {"sign": [-1.0, 1.0], "tern": [-1.0, 0.0, 1.0], "int2": [-1.0, -1 / 3, 1 / 3, 1.0],
              "int3": [(2 * c - 7) / 7 for c in range(8)]}
REF_BITS = {"sign": 1, "int2": 2, "int3": 3}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _codec(spec, **kw):
    kind, stochastic = spec.rstrip("s"), spec.endswith("s")
    return LowBit(kind=kind, stochastic=stochastic, **kw)


def _roundtrip(codec, x, name="w"):
    return codec.decode(*codec.encode({name: x}))[name]


# ---- a pure-python reference of the documented rules ---------------------------------------------

def _bf16(v):
    return torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).item()


def _nearest(v, levels):
    """Index of the nearest level, ties to the upper one (count of midpoints <= v)."""
    return sum(v >= (a + b) / 2 for a, b in zip(levels, levels[1:]))


def _ref_scale(kind, xs):
    a = [abs(v) for v in xs]
    if kind == "sign":
        return sum(a) / len(a)
    if kind == "tern":  # every k: keep the k largest at +-S_k/k; the best S_k^2/k (first of equals)
        srt = sorted(a, reverse=True)
        best = max(range(1, len(srt) + 1), key=lambda k: (sum(srt[:k]) ** 2 / k, -k))
        return sum(srt[:best]) / best
    levels, top = REF_LEVELS[kind], max(a)

    def err(s):
        return sum((levels[_nearest(v / s, levels)] * s - v) ** 2 for v in xs) if s > 0 else 0.0

    clips = [top * (1 - 0.05 * i) for i in range(15)]
    return min(clips, key=lambda s: (err(s), clips.index(s)))


def _ref_pack(kind, codes):
    if kind == "tern":
        digits = codes + [0] * (-len(codes) % 5)
        return bytes(sum(d * 3 ** (4 - j) for j, d in enumerate(digits[i : i + 5])) for i in range(0, len(digits), 5))
    stream = "".join(format(c, f"0{REF_BITS[kind]}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))


def _ref_encode(kind, xs, block_size):
    """(packed bytes, bf16 scales as floats) of the deterministic rule, one python loop."""
    codes, scales = [], []
    for start in range(0, len(xs), block_size):
        block = xs[start : start + block_size]
        s = _bf16(_ref_scale(kind, block))
        scales.append(s)
        codes += [_nearest(v / s if s else 0.0, REF_LEVELS[kind]) for v in block]
    return _ref_pack(kind, codes), scales


def _ref_decode(kind, data, scales, n, block_size):
    if kind == "tern":
        codes = [b // 3 ** (4 - j) % 3 for b in data for j in range(5)][:n]
    else:
        bits = "".join(format(b, "08b") for b in data)
        width = REF_BITS[kind]
        codes = [int(bits[i * width : (i + 1) * width], 2) for i in range(n)]
    return [REF_LEVELS[kind][c] * scales[i // block_size] for i, c in enumerate(codes)]


# ---- hand-made bytes: packing order, block edges -------------------------------------------------

@pytest.mark.parametrize(("kind", "block_size", "x", "packed", "scales", "decoded"), [
    # codes 1010 1101 10: first value in the high bit; the short last block's mean is over its 2 values
    ("sign", 4, [1, -2, 3, -4, 0, 5, -6, 7, 8, -9], [0xAD, 0x80], [2.5, 4.5, 8.5],
     [2.5, -2.5, 2.5, -2.5, 4.5, 4.5, -4.5, 4.5, 8.5, -8.5]),
    # |x| sorted 4 3 2 1 .5: S_k^2/k = 16 24.5 27 25 22.05 -> k=3, s=3; digits 2 1 1 0 2 -> 162+27+9+2;
    # block 2: -6 0 -> s=6, digits 0 1 (+ padding 0 0 0) -> 27
    ("tern", 5, [4, -1, 0.5, -3, 2, -6, 0], [200, 27], [3.0, 6.0], [3, 0, 0, -3, 3, -6, 0]),
    # values on the levels (+-1/3, +-1) x absmax: codes 3 1 2 0 | 3 1 -> 11011000 1101(0000)
    ("int2", 4, [3, -1, 1, -3, 1.5, -0.5], [0xD8, 0xD0], [3.0, 1.5], [3, -1, 1, -3, 1.5, -0.5]),
    # codes 7..0 -> 111 110 101 100 011 010 001 000; block 2: -2 alone -> code 0 (000, then padding)
    ("int3", 8, [7, 5, 3, 1, -1, -3, -5, -7, -2], [0xFA, 0xC6, 0x88, 0x00], [7.0, 2.0],
     [7, 5, 3, 1, -1, -3, -5, -7, -2]),
])
def test_hand_made_bytes(kind, block_size, x, packed, scales, decoded):
    codec = LowBit(kind=kind, block_size=block_size, min_numel=1)
    encoded, meta = codec.encode({"w": torch.tensor(x, dtype=torch.float32)})
    assert encoded["w"].dtype == torch.uint8 and encoded["w"].tolist() == packed
    assert encoded["w::scale"].dtype == torch.bfloat16 and encoded["w::scale"].tolist() == scales
    assert meta == {"w": f"{len(x)}:float32", f"@{kind}": str(block_size)}
    assert codec.decode(encoded, meta)["w"].tolist() == decoded


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "block_size"), [(300, 64), (257, 16), (263, 100), (256, 256)])
def test_deterministic_codecs_match_the_python_reference(kind, n, block_size):
    x = torch.randn(n, generator=_gen(n)) * torch.linspace(0.1, 3, n)  # blocks of different scales
    codec = LowBit(kind=kind, block_size=block_size)
    encoded, meta = codec.encode({"w": x})
    data, scales = _ref_encode(kind, x.tolist(), block_size)
    assert encoded["w"].numpy().tobytes() == data
    assert encoded["w::scale"].tolist() == scales
    expected_len = math.ceil(n / 5) if kind == "tern" else math.ceil(n * REF_BITS[kind] / 8)
    assert len(data) == expected_len and len(scales) == math.ceil(n / block_size)
    got = codec.decode(encoded, meta)["w"]
    assert got.tolist() == pytest.approx(_ref_decode(kind, list(data), scales, n, block_size), rel=1e-6, abs=0)


def test_codes_are_computed_with_the_scale_the_receiver_gets():
    """absmax 1 + 2^-10 travels as bf16 1.0: 0.6669 is above the int2 midpoint 2/3 of that scale (level 1),
    below the one of the fp32 scale (level 1/3)."""
    x = torch.ones(256)
    x[0], x[1] = 1 + 2**-10, 0.6669
    got = _roundtrip(LowBit(kind="int2"), x)
    assert got[1] == 1.0 and torch.equal(got[2:], torch.ones(254))


@pytest.mark.parametrize("spec", ALL)
def test_rules_agree_with_the_python_decoder(spec):
    """Stochastic codecs too: decoded = level[code] * scale, codes read back from the bytes by hand."""
    x = torch.randn(3, 111, generator=_gen())
    codec = _codec(spec, block_size=50, seed=3)
    encoded, meta = codec.encode({"w": x})
    ref = _ref_decode(spec.rstrip("s"), list(encoded["w"].numpy().tobytes()), encoded["w::scale"].tolist(), 333, 50)
    got = codec.decode(encoded, meta)["w"]
    assert got.shape == (3, 111) and got.reshape(-1).tolist() == pytest.approx(ref, rel=1e-6, abs=0)


# ---- scales, dtypes, small and non-finite tensors ------------------------------------------------

@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_are_bf16_and_the_dtype_comes_back(spec, dtype):
    x = (torch.randn(16, 40, generator=_gen()) * 1e-5).to(dtype)  # small values: fp16 scales would be subnormal
    codec = _codec(spec)
    encoded, meta = codec.encode({"w": x})
    assert encoded["w::scale"].dtype == torch.bfloat16 and meta["w"] == f"16x40:{str(dtype)[6:]}"
    got = codec.decode(encoded, meta)["w"]
    assert got.dtype == dtype and got.shape == x.shape and torch.isfinite(got).all() and got.abs().max() > 0


@pytest.mark.parametrize("spec", ALL)
def test_small_and_integer_tensors_travel_as_they_are(spec):
    tensors = {"small": torch.randn(MIN_NUMEL - 1, generator=_gen()), "ids": torch.arange(1000)}
    codec = make_codec(spec)
    encoded, meta = codec.encode(tensors)
    assert encoded.keys() == tensors.keys() and meta == {}
    got = codec.decode(encoded, meta)
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("spec", ALL + ["topk0.05+sign", "topk0.01+int2s"])
def test_non_finite_values_stay_non_finite(spec):
    x = torch.randn(64, 64, generator=_gen())
    x[3, 5], x[60, 1] = float("nan"), float("inf")
    codec = make_codec(spec)
    got = Channel(up=codec).send(Message(tensors={"w": x}), round_idx=0, client_id=0, direction="up").tensors["w"]
    assert not torch.isfinite(got[3, 5]) and not torch.isfinite(got[60, 1])
    if "topk" not in spec:  # the whole block is NaN, the others are finite
        block = codec.block_size
        bad = {(3 * 64 + 5) // block, (60 * 64 + 1) // block}
        finite = torch.isfinite(got.reshape(-1, block)).all(dim=1)
        assert {i for i in range(finite.numel()) if not finite[i]} == bad


# ---- stochastic rounding: deterministic draws, unbiased ------------------------------------------

@pytest.mark.parametrize("spec", [k + "s" for k in KINDS])
def test_stochastic_rounding_is_reproducible_and_fresh(spec):
    x = torch.randn(8, 64, generator=_gen())
    codec = make_codec(spec, seed=5)
    (e1, m1), (e2, m2) = codec.encode({"w": x}), codec.encode({"w": x.clone()})
    assert m1 == m2 and e1.keys() == e2.keys() and all(torch.equal(e1[k], e2[k]) for k in e1)

    def codes(enc):
        return enc["w" if "w" in enc else "v"]

    assert not torch.equal(codes(codec.encode({"v": x})[0]), codes(e1))  # another tensor name
    assert not torch.equal(codes(make_codec(spec, seed=6).encode({"w": x})[0]), codes(e1))  # another seed
    # 2x has the same x / absmax: only the content in the seed makes the draws differ
    assert not torch.equal(codes(codec.encode({"w": 2 * x})[0]), codes(e1))
    assert not torch.equal(codes(make_codec(spec[:-1]).encode({"w": x})[0]), codes(e1))  # not nearest rounding


@pytest.mark.parametrize("spec", [k + "s" for k in KINDS])
def test_stochastic_rounding_is_unbiased(spec):
    """Mean of 200 draws (200 codec seeds) within 5 standard errors of x for each value; the variance per
    value is s^2 (v - a)(b - v) for v = x/s between the levels a <= v <= b."""
    x = torch.randn(256, generator=_gen()) * torch.linspace(0.1, 2, 256)
    x[:128] = x[:128].clamp(-1, 1)
    x[7] = 1 + 2**-9  # the block's absmax, not a bf16 value: the scale must round up to cover it
    draws = torch.stack([_roundtrip(make_codec(spec, seed=seed), x) for seed in range(200)])
    scale = make_codec(spec).encode({"w": x})[0]["w::scale"].float().repeat_interleave(128)
    levels = torch.tensor(REF_LEVELS[spec[:-1]])
    v = x / scale
    low = levels[(torch.bucketize(v, levels, right=True) - 1).clamp(0, len(levels) - 2)]
    high = levels[(torch.bucketize(v, levels, right=True)).clamp(1, len(levels) - 1)]
    var = scale**2 * (v - low) * (high - v)
    assert ((draws.mean(0) - x).abs() <= 5 * (var / 200).sqrt() + 1e-6).all()
    torch.testing.assert_close(draws.var(0).mean(), var.mean(), rtol=0.1, atol=0)  # really random


# ---- error bounds --------------------------------------------------------------------------------

def _per_value(scale, n):
    return scale.float().repeat_interleave(n // scale.numel())


@pytest.mark.parametrize(("spec", "rel_l2"), [("sign", 0.61), ("tern", 0.44), ("int2", 0.35), ("int3", 0.20),
                                              ("signs", 2.8), ("terns", 1.2), ("int2s", 0.8), ("int3s", 0.34)])
def test_error_bounds(spec, rel_l2):
    x = torch.randn(8, 4096, generator=_gen())
    codec = make_codec(spec)
    encoded, meta = codec.encode({"w": x})
    got, flat = codec.decode(encoded, meta)["w"].reshape(-1), x.reshape(-1)
    s = _per_value(encoded["w::scale"], flat.numel())
    err = (got - flat).abs()
    step = {"sign": 2, "tern": 1, "int2": 2 / 3, "int3": 2 / 7}[spec.rstrip("s")]  # between levels, x scale
    if spec.endswith("s"):  # one of the two neighbouring levels of x/s; s covers the block's absmax
        absmax = x.reshape(-1, codec.block_size).abs().amax(1)
        assert (encoded["w::scale"].float() >= absmax).all() and (encoded["w::scale"].float() <= absmax * 1.008).all()
        assert (err <= step * s * (1 + 1e-6)).all()
    elif spec == "sign":  # the mean |x| of each block: the L2-optimal scale for the signs
        blocks = x.reshape(-1, codec.block_size)
        torch.testing.assert_close(encoded["w::scale"].float(), blocks.abs().mean(1), rtol=2**-8, atol=0)
    else:  # nearest level: half a step inside [-s, s], |x| - s beyond (clipped)
        bound = torch.where(flat.abs() <= s, step / 2 * s, flat.abs() - s)
        assert (err <= bound * (1 + 1e-6) + 1e-7).all()
    assert (got - flat).norm() / flat.norm() < rel_l2  # measured: docs/compression.md


# ---- through the channel, composed, with error feedback ------------------------------------------

def _payload(codec, tensors):
    """(channel's count, encoded, codec meta, header length read from the independent payload's first 8 bytes)."""
    ch = Channel(up=codec)
    ch.send(Message(tensors=tensors), round_idx=0, client_id=0, direction="up")
    encoded, meta = codec.encode(tensors)
    payload = save({k: t.contiguous() for k, t in encoded.items()},
                   metadata={"meta": json.dumps({}), "codec": json.dumps(meta, sort_keys=True)})
    return ch.transfers[0].num_bytes, encoded, meta, int.from_bytes(payload[:8], "little")


@pytest.mark.parametrize(("spec", "n", "data_bytes"), [
    ("int2@64", 8 * 4096, 8 * 4096 * 2 // 8 + 2 * 512),         # 2 bits a value + a bf16 scale a block
    ("sign", 8 * 4096, 8 * 4096 // 8 + 2 * 128),                 # default block 256
    ("tern@100", 1003, math.ceil(1003 / 5) + 2 * 11),           # five values a byte
    ("int3s", 1001, math.ceil(1001 * 3 / 8) + 2 * 8),           # stochastic default block 128
])
def test_bytes_through_the_channel(spec, n, data_bytes):
    x = torch.randn(n, generator=_gen())
    counted, encoded, meta, header_len = _payload(make_codec(spec), {"w": x})
    assert sum(t.numel() * t.element_size() for t in encoded.values()) == data_bytes
    assert counted == 8 + header_len + data_bytes
    assert header_len < 256  # two entries and the meta


def test_composition_after_topk_bytes_and_support():
    x = torch.zeros(8, 4096)
    x.view(-1)[::20] = torch.randn(1639, generator=_gen())  # the 1639 = ceil(0.05 * 32768) kept, 20 apart
    for spec, bits in [("topk0.05+sign", 1), ("topk0.05+int2", 2), ("topk0.05+tern", None)]:
        codec = make_codec(spec)
        assert isinstance(codec, Compose)
        counted, encoded, meta, header_len = _payload(codec, {"w": x})
        packed = math.ceil(1639 / 5) if bits is None else math.ceil(1639 * bits / 8)
        assert encoded["w::values"].numel() == packed and encoded["w::values::scale"].numel() == 7
        assert encoded["w::idx"].numel() == 1639  # a gap of 20 is two 4-bit symbols: one byte an index
        assert counted == 8 + header_len + packed + 2 * 7 + 1639
    for spec in ("topk0.05+sign", "topk0.01+int2", "topk0.01+int3s"):  # no zero level: the support is top-k's
        codec = make_codec(spec)
        k = math.ceil(float(spec[4:8]) * x.numel())
        got = codec.decode(*codec.encode({"w": x}))["w"]
        assert torch.equal(torch.nonzero(got.reshape(-1)).flatten(), topk_indices(x, k))


@pytest.mark.parametrize("spec", ALL + ["topk0.05+sign", "topk0.1+int2s", "randk0.2+tern"])
def test_error_feedback_residual_plus_decoded_is_the_input(spec):
    codec, g = make_codec(spec), _gen()
    residual, sent_sum, true_sum = None, torch.zeros(32, 64), torch.zeros(32, 64)
    for _ in range(5):
        update = {"w": 0.01 * torch.randn(32, 64, generator=g)}
        target = update["w"] + (residual["w"] if residual else 0)
        encoded, meta, residual = compress_with_feedback(codec, update, residual)
        received = codec.decode(encoded, meta)["w"]
        torch.testing.assert_close(received + residual["w"], target, rtol=0, atol=1e-7)
        sent_sum += received
        true_sum += update["w"]
    torch.testing.assert_close(sent_sum + residual["w"], true_sum, rtol=0, atol=1e-6)
    assert residual["w"].abs().max() > 0


# ---- the grammar ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "kind", "stochastic", "block_size"), [
    ("sign", "sign", False, 256), ("signs", "sign", True, 128), ("tern@32", "tern", False, 32),
    ("terns@7", "tern", True, 7), ("int2@64", "int2", False, 64), ("INT2S@64", "int2", True, 64),
    ("int3", "int3", False, 256), ("int3s", "int3", True, 128),
])
def test_grammar(spec, kind, stochastic, block_size):
    codec = make_codec(spec, seed=9)
    assert isinstance(codec, LowBit)
    assert (codec.kind, codec.stochastic, codec.block_size, codec.seed) == (kind, stochastic, block_size, 9)
    composed = make_codec(f"topk0.01+{spec}")
    assert isinstance(composed, Compose) and isinstance(composed.second, LowBit)
    assert composed.second.stochastic == stochastic


@pytest.mark.parametrize("spec", ["int2@0", "sign@x", "tern+int8", "int8s", "nf4s@64", "signs@", "int4", "sign+topk0.1",
                                  "topk0.1+sign+int2", "terns@-1", "ints2"])
def test_malformed_specs_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError) as exc:
        make_codec(spec, key="comm.up")
    msg = str(exc.value)
    assert msg.startswith(f"comm.up={spec}: ") and "\n" not in msg
    assert "sign[s][@B]" in msg and "int3[s][@B]" in msg
