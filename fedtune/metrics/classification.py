"""Classification metrics as pure functions."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(preds: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of exact matches (an unparseable prediction is -1 and counts as wrong)."""
    assert len(preds) == len(golds)
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: Sequence[int], golds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over every class seen in golds or (valid) predictions."""
    classes = sorted(set(golds) | {p for p in preds if p >= 0})
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)
