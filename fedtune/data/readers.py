"""Read local data files (and hub datasets) into plain row dicts, one :class:`Table` per split.

Formats, chosen by file name: ``.csv`` (quoted fields may span lines), ``.tsv`` (tab-separated,
quoting OFF, as in GLUE: a ``"`` is an ordinary character), ``.json`` (a list of objects, or an
object holding one such list; a ``.json`` file that is really JSON Lines is read as such),
``.jsonl`` / ``.ndjson``, ``.parquet``, and folders written by ``datasets``' ``save_to_disk``.
CSV / TSV cells stay strings (no type guessing: a sentence reading ``null`` stays ``"null"``).
A CSV / TSV file's first row is its header; with ``header=False`` (``data.header=false``, e.g. GLUE's
CoLA, whose ``train.tsv`` / ``dev.tsv`` have none) every row is data and the columns are named by
their 0-based position: ``"0"``, ``"1"``, ... A header naming a column twice is an error (one line
naming the duplicates), never a silent "the last one wins".

A folder holds one file per split, found by name: ``train.*`` and the first present of
``validation``, ``valid``, ``val``, ``dev``, ``eval``, ``test`` (so GLUE's unlabeled ``test.tsv``
loses to ``dev.tsv``); a folder with a single data file is read as that file.

Bad rows (wrong field count, bytes that are not UTF-8, lines that are not JSON objects, and
whatever a source finds unusable later) go through :class:`BadRows`: ``fail`` raises a one-line
:class:`~fedtune.errors.ConfigError` naming file and row; ``skip`` drops and counts them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedtune.errors import ConfigError

Row = dict[str, Any]

BAD_ROW_POLICIES = ("fail", "skip")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "eval", "test")
_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet")
# Bytes that are not UTF-8 come back from errors="surrogateescape" as lone surrogates.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class BadRow(Exception):
    """Raised by a row mapper (see :meth:`Table.map`); the reason goes to the file's policy."""


class BadRows:
    """Applies ``data.on_bad_rows`` to one file: raise on the first bad row, or count them."""

    def __init__(self, *, policy: str, where: str) -> None:
        if policy not in BAD_ROW_POLICIES:
            raise ConfigError(f"data.on_bad_rows={policy}: must be one of {', '.join(BAD_ROW_POLICIES)}")
        self.policy = policy
        self.where = where
        self.count = 0

    def hit(self, row: int, reason: str) -> None:
        """Report bad data row ``row`` (1-based, header not counted)."""
        if self.policy == "fail":
            raise ConfigError(
                f"{self.where}: row {row}: {reason}; fix the file or pass data.on_bad_rows=skip"
            )
        self.count += 1


@dataclass
class Table:
    """Rows of one split as read, before a source maps them to the common schema."""

    rows: list[Row]
    columns: list[str]
    where: str
    bad: BadRows

    def require(self, column: str, *, why: str) -> None:
        """Raise, listing the available columns, unless the table has ``column`` (``why``: who asks)."""
        if column not in self.columns:
            available = ", ".join(repr(c) for c in self.columns)
            raise ConfigError(f"{self.where}: no column {column!r} ({why}); available: {available}")

    def map(self, row_fn: Callable[[Row], list[Row]]) -> list[Row]:
        """Concatenate ``row_fn(row)`` over the rows; a :class:`BadRow` goes to the bad-row policy."""
        out: list[Row] = []
        for row_no, row in enumerate(self.rows, start=1):
            try:
                out.extend(row_fn(row))
            except BadRow as e:
                self.bad.hit(row_no, str(e))
        return out


def load_tables(
    *, path: str | None, hub_id: str | None, on_bad_rows: str, hub_config: str | None = None, header: bool = True
) -> tuple[dict[str, Table], dict[str, Any]]:
    """Tables from ``path`` when set, else from ``datasets.load_dataset(hub_id, hub_config)``.

    Also returns the start of ``Splits.info``: where the rows came from and how many were read.
    """
    if path is not None:
        tables = read_path(path, on_bad_rows=on_bad_rows, header=header)
        info: dict[str, Any] = {"path": str(path)}
    elif hub_id:
        tables = _read_hub(hub_id, hub_config=hub_config, on_bad_rows=on_bad_rows)
        info = {"hub_id": hub_id, "hub_config": hub_config}
    else:
        raise ConfigError("no data: pass data.path=<local file or folder> or data.hub_id=<hub dataset id>")
    info["files"] = {split: t.where for split, t in tables.items()}
    info["num_rows_read"] = sum(len(t.rows) + t.bad.count for t in tables.values())
    return tables, info


def present(value: Any) -> bool:
    """False for None, NaN and blank strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def data_files(path: str | Path) -> dict[str, tuple[Path, str]] | None:
    """Which file each split comes from: ``{"train": (file, where), ["eval": ...]}``.

    None for a ``save_to_disk`` folder (its splits are not files). Raises the same one-line errors as
    :func:`read_path` for a missing path or a folder without a recognisable layout.
    """
    given = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path={given}: no such file or folder")
    if p.is_dir() and _is_saved_dataset(p):
        return None
    if p.is_dir():
        return {split: (f, str(f)) for split, f in _split_files(p, given).items()}
    return {"train": (p, given)}


def read_path(path: str | Path, *, on_bad_rows: str = "fail", header: bool = True) -> dict[str, Table]:
    """Read a file or folder into ``{"train": Table}`` plus ``"eval"`` when the folder has one.

    ``path`` is used as given (relative to the working directory) and shown as given in errors.
    """
    files = data_files(path)
    if files is None:
        if not header:
            raise ConfigError(f"data.header=false: data.path={path} is a save_to_disk folder; only .csv/.tsv "
                              "files can lack a header row")
        return _read_saved_dataset(Path(path).expanduser(), given=str(path), on_bad_rows=on_bad_rows)
    return {split: read_file(f, on_bad_rows=on_bad_rows, where=where, header=header)
            for split, (f, where) in files.items()}


def _check_suffix(path: Path, where: str, *, header: bool) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ConfigError(
            f"{where}: unsupported file type {suffix or '(none)'}; use one of {', '.join(_SUFFIXES)}"
        )
    if not header and suffix not in (".csv", ".tsv"):
        raise ConfigError(f"data.header=false: {where} is a {suffix} file; only .csv/.tsv files can lack a "
                          "header row (drop data.header=false)")
    return suffix


def read_file(path: Path, *, on_bad_rows: str = "fail", where: str | None = None, header: bool = True) -> Table:
    """Read one data file; the format follows the file name's suffix."""
    where = where or str(path)
    bad = BadRows(policy=on_bad_rows, where=where)
    suffix = _check_suffix(path, where, header=header)
    if path.stat().st_size == 0:
        raise ConfigError(f"{where}: empty file")
    if suffix in (".csv", ".tsv"):
        columns, rows = _read_delimited(path, tsv=suffix == ".tsv", bad=bad, header=header)
    elif suffix == ".parquet":
        columns, rows = _read_parquet(path, where=where)
    else:
        rows = _read_json(path, lines=suffix != ".json", bad=bad)
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not rows and bad.count:
        raise ConfigError(f"{where}: no usable rows ({bad.count} bad rows skipped)")
    if not rows:
        raise ConfigError(f"{where}: empty file: no data rows")
    return Table(rows=rows, columns=columns, where=where, bad=bad)


def _split_files(folder: Path, given: str) -> dict[str, Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _SUFFIXES)
    by_stem = {f.stem.lower(): f for f in files}
    if "train" in by_stem:
        found = {"train": by_stem["train"]}
        eval_name = next((n for n in EVAL_SPLIT_NAMES if n in by_stem), None)
        if eval_name is not None:
            found["eval"] = by_stem[eval_name]
        return found
    if len(files) == 1:
        return {"train": files[0]}
    names = ", ".join(f.name for f in files) or "no data files"
    raise ConfigError(
        f"data.path={given}: folder needs train.<ext> (+ validation/dev/test.<ext>) or a single data "
        f"file ({', '.join(_SUFFIXES)}); found: {names}; pass the file itself as data.path="
    )


def file_columns(path: Path, *, where: str, header: bool = True) -> list[str] | None:
    """The column names of a data file from its first row (CSV / TSV) or schema (Parquet), reading
    nothing more: what the CLI's pre-check compares ``data.columns`` against. None for JSON formats,
    whose columns are the union over all rows."""
    suffix = _check_suffix(path, where, header=header)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = list(pq.read_schema(path).names)
        except Exception:  # noqa: BLE001 - an unreadable file is reported, in one line, when it is read
            return None
        _refuse_duplicates(names, where=where)
        return names
    if suffix not in (".csv", ".tsv") or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = _delimited_reader(f, tsv=suffix == ".tsv")
        first = _read_header(reader, where=where)
    if not first:
        return None
    if not header:
        return [str(i) for i in range(len(first))]
    _refuse_duplicates(first, where=where)
    return first


def _refuse_duplicates(names: list[str], *, where: str) -> None:
    """A column named twice: rows would silently keep the last one's values."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        shown = ", ".join(repr(n) for n in dupes)
        raise ConfigError(f"{where}: duplicate column names {shown} in the header (rows would keep only the last "
                          "one's values); rename them")


def _delimited_reader(f: Any, *, tsv: bool) -> Any:
    # strict: an unclosed quote is an error at EOF, not a silent swallow of every later row
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents are fine
    return csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting, strict=True)


def _read_delimited(path: Path, *, tsv: bool, bad: BadRows, header: bool = True) -> tuple[list[str], list[Row]]:
    delimiter = "\t" if tsv else ","
    rows: list[Row] = []
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = _delimited_reader(f, tsv=tsv)
        first, row_no = _read_header(reader, where=bad.where), 0
        if not first:
            raise ConfigError(f"{bad.where}: empty file: no header row" if header else f"{bad.where}: empty file")
        pending: list[list[str]] = []
        if header:
            _refuse_duplicates(first, where=bad.where)
            names = first
        else:  # every row is data; columns are named by 0-based position
            names = [str(i) for i in range(len(first))]
            pending.append(first)
        while True:
            try:
                fields = pending.pop() if pending else next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                row_no += 1
                bad.hit(row_no, f"line {reader.line_num}: malformed CSV ({e}; an unclosed quote?)")
                continue
            if not fields:  # blank line
                continue
            row_no += 1
            where = f"line {reader.line_num}"
            if len(fields) != len(names):
                bad.hit(row_no, f"{where}: expected {len(names)} fields, got {len(fields)}")
            elif _UNDECODABLE.search(delimiter.join(fields)):
                bad.hit(row_no, f"{where}: bytes that are not valid UTF-8")
            else:
                rows.append(dict(zip(names, fields)))
    return names, rows


def _read_header(reader: Any, *, where: str) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as e:
        raise ConfigError(f"{where}: line {reader.line_num}: malformed CSV header ({e})") from None


def _read_json(path: Path, *, lines: bool, bad: BadRows) -> list[Row]:
    if not lines:
        try:
            doc = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{bad.where}: byte {e.start}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ConfigError(f"{bad.where}: line {e.lineno}: invalid JSON ({e.msg})") from None
            return _read_json(path, lines=True, bad=bad)  # a .json file holding JSON Lines
        items = _json_records(doc, where=bad.where)
        rows = []
        for i, item in enumerate(items, start=1):
            if isinstance(item, dict):
                rows.append(item)
            else:
                bad.hit(i, f"expected a JSON object, got {type(item).__name__}")
        return rows
    rows = []
    with path.open("rb") as f:
        row_no = 0
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row_no += 1
            try:
                item = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
            except UnicodeDecodeError:
                bad.hit(row_no, f"line {line_no}: bytes that are not valid UTF-8")
            except json.JSONDecodeError as e:
                bad.hit(row_no, f"line {line_no}: invalid JSON ({e.msg})")
            else:
                if isinstance(item, dict):
                    rows.append(item)
                else:
                    bad.hit(row_no, f"line {line_no}: expected a JSON object, got {type(item).__name__}")
    return rows


def _json_records(doc: Any, *, where: str) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise ConfigError(f"{where}: expected a JSON list of objects (or an object holding one such list)")


def _read_parquet(path: Path, *, where: str) -> tuple[list[str], list[Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _refuse_duplicates(list(pq.read_schema(path).names), where=where)
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: unreadable Parquet file ({first})") from None
    return table.column_names, table.to_pylist()


def _read_hub(hub_id: str, *, hub_config: str | None, on_bad_rows: str) -> dict[str, Table]:
    import datasets  # slow import: only when the hub is used

    try:
        loaded = datasets.load_dataset(hub_id, hub_config)
    except Exception as e:  # offline, unknown id, no access: all mean "use a local copy"
        raise ConfigError(
            f"data.hub_id={hub_id}: cannot reach the hub or load this dataset ({type(e).__name__}); "
            "pass data.path=<local file or folder>"
        ) from None
    return dataset_tables(loaded, where=f"hub:{hub_id}", on_bad_rows=on_bad_rows)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _read_saved_dataset(folder: Path, *, given: str, on_bad_rows: str) -> dict[str, Table]:
    import datasets  # slow import: only for save_to_disk folders

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # any failure here means a bad folder; say so in one line
        raise ConfigError(f"data.path={given}: unreadable save_to_disk folder ({type(e).__name__})") from None
    return dataset_tables(loaded, where=given, on_bad_rows=on_bad_rows)


def dataset_tables(loaded: Any, *, where: str, on_bad_rows: str) -> dict[str, Table]:
    """Turn a ``datasets`` ``Dataset`` / ``DatasetDict`` into tables (ClassLabel ints -> names).

    Decoding class labels to their names lets hub and local copies of a dataset go through the
    same mapping, so both give the same label indices.
    """
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = {s.lower(): s for s in loaded.keys()}
        picked = {"train": names.get("train")}
        picked["eval"] = next((names[n] for n in EVAL_SPLIT_NAMES if n in names), None)
        parts = {split: loaded[name] for split, name in picked.items() if name is not None}
        split_names = {split: name for split, name in picked.items() if name is not None}
        if "train" not in parts:
            raise ConfigError(f"{where}: no 'train' split; splits: {', '.join(loaded.keys())}")
    else:
        parts = {"train": loaded}
        split_names = {"train": "train"}
    tables = {}
    for split, ds in parts.items():
        rows = ds.to_list()
        for col, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                for r in rows:
                    r[col] = feature.names[r[col]] if r[col] is not None and r[col] >= 0 else None
        where_split = f"{where}[{split_names[split]}]"  # the dataset's own split name, e.g. [test]
        tables[split] = Table(
            rows=rows,
            columns=list(ds.column_names),
            where=where_split,
            bad=BadRows(policy=on_bad_rows, where=where_split),
        )
    return tables
