"""Render a config's partition without training: the table, partition.json and the heatmap.

    python scripts/show_partition.py data=banking77 data.path=../shared/data/banking77 \
        partition=dirichlet partition.alpha=0.1 [--out outputs/partition]

Loads the data and partitions it exactly as a run with the same overrides would (same seed), but
builds no tokenizer and no model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fedtune.config import build, compose_config, validate  # noqa: E402
from fedtune.data.partition_report import format_report_table, partition_report, save_heatmap  # noqa: E402
from fedtune.data.sources import load_splits  # noqa: E402
from fedtune.errors import ConfigError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/partition", help="folder for partition.json and the heatmap")
    parser.add_argument("overrides", nargs="*", help="fedtune overrides, e.g. partition=dirichlet")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = compose_config(args.overrides)
        validate(cfg)
        splits = load_splits(cfg.data)
        parts = build(cfg.partition)(splits.train, num_clients=cfg.num_clients, seed=cfg.seed)
    except ConfigError as err:
        sys.stderr.write(f"show_partition: error: {err}\n")
        sys.exit(2)
    report = partition_report(splits.train, parts, column=cfg.partition.get("column"), label_names=splits.label_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition.json").write_text(json.dumps(report, indent=1))
    if report["values"]:
        save_heatmap(report, out / "partition.png")
    sys.stdout.write(format_report_table(report) + "\n")
    sys.stdout.write(f"written: {out / 'partition.json'}" + (f", {out / 'partition.png'}" if report["values"] else "")
                     + "\n")


if __name__ == "__main__":
    main()
