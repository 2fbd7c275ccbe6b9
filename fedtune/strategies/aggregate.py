"""The maths of aggregation, as pure functions over ``{name: tensor}`` states.

Accumulation is in float64 and the result is cast back to each tensor's dtype, so the order of
clients changes results only below fp32 precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i w_i * state_i / sum_i w_i, key by key (all states must share keys and shapes)."""
    total = float(sum(weights))
    assert total > 0, weights
    return weighted_sum(states, [w / total for w in weights])


def weighted_sum(states: Sequence[State], coeffs: Sequence[float]) -> State:
    """sum_i c_i * state_i, key by key (no normalisation; accumulated in float64)."""
    assert states and len(states) == len(coeffs), (len(states), len(coeffs))
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, c in zip(states, coeffs):
            acc += state[key].to(torch.float64) * c
        out[key] = acc.to(states[0][key].dtype)
    return out


def subtract(a: State, b: State) -> State:
    """a - b, key by key."""
    assert a.keys() == b.keys()
    return {k: a[k] - b[k] for k in a}


def add_scaled(base: State, delta: State, scale: float) -> State:
    """base + scale * delta, key by key (a new state; ``base`` is not modified)."""
    assert base.keys() == delta.keys()
    return {k: (base[k].to(torch.float64) + scale * delta[k].to(torch.float64)).to(base[k].dtype) for k in base}


def client_weights(num_examples: Sequence[int], *, weighting: str) -> list[float]:
    """``examples``: proportional to shard size; ``uniform``: 1/K each."""
    if weighting == "examples":
        return [float(n) for n in num_examples]
    assert weighting == "uniform", weighting
    return [1.0] * len(num_examples)


def all_finite(state: State) -> bool:
    """False if any tensor holds NaN or inf (such an update is rejected before aggregation)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
