"""``fedtune-report DIR [DIR ...] [--out OUT]``: the replication report of the runs under the folders.

Writes ``report.md`` and PNGs into ``--out`` (default: ``<first dir>/report``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.errors import ConfigError
from fedtune.report.claims import PAPERS
from fedtune.report.markdown import report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune-report",
        description="Paper-replication report: tables, claim checks and figures from fedtune multirun folders.")
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun folders (searched recursively for runs)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and the PNGs go (default <dir>/report)")
    parser.add_argument("--paper", choices=sorted(PAPERS), default=None, help="report every run as this paper")
    parser.add_argument("--no-figures", action="store_true", help="tables and claims only")
    args = parser.parse_args(argv)
    try:
        text = report(args.dirs, args.out or args.dirs[0] / "report", paper=args.paper, figures=not args.no_figures)
    except ConfigError as e:
        print(f"fedtune-report: {e}", file=sys.stderr)  # noqa: T201 - the one-line error, no traceback
        raise SystemExit(2) from None
    print(text, end="")  # noqa: T201 - the report is this command's output


if __name__ == "__main__":
    main()
