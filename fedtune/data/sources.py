"""Data sources: build :class:`~fedtune.data.schema.Splits` from a ``data`` config node.

Each source reads ``path`` (a file or folder, see :mod:`fedtune.data.readers`) when it is set, else
``datasets.load_dataset(hub_id)``. Both routes go through the same row mapping, so hub and local
copies of a dataset give the same examples and the same label indices.

Label order: a dataset's own names where it has fixed ones (SST-2: negative, positive); otherwise
the distinct values sorted case-insensitively (integers numerically). For Banking77 that rule
reproduces the hub's ClassLabel order exactly (``activate_my_card`` ... ``Refund_not_showing_up``
between ``receiving_money`` and ``request_refund``).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from fedtune.config import build
from fedtune.data.readers import BadRow, Row, Table, data_files, file_columns, load_tables, present
from fedtune.data.schema import TASKS, Example, Splits
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

_INT = re.compile(r"-?\d+")
# text_pair: optional in both tasks (classify: set, or a column of that name; generate: set only, and
# then the prompt is prompt + newline + text_pair)
_SCHEMA_COLUMNS = {"generate": ("prompt", "response", "text_pair"), "classify": ("text", "text_pair", "label")}
_FILES_TARGET = "fedtune.data.sources.files"
_ALL_SCHEMA_COLUMNS = {k for keys in _SCHEMA_COLUMNS.values() for k in keys}


def load_splits(data_cfg: DictConfig) -> Splits:
    """Instantiate ``data_cfg.source``, hold out an eval split if needed, apply max samples.

    When the source has no eval split, ``data_cfg.eval_fraction`` of train is held out (whole
    groups when the source names one in ``info["holdout_group"]``, e.g. CounselChat questions).
    Eval rows whose content (prompt + response, or text + text_pair) also occurs in train are
    dropped (counted in ``info["num_eval_overlap_dropped"]``), so eval is disjoint from train.
    Hold-out and subsampling draw from generators seeded by ``data_cfg.seed`` alone, one per purpose,
    so every run of a sweep sees the same examples whatever else changes; classification subsamples
    are stratified by label.
    """
    splits: Splits = build(data_cfg.source, _convert_="all")
    task = data_cfg.get("task")
    if task is not None and task != splits.task:
        raise ConfigError(
            f"data.task={task}: data={data_cfg.get('name')} yields {splits.task} examples; "
            f"set data.task={splits.task} (use data.classify_with to train classification as text)"
        )
    seed = int(data_cfg.get("seed", 0))
    files = splits.info.get("files", {})
    if splits.eval:  # the file (or hub split) it came from, as the log and summary.json name it
        splits.info["eval_from"] = splits.info.get("eval_from") or files.get("eval") or "the dataset's eval split"
    else:
        fraction = float(data_cfg.get("eval_fraction", 0.0) or 0.0)
        group_key = splits.info.get("holdout_group")
        splits.train, splits.eval = hold_out(splits.train, fraction=fraction, seed=seed, group_key=group_key)
        splits.info["eval_from"] = (f"held out from {files.get('train', 'train')}: data.eval_fraction={fraction}, "
                                    f"data.seed={seed}")
    log.info("data=%s: eval split from %s", data_cfg.get("name"), splits.info["eval_from"])
    splits.eval, dropped = drop_overlap(splits.eval, splits.train)
    splits.info["num_eval_overlap_dropped"] = dropped
    if dropped:
        log.warning("data=%s: dropped %d eval examples that also occur in train (eval is now %d examples)",
                    data_cfg.get("name"), dropped, len(splits.eval))
    splits.info["seed"] = seed
    for split_name, key in (("train", "max_train_samples"), ("eval", "max_eval_samples")):
        limit = data_cfg.get(key)
        rows = getattr(splits, split_name)
        if limit is not None and int(limit) < 0:
            raise ConfigError(f"data.{key}={limit}: must be >= 0 or null")
        if limit is not None:
            setattr(splits, split_name, subsample(rows, int(limit), seed=seed, purpose=key))
    if not splits.train:
        raise ConfigError(f"data={data_cfg.get('name')}: no training examples left")
    splits.info.update(num_train=len(splits.train), num_eval=len(splits.eval))
    return splits


def content_key(ex: Example) -> tuple[str, str]:
    """What makes two examples the same: prompt + response, or text + text_pair (whitespace-collapsed)."""
    first, second = ("prompt", "response") if "prompt" in ex else ("text", "text_pair")
    return " ".join(str(ex.get(first) or "").split()), " ".join(str(ex.get(second) or "").split())


def drop_overlap(rows: list[Example], reference: list[Example]) -> tuple[list[Example], int]:
    """``rows`` without those whose :func:`content_key` occurs in ``reference``; and how many went."""
    seen = set(map(content_key, reference))
    kept = [ex for ex in rows if content_key(ex) not in seen]
    return kept, len(rows) - len(kept)


def subsample(rows: list[Example], n: int, *, seed: int, purpose: str) -> list[Example]:
    """A seeded random draw of ``n`` rows (all when ``n >= len(rows)``), kept in input order.

    Rows with a ``label`` (classification) are drawn stratified: each label gets its proportional
    share (largest remainders, ties broken by the same generator), so a label-sorted file still
    yields every label. The generator depends on ``seed`` and ``purpose`` only (the data seed, never
    the run's), so every run of a sweep gets the same rows.
    """
    if n >= len(rows):
        return list(rows)
    rng = random.Random(f"{purpose}:{seed}")
    if not rows or "label" not in rows[0]:
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    by_label: dict[Any, list[int]] = {}
    for i, ex in enumerate(rows):
        by_label.setdefault(ex["label"], []).append(i)
    labels = sorted(by_label, key=str)
    exact = {lab: n * len(by_label[lab]) / len(rows) for lab in labels}
    quota = {lab: int(exact[lab]) for lab in labels}
    tiebreak = {lab: rng.random() for lab in labels}
    rest = sorted(labels, key=lambda lab: (quota[lab] - exact[lab], tiebreak[lab]))
    for lab in rest[: n - sum(quota.values())]:
        quota[lab] += 1
    keep = [i for lab in labels for i in rng.sample(by_label[lab], quota[lab])]
    return [rows[i] for i in sorted(keep)]


def hold_out(
    rows: list[Example], *, fraction: float, seed: int, group_key: str | None = None
) -> tuple[list[Example], list[Example]]:
    """Split ``rows`` into (train, eval), ``fraction`` of rows (or of groups) going to eval.

    Deterministic in ``seed``; both parts keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={fraction}: must be in [0, 1) (the dataset has no eval split)")
    if fraction == 0.0:
        log.warning("data.eval_fraction=0 and the dataset has no eval split: evaluation is empty")
        return rows, []
    keys = [r[group_key] for r in rows] if group_key else list(range(len(rows)))
    groups = list(dict.fromkeys(keys))
    num_eval = max(1, round(fraction * len(groups)))
    if num_eval >= len(groups):
        raise ConfigError(
            f"data.eval_fraction={fraction}: leaves no training data ({len(groups)} rows/groups)"
        )
    held = set(random.Random(f"holdout:{seed}").sample(groups, num_eval))
    train = [r for r, k in zip(rows, keys) if k not in held]
    return train, [r for r, k in zip(rows, keys) if k in held]


def banking77(
    *, path: str | None = None, hub_id: str | None = "PolyAI/banking77", on_bad_rows: str = "fail"
) -> Splits:
    """Banking77 intents: ``text`` -> ``label`` (77 names). Folder: ``train.csv`` + ``test.csv``."""
    tables, info = load_tables(path=path, hub_id=hub_id, on_bad_rows=on_bad_rows)
    mapped = {}
    for split, table in tables.items():
        label_col = "label" if "label" in table.columns else "category"  # hub | local csv
        _require({split: table}, "text", label_col, why="data=banking77")

        def row_fn(r: Row, c: str = label_col) -> list[Example]:
            return [{"text": _text(r, "text"), "label": _label_key(r, c)}]

        mapped[split] = table.map(row_fn)
    train_label = "label" if "label" in tables["train"].columns else "category"
    return _finish(mapped, tables, task="classify", info=info, label_what=f"column {train_label!r}")


def sst2(
    *,
    path: str | None = None,
    hub_id: str | None = "nyu-mll/glue",
    hub_config: str | None = "sst2",
    on_bad_rows: str = "fail",
) -> Splits:
    """GLUE SST-2: ``sentence`` -> negative / positive. Folder: ``train.tsv`` + ``dev.tsv``."""
    tables, info = load_tables(path=path, hub_id=hub_id, hub_config=hub_config, on_bad_rows=on_bad_rows)
    _require(tables, "sentence", "label", why="data=sst2")
    names = ["negative", "positive"]

    def row_fn(row: Row) -> list[Example]:
        return [{"text": _text(row, "sentence"), "label": _encode_fixed(_label_key(row, "label"), names)}]

    mapped = {split: table.map(row_fn) for split, table in tables.items()}
    return _finish(mapped, tables, task="classify", info=info, label_names=names)


def counsel_chat(
    *,
    path: str | None = None,
    hub_id: str | None = "nbertagnolli/counsel-chat",
    train_splits: Sequence[str] = ("train",),
    eval_splits: Sequence[str] = ("val", "test"),
    on_bad_rows: str = "fail",
) -> Splits:
    """CounselChat: prompt = questionTitle + newline + questionText, response = answerText.

    Keeps ``topic`` and ``question_id``. Rows go to train / eval by the file's ``split`` column
    (split by question); without one (hub copy) eval is held out by whole questions.
    """
    tables, info = load_tables(path=path, hub_id=hub_id, on_bad_rows=on_bad_rows)
    _require(
        tables, "questionID", "questionTitle", "questionText", "topic", "answerText", why="data=counsel_chat"
    )

    def row_fn(row: Row) -> list[Example]:
        parts = [_text(row, c, required=False).strip() for c in ("questionTitle", "questionText")]
        if not any(parts):
            raise BadRow("empty 'questionTitle' and 'questionText'")
        return [
            {
                "prompt": "\n".join(p for p in parts if p),
                "response": _text(row, "answerText").strip(),
                "topic": _text(row, "topic").strip(),
                "question_id": _text(row, "questionID"),
                "split": _text(row, "split", required=False).strip(),
            }
        ]

    mapped = {split: table.map(row_fn) for split, table in tables.items()}
    info["holdout_group"] = "question_id"
    if "split" in tables["train"].columns:
        rows = [ex for part in mapped.values() for ex in part]
        unknown = sorted({ex["split"] for ex in rows} - set(train_splits) - set(eval_splits))
        if unknown:
            log.warning(
                "counsel_chat: rows with split %s are in neither train_splits nor eval_splits", unknown
            )
        mapped = {
            "train": [ex for ex in rows if ex["split"] in train_splits],
            "eval": [ex for ex in rows if ex["split"] in eval_splits],
        }
        info["num_rows_unused"] = len(rows) - len(mapped["train"]) - len(mapped["eval"])
        info["eval_from"] = f"{info['files']['train']} rows with split in {', '.join(eval_splits)}"
    for part in mapped.values():
        for ex in part:
            del ex["split"]
    return _finish(mapped, tables, task="generate", info=info)


def alpaca(
    *, path: str | None = None, hub_id: str | None = "tatsu-lab/alpaca", on_bad_rows: str = "fail"
) -> Splits:
    """Alpaca-style instructions: prompt = instruction (+ blank line + input when non-empty).

    Rows are ``{instruction, input, output}``; self-instruct seed tasks
    (``{instruction, instances: [{input, output}, ...]}``) give one example per instance.
    """
    tables, info = load_tables(path=path, hub_id=hub_id, on_bad_rows=on_bad_rows)
    for table in tables.values():
        table.require("instruction", why="data=alpaca")
        table.require("instances" if "instances" in table.columns else "output", why="data=alpaca")

    def row_fn(row: Row) -> list[Example]:
        instruction = _text(row, "instruction").strip()
        instances = row.get("instances")
        if instances is None:
            instances = [{"input": row.get("input"), "output": _text(row, "output")}]
        elif not isinstance(instances, list) or not all(
            isinstance(i, dict) and present(i.get("output")) for i in instances
        ):
            raise BadRow("'instances' must be a list of objects, each with an 'output'")
        out = []
        for inst in instances:
            extra = _text(inst, "input", required=False).strip()
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            out.append({"prompt": prompt, "response": _text(inst, "output")})
        return out

    mapped = {split: table.map(row_fn) for split, table in tables.items()}
    return _finish(mapped, tables, task="generate", info=info)


def files(
    *,
    path: str | None,
    task: str,
    columns: Mapping[str, str | int | None] | None = None,
    label_names: Sequence[str] | None = None,
    hub_id: str | None = None,
    on_bad_rows: str = "fail",
    header: bool = True,
) -> Splits:
    """Any local CSV / TSV / JSON / JSONL / Parquet file or save_to_disk folder, via a column mapping.

    ``columns`` maps schema keys (``prompt``, ``response`` | ``text``, ``text_pair``, ``label``) to
    the file's columns; an unset key uses the column of the same name (``text_pair``: classify uses a
    column of that name if there; generate only when set, and then the prompt is the ``prompt`` column,
    a newline, and the ``text_pair`` column). Other scalar columns are kept. ``label_names`` fixes the
    label order (labels may then be indices). ``header=False`` (CSV / TSV without a header row, e.g.
    CoLA): every key used must be given as a 0-based column position (``data.columns.text=3``).
    """
    columns = _files_settings(path=path, task=task, columns=columns, hub_id=hub_id, header=header)
    tables, info = load_tables(path=path, hub_id=None, on_bad_rows=on_bad_rows, header=header)
    train = tables["train"]
    wanted = _wanted(task, columns, train.columns)
    for table in tables.values():
        _check_columns(wanted, table.columns, where=table.where, header=header)
    names = list(label_names) if label_names is not None else None
    used = set(wanted.values()) | _ALL_SCHEMA_COLUMNS

    def row_fn(row: Row) -> list[Example]:
        ex: Example = {
            k: v for k, v in row.items() if k not in used and (v is None or isinstance(v, (str, int, float)))
        }
        for key, col in wanted.items():
            ex[key] = _text(row, col) if key != "label" else _label_key(row, col)
        if task == "generate" and "text_pair" in ex:  # a sentence pair as one prompt
            ex["prompt"] = f"{ex['prompt']}\n{ex.pop('text_pair')}"
        if names is not None and "label" in ex:
            ex["label"] = _encode_fixed(ex["label"], names)
        return [ex]

    mapped = {split: table.map(row_fn) for split, table in tables.items()}
    label_what = f"data.columns.label={columns['label']}" if columns.get("label") is not None else "column 'label'"
    return _finish(mapped, tables, task=task, info=info, label_names=names, label_what=label_what)


def _files_settings(
    *, path: Any, task: Any, columns: Mapping[str, Any] | None, hub_id: Any, header: Any
) -> dict[str, str | None]:
    """Check ``data=files``' settings (no file read); the column mapping with positions as strings."""
    if hub_id is not None:
        raise ConfigError(f"data.hub_id={hub_id}: data=files reads local files only; use data.path=")
    if path is None:
        raise ConfigError("data=files needs data.path=<file or folder>")
    if task not in TASKS:
        raise ConfigError(f"data.task={task}: must be one of {', '.join(TASKS)}")
    if not isinstance(header, bool):
        raise ConfigError(f"data.header={header}: must be true or false")
    given = dict(columns or {})
    unknown = sorted(set(given) - _ALL_SCHEMA_COLUMNS)
    if unknown:
        raise ConfigError(
            f"data.columns.{unknown[0]}: unknown key; use prompt, response, text, text_pair, label"
        )
    unused = sorted(k for k, v in given.items() if v is not None and k not in _SCHEMA_COLUMNS[task])
    if unused:
        log.warning("data.columns.%s is set but unused with data.task=%s", unused[0], task)
    out: dict[str, str | None] = {}
    for key, col in given.items():
        if col is None or header:
            out[key] = None if col is None else str(col)
        elif isinstance(col, int) and not isinstance(col, bool) and col >= 0 or (
                isinstance(col, str) and col.strip().isdigit()):
            out[key] = str(int(col))
        else:
            raise ConfigError(f"data.columns.{key}={col}: with data.header=false a column is its 0-based "
                              f"position in the row, an integer >= 0 (e.g. data.columns.{key}=3)")
    if not header:
        for key in _SCHEMA_COLUMNS[task]:
            if key != "text_pair" and out.get(key) is None:
                raise ConfigError(f"data.columns.{key}: with data.header=false the file has no column names; give "
                                  f"its 0-based position (data.columns.{key}=N)")
    return out


def _wanted(task: str, columns: Mapping[str, str | None], available: Sequence[str]) -> dict[str, str]:
    """Schema key -> the file column it reads (an unset key: the column of its own name)."""
    wanted = {}
    for key in _SCHEMA_COLUMNS[task]:
        col = columns.get(key)
        if key == "text_pair" and col is None and (task == "generate" or "text_pair" not in available):
            continue  # optional
        wanted[key] = col if col is not None else key
    return wanted


def _check_columns(wanted: Mapping[str, str], available: Sequence[str], *, where: str, header: bool) -> None:
    """One line naming the key for a mapped column the file lacks (or a position past its last column)."""
    for key, col in wanted.items():
        if col in available:
            continue
        if not header:
            raise ConfigError(f"data.columns.{key}={col}: no column at 0-based position {col}; {where} has "
                              f"{len(available)} columns (positions 0-{len(available) - 1})")
        names = ", ".join(repr(c) for c in available)
        hint = ("; a file without a header row? pass data.header=false and give columns by 0-based position"
                if where.lower().endswith((".csv", ".tsv")) else "")
        raise ConfigError(f"{where}: no column {col!r} (data.columns.{key}); available: {names}{hint}")


def check_data(data_cfg: DictConfig) -> None:
    """What the CLI's pre-check verifies of the data for one job, reading no more than file headers.

    ``data.path`` must exist (any source); for ``data=files`` its settings must be valid and every
    mapped column must be in the header of the train (and eval) file (CSV / TSV: the first row;
    Parquet: the schema; JSON formats, whose columns are the union over all rows, and save_to_disk
    folders are checked when loaded). Sources without a path (synthetic, the hub) cost nothing.
    """
    from omegaconf import OmegaConf

    source = data_cfg.get("source")
    if not isinstance(source, DictConfig) or source.get("path") is None:
        if source is not None and source.get("_target_") == _FILES_TARGET:
            raise ConfigError("data=files needs data.path=<file or folder>")
        return
    kw = OmegaConf.to_container(source, resolve=True)
    assert isinstance(kw, dict)
    header = kw.get("header", True)
    columns: dict[str, str | None] = {}
    if kw.get("_target_") == _FILES_TARGET:
        columns = _files_settings(path=kw["path"], task=kw.get("task"), columns=kw.get("columns"),
                                  hub_id=kw.get("hub_id"), header=header)
    found = data_files(kw["path"])  # a missing path: one line, whatever the source
    if kw.get("_target_") != _FILES_TARGET or found is None:
        return
    wanted = None
    for split in ("train", "eval"):
        if split not in found:
            continue
        file, where = found[split]
        available = file_columns(file, where=where, header=header)
        if available is None:
            continue
        wanted = wanted or _wanted(kw["task"], columns, available)
        _check_columns(wanted, available, where=where, header=header)


def _finish(
    mapped: dict[str, list[Example]],
    tables: dict[str, Table],
    *,
    task: str,
    info: dict[str, Any],
    label_names: list[str] | None = None,
    label_what: str = "column 'label'",
) -> Splits:
    """Build Splits; for classify without fixed ``label_names``, derive them and encode labels.

    A classification train split with a single class is refused (a classifier would reach accuracy
    1.0 on it learning nothing); ``label_what`` names the label column in that message.
    """
    if task == "classify" and label_names is None:
        keys = {ex["label"] for part in mapped.values() for ex in part}
        numeric = all(_INT.fullmatch(k) for k in keys)
        label_names = sorted(keys, key=int) if numeric else sorted(keys, key=lambda k: (k.lower(), k))
        index = {name: i for i, name in enumerate(label_names)}
        for part in mapped.values():
            for ex in part:
                ex["label"] = index[ex["label"]]
    if task == "classify" and mapped["train"]:
        classes = {ex["label"] for ex in mapped["train"]}
        if len(classes) == 1:
            (only,) = classes
            name = label_names[only] if label_names and isinstance(only, int) else only
            raise ConfigError(
                f"{tables['train'].where}: {label_what} has a single class ({name!r}) in all "
                f"{len(mapped['train'])} training rows; classification needs at least 2 (check the label column)"
            )
    info["num_rows_skipped"] = sum(t.bad.count for t in tables.values())
    if info["num_rows_skipped"]:
        log.warning(
            "%s: skipped %d bad rows (data.on_bad_rows=skip)", info["files"], info["num_rows_skipped"]
        )
    return Splits(
        train=mapped["train"], eval=mapped.get("eval", []), task=task, label_names=label_names, info=info
    )


def _require(tables: dict[str, Table], *columns: str, why: str) -> None:
    for table in tables.values():
        for column in columns:
            table.require(column, why=why)


def _text(row: Row, column: str, *, required: bool = True) -> str:
    value = row.get(column)
    if present(value):
        return value if isinstance(value, str) else str(value)
    if required:
        raise BadRow(f"empty {column!r}")
    return ""


def _label_key(row: Row, column: str) -> str:
    """A label value as a name: strings stripped, integral floats without the decimal point.

    A missing label is a bad row: empty, null, a float NaN, or the text ``NaN`` / ``nan`` (how pandas
    and spreadsheets write a missing value), never a class named "NaN".
    """
    value = row.get(column)
    if not present(value):
        raise BadRow(f"empty {column!r}")
    if isinstance(value, str) and value.strip().lower() == "nan":
        raise BadRow(f"missing label {value.strip()!r} in {column!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _encode_fixed(key: str, names: list[str]) -> int:
    if key in names:
        return names.index(key)
    if _INT.fullmatch(key) and 0 <= int(key) < len(names):
        return int(key)
    raise BadRow(f"label {key!r} is not one of {names} (nor an index into them)")
