"""The papers: arms, table columns (key, header, format), the papers' numbers and their claims.

The papers' numbers are constants, each citing the part of its summary in ``../shared/papers`` it
comes from; each qualitative claim is checked as an ordering of our means over seeds: agrees /
disagrees / not measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

from fedtune.report.runs import Agg

COMPETITIVE_ACCURACY = 0.05  # "competitive accuracy": within 5 accuracy points of full-parameter FedAvg
CLOSE_REL = 0.10  # "about the same" (perplexity, BLEU): within 10% relative ...
CLOSE_ABS = {"eval_bleu": 1.0}  # ... or this absolute difference (BLEU points)

STARS = {1: "★", 2: "★★", 3: "★★★", 4: "★★★★", 5: "★★★★★"}
Claim = Callable[[dict[str, dict[str, Agg]]], tuple[str, str]]  # arms -> (verdict, our numbers)


def _m(arms: dict[str, dict[str, Agg]], arm: str, key: str) -> float | None:
    a = arms.get(arm, {}).get(key)
    return None if a is None or math.isnan(a.mean) else a.mean


def _claim(key: str, names: list[str], judge: Callable[[list[float]], tuple[bool, str]]) -> Claim:
    """A claim over the arms' means of ``key``: not measured when one is missing, else ``judge(means)``
    -> (holds, our numbers as text)."""
    def check(arms):
        values = [_m(arms, a, key) for a in names]
        missing = [a for a, v in zip(names, values) if v is None]
        if missing:
            return "not measured", "missing: " + ", ".join(missing)
        holds, ours = judge(cast("list[float]", values))  # none missing: every mean is a float
        return ("agrees" if holds else "disagrees"), ours
    return check


def ordered(key: str, arms_order: list[str], *, descending: bool = False, spec: str = "{:.3g}") -> Claim:
    """means strictly increase (or decrease) along arms_order, as the claim is written."""
    return _claim(key, arms_order, lambda v: (
        all((x > y) if descending else (x < y) for x, y in zip(v, v[1:])),
        ", ".join(f"{a} {spec.format(x)}" for a, x in zip(arms_order, v))))


def extreme(key: str, arm: str, others: list[str], *, lowest: bool, spec: str = "{:.3g}") -> Claim:
    """arm's mean is the lowest (or highest) of arm + others."""
    names = [arm, *others]
    return _claim(key, names, lambda v: (
        all((v[0] < x) if lowest else (v[0] > x) for x in v[1:]),
        ", ".join(f"{a} {spec.format(x)}" for a, x in zip(names, v))))


def reduction(key: str, arm: str, base: str, *, spec: str = "{:.3g}") -> Claim:
    """arm's mean below base's; reports the relative reduction."""
    def judge(v):
        a, b = v
        change = f"{(a - b) / b:+.1%}" if b else "n/a"
        return a < b, f"{arm} {spec.format(a)} vs {base} {spec.format(b)} ({change})"
    return _claim(key, [arm, base], judge)


def close(key: str, arm: str, base: str, *, spec: str = "{:.3g}") -> Claim:
    """arm's mean within CLOSE_REL (or CLOSE_ABS[key]) of base's."""
    def judge(v):
        a, b = v
        diff = f"{a - b:+.2f}" if key in CLOSE_ABS else f"{(a - b) / b:+.1%}" if b else "n/a"
        return abs(a - b) <= max(CLOSE_REL * abs(b), CLOSE_ABS.get(key, 0.0)), \
            f"{arm} {spec.format(a)} vs {base} {spec.format(b)} ({diff})"
    return _claim(key, [arm, base], judge)


def within(key: str, arm: str, base: str, points: float) -> Claim:
    """arm's mean at least base's minus ``points``."""
    return _claim(key, [arm, base], lambda v: (v[0] >= v[1] - points, f"{arm} {v[0]:.3f} vs {base} {v[1]:.3f} "
                                                                    f"({v[0] - v[1]:+.3f})"))


def at_least(key: str, arm: str, base: str) -> Claim:
    return _claim(key, [arm, base], lambda v: (v[0] >= v[1], f"{arm} {v[0]:.3f} vs {base} {v[1]:.3f}"))


PAPERS: dict[str, dict[str, Any]] = {
    "gradualdiff": {
        "title": "GradualDiff-Fed (arXiv 2506.19164)",
        "source": "../shared/papers/gradualdiff-fed_2506.19164.md, Quick Facts and Key Results",
        "arms": ["gradualdiff", "fedavg-full", "centralized", "local"],
        "columns": [("train_loss", "final train loss", "{:.3f}"), ("eval_ppl", "eval perplexity", "{:.2f}"),
                    ("eval_bleu", "BLEU", "{:.2f}"), ("round_s_no_eval", "round time excl. eval (s)", "{:.1f}"),
                    ("total_mb", "bytes, total (MB)", "{:.1f}")],
        "paper": {("gradualdiff", "train_loss"): "0.22", ("local", "train_loss"): "0.31",
                  ("centralized", "train_loss"): "0.15", ("centralized", "eval_ppl"): "16.78",
                  ("gradualdiff", "eval_ppl"): "≈ 16.78", ("gradualdiff", "eval_bleu"): "≈ centralized",
                  ("gradualdiff", "round_s_no_eval"): "4.3", ("fedavg-full", "round_s_no_eval"): "6.7"},
        "claims": [
            ("final training loss: centralized < gradualdiff < local", "0.15 < 0.22 < 0.31",
             ordered("train_loss", ["centralized", "gradualdiff", "local"], spec="{:.3f}")),
            ("per-round time: gradualdiff below full model updates (fedavg-full)", "4.3 s vs 6.7 s (−36%)",
             reduction("round_s_no_eval", "gradualdiff", "fedavg-full", spec="{:.1f} s")),
            ("perplexity: gradualdiff about the same as centralized (within 10%)", "≈ 16.78",
             close("eval_ppl", "gradualdiff", "centralized", spec="{:.2f}")),
            ("BLEU: gradualdiff comparable to centralized (within 10% or 1 point)", "comparable",
             close("eval_bleu", "gradualdiff", "centralized", spec="{:.2f}")),
        ],
        "quality": ("eval_ppl", "eval/ppl", "eval perplexity (lower is better)", False),
    },
    "comparison": {
        "title": "Federated fine-tuning framework comparison (arXiv 2501.04436)",
        "source": "../shared/papers/framework-comparison_2501.04436.md, Key Results and Design tradeoffs "
                  "(the paper's own 1-5 star ratings: more stars = more of the quantity)",
        "arms": ["fedavg", "split", "kd"],
        "columns": [("eval_accuracy", "accuracy", "{:.3f}"), ("eval_macro_f1", "macro-F1", "{:.3f}"),
                    ("mb_per_client_round", "MB per client-round", "{:.2f}"),
                    ("client_gflops_per_client_round", "client GFLOPs per client-round", "{:.0f}"),
                    ("client_s_per_client_round", "client compute s per client-round", "{:.1f}")],
        "paper": {("fedavg", "eval_accuracy"): STARS[5], ("split", "eval_accuracy"): STARS[4],
                  ("kd", "eval_accuracy"): STARS[3], ("fedavg", "mb_per_client_round"): STARS[3],
                  ("split", "mb_per_client_round"): STARS[5], ("kd", "mb_per_client_round"): STARS[2],
                  ("fedavg", "client_gflops_per_client_round"): STARS[4],
                  ("split", "client_gflops_per_client_round"): STARS[3],
                  ("kd", "client_gflops_per_client_round"): STARS[5]},
        "claims": [
            ("accuracy: FedLLM (fedavg) > Split > KD", "★5 > ★4 > ★3",
             ordered("eval_accuracy", ["fedavg", "split", "kd"], descending=True)),
            ("communication: KD lowest (classification)", "★2 vs ★3, ★5",
             extreme("mb_per_client_round", "kd", ["fedavg", "split"], lowest=True, spec="{:.3g} MB")),
            ("communication: Split highest", "★5 vs ★3, ★2",
             extreme("mb_per_client_round", "split", ["fedavg", "kd"], lowest=False, spec="{:.3g} MB")),
            ("client computation: Split lowest", "★3 vs ★4, ★5",
             extreme("client_gflops_per_client_round", "split", ["fedavg", "kd"], lowest=True, spec="{:.0f} GFLOPs")),
            ("client computation: KD highest", "★5 vs ★4, ★3",
             extreme("client_gflops_per_client_round", "kd", ["fedavg", "split"], lowest=False, spec="{:.0f} GFLOPs")),
        ],
        "sweeps": [("fedavg", "r", "LoRA rank sweep (FedLLM)"), ("split", "k", "split-point sweep (Split-FedLLM)")],
        "sweep_columns": [("eval_accuracy", "accuracy", "{:.3f}"), ("mb_per_client_round", "MB per client-round", "{:.2f}"),
                          ("client_gflops_per_client_round", "client GFLOPs per client-round", "{:.0f}")],
        "quality": ("eval_accuracy", "eval/accuracy", "eval accuracy", True),
    },
    "fedcybgd": {
        "title": "FedCyBGD (arXiv 2406.11187)",
        "source": "../shared/papers/fedcybgd_2406.11187.md, Quick Facts and Key Results",
        "arms": ["fedcybgd", "fedavg-full", "fedavg"],
        "columns": [("eval_accuracy", "accuracy", "{:.3f}"), ("mem_mb", "client peak memory (MB)", "{:.0f}"),
                    ("mb_per_client_round", "MB per client-round", "{:.1f}"), ("total_mb", "bytes, total (MB)", "{:.0f}")],
        "paper": {("fedcybgd", "mem_mb"): "−72.7% vs full", ("fedcybgd", "mb_per_client_round"): "−44.1%",
                  ("fedcybgd", "eval_accuracy"): "competitive"},
        "claims": [
            ("client memory: FedCyBGD below full-parameter FedAvg", "−72.7%",
             reduction("mem_mb", "fedcybgd", "fedavg-full", spec="{:.0f} MB")),
            ("communication per client-round: FedCyBGD below full-parameter FedAvg", "−44.1%",
             reduction("mb_per_client_round", "fedcybgd", "fedavg-full", spec="{:.0f} MB")),
            ("accuracy competitive with full-parameter FedAvg (within 5 points)", "competitive",
             within("eval_accuracy", "fedcybgd", "fedavg-full", COMPETITIVE_ACCURACY)),
            ("accuracy at least LoRA FedAvg's (PEFT baseline)", "up to +58.3%",
             at_least("eval_accuracy", "fedcybgd", "fedavg")),
        ],
        "quality": ("eval_accuracy", "eval/accuracy", "eval accuracy", True),
        # FedCyBGD trains one client a round, FedAvg all three: compare per client update, not per round
        "per_client_update": True,
    },
}

