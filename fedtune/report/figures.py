"""Figures per paper: curves, bytes-vs-quality Pareto and the time breakdown (matplotlib, imported lazily)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from fedtune.report.runs import Run, aggregate


def paper_figures(name: str, spec: dict[str, Any], runs: list[Run], order: list[str], out: Path) -> list[str]:
    """Writes ``<name>_curves.png``, ``<name>_pareto.png`` and ``<name>_time.png`` into ``out``; returns
    their markdown image links."""
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
    means = []  # main arms, and sweep points trained as long as they were (a 1-round sweep is no quality point)
    main_rounds = {r.config.get("num_rounds") for rs in main.values() for r in rs}
    for variant in sorted({r.variant for r in runs if r.config.get("num_rounds") in main_rounds}):
        agg = aggregate([r for r in runs if r.variant == variant])
        means.append((variant, agg["total_mb"].mean, agg[qkey].mean))
    floor = min((x for _, x, _ in means if x > 0), default=1.0) / 10  # 0-byte baselines sit at the left edge
    points = [(label, max(x, floor), y, x == 0) for label, x, y in means if not math.isnan(y)]
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

