"""The measurement scripts' own arithmetic, on inputs whose answers are known by hand."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import diagnose_codec  # noqa: E402


def _client(computed, decoded, residual):
    return {"computed": {"w": torch.tensor(computed)}, "decoded": {"w": torch.tensor(decoded)},
            "residual": {"w": torch.tensor(residual)}}


def test_fidelity_of_orthogonal_clients_and_a_halved_aggregate():
    # two clients with orthogonal unit updates; the server decodes half of each, the rest is residual
    clients = [_client([1.0, 0.0], [0.5, 0.0], [0.5, 0.0]), _client([0.0, 1.0], [0.0, 0.5], [0.0, 0.5])]
    got = diagnose_codec.fidelity(clients, ["w"])
    assert got["values"] == 2 and got["clients"] == 2
    assert got["agree"] == pytest.approx(math.sqrt(0.5))  # |(1, 1) / 2| over a client's norm 1
    assert got["pair_cos"] == pytest.approx(0.0)
    assert got["cos"] == pytest.approx(1.0) and got["norm"] == pytest.approx(0.5)
    assert got["rel_err"] == pytest.approx(0.5) and got["backlog"] == pytest.approx(0.5)


def test_fidelity_of_agreeing_clients_with_a_rotated_aggregate():
    clients = [_client([1.0, 0.0], [0.0, 1.0], [1.0, -1.0]), _client([1.0, 0.0], [0.0, 1.0], [1.0, -1.0])]
    got = diagnose_codec.fidelity(clients, ["w"])
    assert got["agree"] == pytest.approx(1.0) and got["pair_cos"] == pytest.approx(1.0)
    assert got["cos"] == pytest.approx(0.0) and got["rel_err"] == pytest.approx(math.sqrt(2))
    assert got["backlog"] == pytest.approx(math.sqrt(2))


def test_codec_table_counts_bits_after_the_name_table_and_errors_by_hand():
    g = torch.Generator().manual_seed(0)
    rounds = [[{"w": torch.randn(4096, generator=g)} for _ in range(2)]]
    fp32 = diagnose_codec.codec_table("none", rounds)
    assert fp32["client_err"] == 0 and fp32["mean_err"] == 0
    assert 0.9 * 32 < fp32["bits_per_value"] < 32  # zstd takes ~7% off gaussian fp32 (docs/compression.md)
    sign = diagnose_codec.codec_table("sign", rounds)
    # 1 bit a value + a bf16 scale per 256 values (544 bytes), plus under 64 bytes of header and zstd frame
    assert 544 * 8 / 4096 < sign["bits_per_value"] < (544 + 64) * 8 / 4096
    assert sign["ratio"] == pytest.approx(32 / sign["bits_per_value"])
    # sign with the L2-optimal scale on a gaussian: relative error sqrt(1 - 2/pi) = 0.603
    assert sign["client_err"] == pytest.approx(math.sqrt(1 - 2 / math.pi), abs=0.02)
