"""Run folders: loading, one run's numbers and their mean ± std over seeds.

Every folder below the given ones that holds a ``metrics.jsonl`` is a run. ``metrics.jsonl`` is the
source of truth for every number; ``summary.json`` gives the arm (``"arm"``: name, strategy,
full_parameters; older runs lack it and the arm is derived from the config choices), ``config.yaml``
the seed and knobs, ``.hydra/overrides.yaml`` what a sweep set (a run that overrides ``lora.r`` or
``strategy.split_layer`` belongs to that sweep, not to the main comparison).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = {"lora.r": "r", "strategy.split_layer": "k"}
# strategies with a LoRA and a full-parameter form: a full-parameter run of one is the "<strategy>-full" arm
# (only for run folders written before summary.json named the arm)
LORA_CAPABLE = ("fedavg", "gradualdiff")


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    choices: dict[str, str]
    config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def _arm_record(self) -> dict[str, Any]:
        arm = self.summary.get("arm")
        return arm if isinstance(arm, dict) else {}

    @property
    def strategy(self) -> str:
        return (self._arm_record.get("strategy") or self.choices.get("strategy")
                or self.config["strategy"]["_target_"].rsplit(".", 1)[-1].lower())

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
        """The arm the run names in summary.json; for older runs, the strategy, with -full when it
        trained every parameter with a LoRA-capable strategy."""
        if self._arm_record.get("name"):
            return str(self._arm_record["name"])
        full = not self.config.get("lora", {}).get("enabled", True)
        return f"{self.strategy}-full" if full and self.strategy in LORA_CAPABLE else self.strategy

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
                runs.append(Run(folder, rows, summary.get("choices", {}), config or {}, overrides, summary))
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
