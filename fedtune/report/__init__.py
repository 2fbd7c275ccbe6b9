"""Paper-replication report: tables, claim checks and figures from fedtune multirun folders.

    fedtune-report outputs/replication/comparison-smoke/<stamp> [more dirs] [--out DIR]

Every folder below the given ones that holds a ``metrics.jsonl`` is a run (:mod:`.runs`). Runs are
grouped per paper by their experiment overlay's name (``gradualdiff_*``, ``comparison_*``,
``fedcybgd_*``), then per arm (``summary.json``'s ``arm.name``; for older runs the strategy, ``-full``
for full-parameter FedAvg/GradualDiff), and averaged over seeds (mean ± sample std). The papers'
numbers and claims are in :mod:`.claims`; each claim is checked as an ordering of our means: agrees /
disagrees / not measured. :mod:`.figures` draws the PNGs, :mod:`.markdown` writes ``report.md``.

Imports only the standard library, PyYAML (config.yaml), matplotlib (lazily, in the figures) and
:mod:`fedtune.errors`; nothing else in fedtune imports this package.
"""

from fedtune.report.claims import PAPERS, Claim
from fedtune.report.markdown import report
from fedtune.report.runs import Agg, Run, aggregate, load_runs, run_stats

__all__ = ["PAPERS", "Agg", "Claim", "Run", "aggregate", "load_runs", "report", "run_stats"]
