"""Aggregation maths against hand-computed numbers."""

import pytest
import torch

from fedtune.strategies.aggregate import add_scaled, all_finite, client_weights, subtract, weighted_mean


def test_weighted_mean_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[3.0]])}
    # weights 1:2 -> (1*a + 2*b) / 3
    out = weighted_mean([a, b], [1.0, 2.0])
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(out["b"], torch.tensor([[2.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_mean_keeps_dtype_and_is_order_independent():
    a = {"w": torch.tensor([0.1, 0.2], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([0.3, 0.5], dtype=torch.bfloat16)}
    assert weighted_mean([a, b], [1, 1])["w"].dtype == torch.bfloat16
    x = {"w": torch.randn(50)}
    y = {"w": torch.randn(50)}
    assert torch.equal(weighted_mean([x, y], [3, 7])["w"], weighted_mean([y, x], [7, 3])["w"])


def test_delta_maths_by_hand():
    g = {"w": torch.tensor([1.0, 1.0])}
    c = {"w": torch.tensor([3.0, 0.0])}
    d = subtract(c, g)
    assert torch.equal(d["w"], torch.tensor([2.0, -1.0]))
    assert torch.equal(add_scaled(g, d, 0.5)["w"], torch.tensor([2.0, 0.5]))
    assert torch.equal(g["w"], torch.tensor([1.0, 1.0]))  # inputs untouched


def test_client_weights():
    assert client_weights([10, 30], weighting="examples") == [10.0, 30.0]
    assert client_weights([10, 30], weighting="uniform") == [1.0, 1.0]


def test_all_finite():
    assert all_finite({"a": torch.ones(3)})
    assert not all_finite({"a": torch.tensor([1.0, float("nan")])})
    assert not all_finite({"a": torch.tensor([float("inf")])})


def test_running_sum_folds_to_the_weighted_mean_by_hand():
    from fedtune.strategies.aggregate import RunningSum

    r = RunningSum()
    r.add({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5], dtype=torch.float16)}, 1.0)
    r.add({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.5], dtype=torch.float16)}, 3.0)
    mean = r.mean()
    # (1 * [1, 2] + 3 * [3, 4]) / 4 = [2.5, 3.5]; (0.5 + 4.5) / 4 = 1.25, back in float16
    assert torch.equal(mean["w"], torch.tensor([2.5, 3.5]))
    assert mean["b"].dtype == torch.float16 and mean["b"].item() == 1.25
    assert (r.count, r.total) == (2, 4.0)
    with pytest.raises(AssertionError):
        r.add({"other": torch.zeros(2)}, 1.0)
