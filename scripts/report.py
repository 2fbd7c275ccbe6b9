"""Paper-replication report: tables, claim checks and figures from fedtune multirun folders.

    .venv/bin/python scripts/report.py outputs/replication/comparison-smoke/<stamp> [more dirs] [--out DIR]

Every folder below the given ones that holds a ``metrics.jsonl`` is a run. ``metrics.jsonl`` is the
source of truth for every number; ``summary.json`` gives the config choices (strategy, experiment),
``config.yaml`` the seed and knobs, ``.hydra/overrides.yaml`` what a sweep set (a run that overrides
``lora.r`` or ``strategy.split_layer`` belongs to that sweep, not to the main comparison). Runs are
grouped per paper by their experiment overlay's name (``gradualdiff_*``, ``comparison_*``,
``fedcybgd_*``), then per arm (strategy; ``-full`` for full-parameter FedAvg/GradualDiff), and
averaged over seeds (mean ± sample std). The papers' numbers are constants below, each citing the
part of its summary in ``../shared/papers`` it comes from; each qualitative claim is checked as an
ordering of our means: agrees / disagrees / not measured.

Writes ``report.md`` and PNGs into ``--out`` (default: ``<first dir>/report``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = {"lora.r": "r", "strategy.split_layer": "k"}
COMPETITIVE_ACCURACY = 0.05  # "competitive accuracy": within 5 accuracy points of full-parameter FedAvg
CLOSE_REL = 0.10  # "about the same" (perplexity, BLEU): within 10% relative ...
CLOSE_ABS = {"eval_bleu": 1.0}  # ... or this absolute difference (BLEU points)


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    choices: dict[str, str]
    config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @property
    def strategy(self) -> str:
        return self.choices.get("strategy") or self.config["strategy"]["_target_"].rsplit(".", 1)[-1].lower()

    @property
    def paper(self) -> str:
        return str(self.choices.get("experiment", "")).split("_")[0]

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def swept(self) -> dict[str, Any]:
        """The sweep knobs this run's command line set: {short name: value}."""
        out = {}
        for o in self.overrides:
            key, _, value = o.partition("=")
            if key.lstrip("+") in SWEEP_KEYS:
                out[SWEEP_KEYS[key.lstrip("+")]] = yaml.safe_load(value)
        return out

    @property
    def arm(self) -> str:
        """strategy, -full when it trained every parameter with a LoRA-capable strategy."""
        full = not self.config.get("lora", {}).get("enabled", True)
        return f"{self.strategy}-full" if full and self.strategy in ("fedavg", "gradualdiff") else self.strategy

    @property
    def variant(self) -> str:
        return " ".join([self.arm, *(f"{k}={v}" for k, v in sorted(self.swept().items()))])


def load_runs(dirs: list[Path]) -> list[Run]:
    runs = []
    for d in dirs:
        for metrics in sorted(d.rglob("metrics.jsonl")):
            folder = metrics.parent
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
            config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
            ov = folder / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(ov.read_text()) or [] if ov.exists() else []
            if rows:
                runs.append(Run(folder, rows, summary.get("choices", {}), config or {}, overrides))
    return runs


def _last(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(values[-1]) if values else math.nan


def _mean_of(rows: list[dict], fn: Callable[[dict], float]) -> float:
    values = [fn(r) for r in rows]
    return sum(values) / len(values) if values else math.nan


def run_stats(run: Run) -> dict[str, float]:
    """One run's numbers, all read from its metrics.jsonl."""
    rows = run.rows
    client_rounds = sum(r.get("clients/participants", 1) for r in rows) or 1
    out = {k.replace("/", "_"): _last(rows, k) for k in
           ("train/loss", "eval/loss", "eval/ppl", "eval/bleu", "eval/accuracy", "eval/macro_f1")}
    total = _last(rows, "comm/total_bytes")
    out.update({
        "total_mb": total / 1e6,
        "mb_per_client_round": total / client_rounds / 1e6,
        "client_gflops_per_client_round": sum(r.get("train/client_flops", 0.0) for r in rows) / client_rounds / 1e9,
        "mem_mb": max((r.get("mem/client_peak_bytes", 0) for r in rows), default=0) / 1e6,
        "round_s": _mean_of(rows, lambda r: r["time/round_s"]),
        "round_s_no_eval": _mean_of(rows, lambda r: r["time/round_s"] - r.get("time/eval_s", 0.0)),
        # time/client_compute_s is the wall time of local updates, server halves (split) included
        "client_s": _mean_of(rows, lambda r: r.get("time/client_compute_s", 0.0) - r.get("time/server_compute_s", 0.0)),
        "server_s": _mean_of(rows, lambda r: r.get("time/server_compute_s", 0.0)),
        "comm_s": _mean_of(rows, lambda r: r.get("time/comm_s", 0.0)),
        "aggregate_s": _mean_of(rows, lambda r: r.get("time/aggregate_s", 0.0)),
        "eval_s": _mean_of(rows, lambda r: r.get("time/eval_s", 0.0)),
    })
    out["client_s_per_client_round"] = out["client_s"] * len(rows) / client_rounds
    return out


@dataclass
class Agg:
    mean: float
    std: float | None
    n: int

    def fmt(self, spec: str) -> str:
        if math.isnan(self.mean):
            return "–"
        return spec.format(self.mean) + (f" ± {spec.format(self.std)}" if self.std is not None else "")


def aggregate(runs: list[Run]) -> dict[str, Agg]:
    stats = [run_stats(r) for r in runs]
    out = {}
    for key in stats[0]:
        values = [s[key] for s in stats if not math.isnan(s[key])]
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else None
        out[key] = Agg(mean, std, len(runs))
    return out


# ---- the papers: arms, columns (key, header, format), paper numbers, claims --------------------------------------

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
        holds, ours = judge(values)
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


# ---- markdown -----------------------------------------------------------------------------------------------------

def _setup_line(runs: list[Run]) -> str:
    cfg = runs[0].config
    seeds = sorted({r.seed for r in runs})
    per_arm = {}  # FedCyBGD runs num_clients x the rounds of the FedAvg arms: say so
    for r in runs:
        per_arm.setdefault(int(r.config.get("num_rounds", 0)), set()).add(r.arm)
    rounds = (" / ".join(f"{n} ({', '.join(sorted(arms))})" for n, arms in sorted(per_arm.items()))
              if len(per_arm) > 1 else str(next(iter(per_arm), "?")))
    parts = [f"model `{cfg.get('model', {}).get('name', '?')}`", f"data `{cfg.get('data', {}).get('name', '?')}`",
             f"{cfg.get('num_clients', '?')} clients", f"{rounds} rounds",
             f"seeds {', '.join(map(str, seeds))}", f"{len(runs)} runs",
             f"experiment `{runs[0].choices.get('experiment', '?')}`"]
    return "Setup: " + ", ".join(parts) + "."


def table(arms: dict[str, dict[str, Agg]], names: list[str], columns: list[tuple[str, str, str]],
          paper: dict[tuple[str, str], str], *, first: str = "arm") -> list[str]:
    """Markdown table: one row per arm, our mean ± std per column, a 'paper' column after those that have one."""
    with_paper = {key for (_, key) in paper}
    head, rule = [first, "seeds"], ["---", "---:"]
    for key, title, _ in columns:
        head.append(title)
        rule.append("---:")
        if key in with_paper:
            head.append("paper")
            rule.append("---:")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for name in names:
        if name not in arms:
            continue
        agg = arms[name]
        cells = [f"`{name}`", str(next(iter(agg.values())).n)]
        for key, _, spec in columns:
            cells.append(agg[key].fmt(spec))
            if key in with_paper:
                cells.append(paper.get((name, key), ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paper_section(name: str, runs: list[Run], out: Path, *, figures: bool) -> list[str]:
    spec = PAPERS[name]
    main = [r for r in runs if not r.swept()]
    by_arm = {a: [r for r in main if r.arm == a] for a in {r.arm for r in main}}
    arms = {a: aggregate(rs) for a, rs in by_arm.items()}
    order = [a for a in spec["arms"] if a in arms] + sorted(a for a in arms if a not in spec["arms"])
    lines = [f"## {spec['title']}", "", _setup_line(main or runs), "",
             *table(arms, order, spec["columns"], spec["paper"]), "",
             f"Paper numbers: {spec['source']}. Ours: mean ± std over seeds (no ± with one seed), read from each run's "
             "`metrics.jsonl` (final round for losses and quality; means per round for times; maxima for memory).", "",
             "Claims (our means, as orderings):", ""]
    for text, paper_value, check in spec["claims"]:
        verdict, ours = check(arms)
        lines.append(f"- {text} — paper: {paper_value}; ours: {ours} → **{verdict}**")
    for arm, short, title in spec.get("sweeps", []):
        groups: dict[str, list[Run]] = {}  # a sweep's runs are those whose command line set the knob
        for r in runs:
            if r.arm == arm and short in r.swept():
                groups.setdefault(f"{short}={r.swept()[short]}", []).append(r)
        if groups:
            keys = sorted(groups, key=lambda k: float(k.split("=")[1]))
            rounds = sorted({int(r.config.get("num_rounds", 0)) for g in groups.values() for r in g})
            lines += ["", f"{title} (`{arm}`, {'/'.join(map(str, rounds))} rounds):", "",
                      *table({k: aggregate(v) for k, v in groups.items()}, keys, spec["sweep_columns"], {}, first=short)]
    if any(str(r.choices.get("experiment", "")).endswith("_smoke") for r in runs):
        lines += ["", "*Smoke run*: a 135M model, a few rounds and a few dozen examples per client on 2 CPU cores. "
                  "Absolute numbers are not comparable with the paper's; only the orderings are checked, and with so "
                  "little training they can flip with the seed."]
    if figures:
        lines += ["", *_figures(name, spec, runs, order, out)]
    return lines


# ---- figures ------------------------------------------------------------------------------------------------------

def _figures(name: str, spec: dict[str, Any], runs: list[Run], order: list[str], out: Path) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    qkey, qmetric, qtitle, higher_better = spec["quality"]
    main = {a: [r for r in runs if r.arm == a and not r.swept()] for a in order}
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    per_update = spec.get("per_client_update", False)
    for arm, rs in main.items():
        for ax, metric in zip(axes, ("train/loss", qmetric)):
            xs, ys = _curve(rs, metric, per_client_update=per_update)
            if xs:
                ax.plot(xs, ys, "o-", ms=3, label=arm)
    for ax, title in zip(axes, ("train loss (mean over seeds)", qtitle)):
        ax.set_xlabel("client updates (local trainings so far)" if per_update else "round", fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    files.append(_save(fig, out / f"{name}_curves.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    points = []  # main arms, and sweep points trained as long as they were (a 1-round sweep is no quality point)
    main_rounds = {r.config.get("num_rounds") for rs in main.values() for r in rs}
    for variant in sorted({r.variant for r in runs if r.config.get("num_rounds") in main_rounds}):
        agg = aggregate([r for r in runs if r.variant == variant])
        points.append((variant, agg["total_mb"].mean, agg[qkey].mean))
    floor = min((x for _, x, _ in points if x > 0), default=1.0) / 10  # 0-byte baselines sit at the left edge
    points = [(label, max(x, floor), y, x == 0) for label, x, y in points if not math.isnan(y)]
    for label, x, y, zero in points:
        ax.scatter(x, y, s=18)
        ax.annotate(label + (" (0 B)" if zero else ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier, best = [], -math.inf  # non-dominated: no other point has fewer bytes and better quality
    for _, x, y, _ in sorted(points, key=lambda p: (p[1], -p[2] if higher_better else p[2])):
        score = y if higher_better else -y
        if score > best:
            frontier.append((x, y))
            best = score
    if len(frontier) > 1:
        ax.plot(*zip(*frontier), "--", color="grey", lw=0.8, label="Pareto frontier")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes over the run, both directions (MB, log)")
    ax.set_ylabel(qtitle, fontsize=8)
    ax.set_title("bytes vs quality", fontsize=9)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / f"{name}_pareto.png"))

    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.4 * len(main)), dpi=90)
    parts = [("client_s", "client compute"), ("server_s", "server compute"), ("comm_s", "channel"),
             ("aggregate_s", "aggregate"), ("eval_s", "eval")]
    aggs = {a: aggregate(rs) for a, rs in main.items() if rs}
    left = [0.0] * len(aggs)
    # seconds per round, or per client update (a round's time over its participants)
    scale = {a: (len(rs[0].rows) / max(1, sum(r.get("clients/participants", 1) for r in rs[0].rows))
                 if per_update else 1.0) for a, rs in main.items() if rs}
    for key, label in parts:
        widths = [aggs[a][key].mean * scale[a] for a in aggs]
        ax.barh(list(aggs), widths, left=left, label=label)
        left = [lft + w for lft, w in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per client update (mean)" if per_update else "seconds per round (mean)")
    ax.set_title("time breakdown, wall clock", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    files.append(_save(fig, out / f"{name}_time.png"))
    return [f"![{f.stem}]({f.name})" for f in files]


def _curve(runs: list[Run], metric: str, *, per_client_update: bool = False) -> tuple[list[int], list[float]]:
    """Per round (1-based), or per cumulative client updates, the mean of ``metric`` over the runs that logged it."""
    by_x: dict[int, list[float]] = {}
    for r in runs:
        done = 0
        for row in r.rows:
            done += int(row.get("clients/participants", 1))
            x = done if per_client_update else int(row["round_idx"]) + 1
            if row.get(metric) is not None:
                by_x.setdefault(x, []).append(float(row[metric]))
    xs = sorted(by_x)
    return xs, [statistics.fmean(by_x[x]) for x in xs]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- entry point --------------------------------------------------------------------------------------------------

def report(dirs: list[Path], out: Path, *, paper: str | None = None, figures: bool = True) -> str:
    """The markdown report of the runs under ``dirs``; written to ``out/report.md`` with its PNGs."""
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit(f"report.py: no metrics.jsonl under {', '.join(map(str, dirs))}")
    names = [paper] if paper else sorted({r.paper for r in runs if r.paper in PAPERS})
    if not names:
        raise SystemExit("report.py: the runs name no known experiment (gradualdiff_*, comparison_*, fedcybgd_*); "
                         "pass --paper")
    lines = ["# Replication report", "", f"{len(runs)} runs from " + ", ".join(f"`{d}`" for d in dirs) + "."]
    for name in names:
        chosen = [r for r in runs if paper or r.paper == name]
        lines += ["", *paper_section(name, chosen, out, figures=figures)]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun folders (searched recursively for runs)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and the PNGs go (default <dir>/report)")
    parser.add_argument("--paper", choices=sorted(PAPERS), default=None, help="report every run as this paper")
    parser.add_argument("--no-figures", action="store_true", help="tables and claims only")
    args = parser.parse_args()
    text = report(args.dirs, args.out or args.dirs[0] / "report", paper=args.paper, figures=not args.no_figures)
    print(text, end="")  # noqa: T201 - the report is this script's output


if __name__ == "__main__":
    main()
