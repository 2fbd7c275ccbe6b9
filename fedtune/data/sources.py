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
from fedtune.data.readers import BadRow, Row, Table, load_tables, present
from fedtune.data.schema import TASKS, Example, Splits
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

_INT = re.compile(r"-?\d+")
_SCHEMA_COLUMNS = {"generate": ("prompt", "response"), "classify": ("text", "text_pair", "label")}
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
    if splits.eval:
        splits.info["eval_from"] = "dataset"
    else:
        fraction = float(data_cfg.get("eval_fraction", 0.0) or 0.0)
        group_key = splits.info.get("holdout_group")
        splits.train, splits.eval = hold_out(splits.train, fraction=fraction, seed=seed, group_key=group_key)
        splits.info["eval_from"] = f"held out eval_fraction={fraction} of train, seed={seed}"
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
        mapped[split] = table.map(
            lambda r, c=label_col: [{"text": _text(r, "text"), "label": _label_key(r, c)}]
        )
    return _finish(mapped, tables, task="classify", info=info)


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
    columns: Mapping[str, str | None] | None = None,
    label_names: Sequence[str] | None = None,
    hub_id: str | None = None,
    on_bad_rows: str = "fail",
) -> Splits:
    """Any local CSV / TSV / JSON / JSONL / Parquet file or save_to_disk folder, via a column mapping.

    ``columns`` maps schema keys (``prompt``, ``response`` | ``text``, ``text_pair``, ``label``) to
    the file's columns; an unset key uses the column of the same name (``text_pair`` only if there).
    Other scalar columns are kept. ``label_names`` fixes the label order (labels may then be indices).
    """
    if hub_id is not None:
        raise ConfigError(f"data.hub_id={hub_id}: data=files reads local files only; use data.path=")
    if path is None:
        raise ConfigError("data=files needs data.path=<file or folder>")
    if task not in TASKS:
        raise ConfigError(f"data.task={task}: must be one of {', '.join(TASKS)}")
    columns = dict(columns or {})
    unknown = sorted(set(columns) - _ALL_SCHEMA_COLUMNS)
    if unknown:
        raise ConfigError(
            f"data.columns.{unknown[0]}: unknown key; use prompt, response, text, text_pair, label"
        )
    unused = sorted(k for k, v in columns.items() if v is not None and k not in _SCHEMA_COLUMNS[task])
    if unused:
        log.warning("data.columns.%s is set but unused with data.task=%s", unused[0], task)
    tables, info = load_tables(path=path, hub_id=None, on_bad_rows=on_bad_rows)
    wanted = {k: columns.get(k) or k for k in _SCHEMA_COLUMNS[task]}
    if task == "classify" and not columns.get("text_pair") and "text_pair" not in tables["train"].columns:
        del wanted["text_pair"]
    for key, col in wanted.items():
        _require(tables, col, why=f"data.columns.{key}")
    names = list(label_names) if label_names is not None else None
    used = set(wanted.values()) | _ALL_SCHEMA_COLUMNS

    def row_fn(row: Row) -> list[Example]:
        ex = {
            k: v for k, v in row.items() if k not in used and (v is None or isinstance(v, (str, int, float)))
        }
        for key, col in wanted.items():
            ex[key] = _text(row, col) if key != "label" else _label_key(row, col)
        if names is not None and "label" in ex:
            ex["label"] = _encode_fixed(ex["label"], names)
        return [ex]

    mapped = {split: table.map(row_fn) for split, table in tables.items()}
    return _finish(mapped, tables, task=task, info=info, label_names=names)


def _finish(
    mapped: dict[str, list[Example]],
    tables: dict[str, Table],
    *,
    task: str,
    info: dict[str, Any],
    label_names: list[str] | None = None,
) -> Splits:
    """Build Splits; for classify without fixed ``label_names``, derive them and encode labels."""
    if task == "classify" and label_names is None:
        keys = {ex["label"] for part in mapped.values() for ex in part}
        numeric = all(_INT.fullmatch(k) for k in keys)
        label_names = sorted(keys, key=int) if numeric else sorted(keys, key=lambda k: (k.lower(), k))
        index = {name: i for i, name in enumerate(label_names)}
        for part in mapped.values():
            for ex in part:
                ex["label"] = index[ex["label"]]
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
    """A label value as a name: strings stripped, integral floats without the decimal point."""
    value = row.get(column)
    if not present(value):
        raise BadRow(f"empty {column!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _encode_fixed(key: str, names: list[str]) -> int:
    if key in names:
        return names.index(key)
    if _INT.fullmatch(key) and 0 <= int(key) < len(names):
        return int(key)
    raise BadRow(f"label {key!r} is not one of {names} (nor an index into them)")
