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


class RunningSum:
    """sum_i w_i * state_i / sum_i w_i, folded in one state at a time (float64 accumulators), so a
    server holds one accumulator instead of every client's update until the round ends."""

    def __init__(self) -> None:
        self.acc: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        if not self.acc:
            self.acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
            self.dtypes = {k: v.dtype for k, v in state.items()}
        assert state.keys() == self.acc.keys(), sorted(set(state) ^ set(self.acc))[:5]
        for key, value in state.items():
            self.acc[key] += value.to(torch.float64) * weight
        self.total += float(weight)
        self.count += 1

    def mean(self) -> State:
        assert self.count and self.total > 0, (self.count, self.total)
        return {k: (a / self.total).to(self.dtypes[k]) for k, a in self.acc.items()}


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
