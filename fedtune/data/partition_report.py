"""What a partition looks like: per-client sizes and label (or topic) histograms.

:func:`partition_report` builds a JSON-serialisable dict (the run saves it as ``partition.json``),
:func:`format_report_table` renders it as a compact text table for the log, and
:func:`save_heatmap` draws the clients x values count matrix as a PNG; :class:`Drawing` draws it in a
child process while the run goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.partition import encode_column, resolve_column
from fedtune.data.schema import Example
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

_MATRIX_MAX_VALUES = 8  # up to this many values the table shows the full count matrix


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def partition_report(
    examples: Sequence[Example],
    parts: Sequence[Sequence[int]],
    *,
    column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Summarise a partition.

    Args:
        examples: the examples that were partitioned.
        parts: per-client example indices, as a partitioner returns them.
        column: the key to histogram; ``None`` means ``label``, else ``topic``, else sizes only.
        label_names: display names for integer values (e.g. ``Splits.label_names``).

    Returns:
        ``{"column", "num_clients", "num_examples", "counts", "values", "value_names",
        "histograms" (clients x values), "tv_to_global", "mean_tv_to_global"}``, where the TV
        distance compares each client's value distribution with the pooled one of all clients
        (0 = identical, 1 = disjoint support). Without a column the value fields are empty and
        the TV fields ``None``.
    """
    counts = [len(p) for p in parts]
    report: dict[str, Any] = {
        "column": None,
        "num_clients": len(parts),
        "num_examples": int(sum(counts)),
        "counts": counts,
        "values": [],
        "value_names": [],
        "histograms": [[] for _ in parts],
        "tv_to_global": None,
        "mean_tv_to_global": None,
    }
    try:
        column = resolve_column(examples, column)
    except ConfigError:
        if column is not None:
            raise
        return report  # nothing to histogram (e.g. a plain prompt/response dataset)
    used = sorted({i for p in parts for i in p})
    values, codes = encode_column([examples[i] for i in used], column)
    position = {i: k for k, i in enumerate(used)}
    hist = np.array(
        [np.bincount(codes[[position[i] for i in p]], minlength=len(values)) for p in parts], dtype=np.int64
    ).reshape(len(parts), len(values))
    pooled = hist.sum(axis=0) / max(int(hist.sum()), 1)
    shares = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    tv = 0.5 * np.abs(shares - pooled).sum(axis=1)
    names = [
        str(label_names[v])
        if label_names is not None and isinstance(v, int) and 0 <= v < len(label_names)
        else str(v)
        for v in values
    ]
    report.update(
        column=column,
        values=[_jsonable(v) for v in values],
        value_names=names,
        histograms=hist.tolist(),
        tv_to_global=[round(float(t), 4) for t in tv],
        mean_tv_to_global=round(float(tv.mean()), 4) if len(tv) else None,
    )
    return report


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def format_report_table(report: dict[str, Any]) -> str:
    """Render a report as a compact text table, one row per client plus a total row.

    With few values (<= 8) each value gets a count column; otherwise each row shows the number of
    distinct values held and the top three with counts. The last column is the client's TV
    distance to the pooled distribution (0 = IID).
    """
    hist = np.array(report["histograms"], dtype=np.int64).reshape(report["num_clients"], -1)
    names = [_short(n) for n in report["value_names"]]
    tv = report["tv_to_global"]
    matrix = 0 < len(names) <= _MATRIX_MAX_VALUES
    if matrix:
        header = ["client", "n", *names, "tv"]
    elif names:
        header = ["client", "n", f"#{report['column']}", "top-3", "tv"]
    else:
        header = ["client", "n"]
    rows = [header]
    for client_id, count in enumerate(report["counts"]):
        row = [str(client_id), str(count)]
        if names:
            h = hist[client_id]
            if matrix:
                row += [str(int(c)) for c in h]
            else:
                top = [k for k in np.argsort(-h, kind="stable")[:3] if h[k] > 0]
                row += [str(int((h > 0).sum())), " ".join(f"{names[k]}:{int(h[k])}" for k in top)]
            row.append(f"{tv[client_id]:.3f}")
        rows.append(row)
    total = ["all", str(report["num_examples"])]
    if matrix:
        total += [str(int(c)) for c in hist.sum(axis=0)] + [f"{report['mean_tv_to_global']:.3f}"]
    elif names:
        total += [str(len(names)), "", f"{report['mean_tv_to_global']:.3f}"]
    rows.append(total)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    left = {header.index("top-3")} if "top-3" in header else set()
    lines = [
        "  ".join(cell.ljust(w) if k in left else cell.rjust(w) for k, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def save_heatmap(report: dict[str, Any], path: str | Path) -> Path:
    """Draw the clients x values count matrix (or the client sizes, without a column) as a PNG."""
    # Figure + savefig go straight through the Agg canvas: no pyplot state, no display needed.
    from matplotlib.figure import Figure

    num_clients = report["num_clients"]
    if report["value_names"]:
        data = np.array(report["histograms"], dtype=np.int64).reshape(num_clients, -1)
        xnames, xlabel = report["value_names"], str(report["column"])
    else:
        data = np.array(report["counts"], dtype=np.int64).reshape(num_clients, 1)
        xnames, xlabel = ["examples"], ""
    num_values = data.shape[1]
    fig = Figure(
        figsize=(min(2 + 0.22 * num_values, 24), min(max(3.0, 1.5 + 0.3 * num_clients), 16)), dpi=100
    )
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("client")
    ax.set_title(f"{num_clients} clients, {report['num_examples']} examples")
    step_x = max(1, num_values // 40)
    ax.set_xticks(range(0, num_values, step_x))
    xticks = [_short(xnames[k]) for k in range(0, num_values, step_x)]
    ax.set_xticklabels(xticks, rotation=90 if max(map(len, xticks)) > 3 else 0, fontsize=6)
    step_y = max(1, num_clients // 40)
    ax.set_yticks(range(0, num_clients, step_y))
    if data.size <= 200:
        peak = max(int(data.max()), 1)
        for (r, c), v in np.ndenumerate(data):
            ax.text(
                c, r, str(int(v)), ha="center", va="center", fontsize=6, color="w" if v < peak / 2 else "k"
            )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


class Drawing:
    """A figure file drawn by a forked child process while the caller goes on.

    The partition heatmap costs about a second on CPU (importing matplotlib, then rendering), all
    before the first round when drawn in line; a child forked from the run, at the lowest priority
    (``nice 19``), draws it in the time the run leaves a core idle instead. :meth:`wait` joins the
    child and returns the file (None, with a warning, when drawing failed: a figure never stops a
    run). Where ``fork`` does not exist it draws in line.
    """

    def __init__(self, draw: Callable[[Path], Path], path: str | Path) -> None:
        self.path: Path | None = Path(path)
        self._proc: Any = None
        if "fork" not in multiprocessing.get_all_start_methods():
            self.path = draw(self.path)
            return
        self._proc = multiprocessing.get_context("fork").Process(target=_draw_child, args=(draw, self.path),
                                                                 daemon=True)
        self._proc.start()

    def ready(self) -> bool:
        """Whether :meth:`wait` would return at once."""
        return self._proc is None or not self._proc.is_alive()

    def wait(self) -> Path | None:
        if self._proc is not None:
            self._proc.join()
            code, self._proc = self._proc.exitcode, None
            if code != 0:
                log.warning("the partition heatmap was not drawn (its process exited with code %s)", code)
                self.path = None
        return self.path


def _draw_child(draw: Callable[[Path], Path], path: Path) -> None:
    """In the forked child: Ctrl-C is the run's to handle; a failure is one line, never a traceback.
    Lowest CPU priority: it draws in the cores' idle time and never slows the rounds it overlaps
    (whose wall-clock times are metrics)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(19)
    try:
        draw(path)
    except Exception as err:
        sys.stderr.write(f"fedtune: partition heatmap: {type(err).__name__}: {err}\n")
        sys.stderr.flush()
        os._exit(1)


def draw_heatmap(report: dict[str, Any], path: str | Path) -> Drawing:
    """:func:`save_heatmap` in a child process (see :class:`Drawing`)."""
    return Drawing(lambda target: save_heatmap(report, target), path)
