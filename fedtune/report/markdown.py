"""The markdown report: one section per paper (setup, table of our means beside the paper's numbers,
claim checks, sweeps, figures)."""

from __future__ import annotations

from pathlib import Path

from fedtune.errors import ConfigError
from fedtune.report.claims import PAPERS
from fedtune.report.figures import paper_figures
from fedtune.report.runs import Agg, Run, aggregate, load_runs


def _setup_line(runs: list[Run]) -> str:
    cfg = runs[0].config
    seeds = sorted({r.seed for r in runs})
    per_arm: dict[int, set[str]] = {}  # FedCyBGD runs num_clients x the rounds of the FedAvg arms: say so
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
        lines += ["", *paper_figures(name, spec, runs, order, out)]
    return lines


def report(dirs: list[Path], out: Path, *, paper: str | None = None, figures: bool = True) -> str:
    """The markdown report of the runs under ``dirs``; written to ``out/report.md`` with its PNGs."""
    runs = load_runs(dirs)
    if not runs:
        raise ConfigError(f"no metrics.jsonl under {', '.join(map(str, dirs))}: pass the folders the runs were written to")
    names = [paper] if paper else sorted({r.paper for r in runs if r.paper in PAPERS})
    if not names:
        raise ConfigError("the runs name no known experiment (gradualdiff_*, comparison_*, fedcybgd_*); "
                          "pass --paper")
    lines = ["# Replication report", "", f"{len(runs)} runs from " + ", ".join(f"`{d}`" for d in dirs) + "."]
    for name in names:
        chosen = [r for r in runs if paper or r.paper == name]
        lines += ["", *paper_section(name, chosen, out, figures=figures)]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text

