"""Metric sinks: where numbers go. ``metrics.jsonl`` always (the source of truth), W&B optionally.

A sink has ``log(metrics, step)``, ``summary(values)`` and ``close()``; :class:`NullSink` does
nothing, so call sites never branch on "is logging on".
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Literal, Protocol, cast

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Logs nothing (``logger=none``)."""

    def __init__(self, **_: Any) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        pass

    def close(self) -> None:
        pass


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: what
    ``json.dumps(..., allow_nan=False)`` accepts, so files stay strict JSON (null, never NaN)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # numpy floats too
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (non-finite floats as null; anything else unknown via str)."""
    return json.dumps(strict_json(value), allow_nan=False, default=str, **kwargs)


class JsonlSink:
    """One JSON line per step, appended and flushed (a killed run keeps every finished round)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._file.write(dumps({"round_idx": step, **metrics}, sort_keys=True) + "\n")
        self._file.flush()

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """Weights & Biases; offline unless ``logger.mode=online``.

    The mode is put in the environment before ``wandb.init``: otherwise offline mode still tries
    the network. Runs of one Hydra multirun share a W&B group.
    """

    def __init__(
        self,
        *,
        run_dir: str | Path,
        run_config: dict[str, Any],
        project: str = "fedtune",
        entity: str | None = None,
        mode: Literal["online", "offline", "disabled", "shared"] = "offline",
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
    ) -> None:
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: ~1 s, and only runs that log to W&B pay it

        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, group=group, name=name, tags=tags or None,
            dir=str(run_dir), config=run_config, reinit="finish_previous",
            id=run_id, resume="allow" if run_id else None,
        )
        self.run_id = self.run.id
        for prefix in ("train", "eval", "comm", "time", "model", "mem"):
            self.run.define_metric(f"{prefix}/*", step_metric="round_idx")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({"round_idx": step, **metrics})

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        payload: dict[str, Any] = {k: self._wandb.Image(str(p)) for k, p in images.items()}
        # wandb.Table annotates columns as the invariant list[str | int]; a list[str] is what it reads
        payload.update({k: self._wandb.Table(columns=cast("list[str | int]", cols), data=rows)
                        for k, (cols, rows) in tables.items()})
        if payload:
            self.run.log(payload, commit=False)

    def close(self) -> None:
        self.run.finish()


class ConsoleSink:
    """A compact line per round for people."""

    KEYS = ("train/loss", "eval/loss", "eval/ppl", "eval/bleu", "eval/accuracy", "comm/up_bytes", "comm/down_bytes")

    def __init__(self, *, num_rounds: int) -> None:
        self.num_rounds = num_rounds

    def log(self, metrics: dict[str, Any], step: int) -> None:
        parts = [f"round {step + 1}/{self.num_rounds}"]
        for key in self.KEYS:
            if key in metrics:
                value = metrics[key]
                parts.append(f"{key} {_human_bytes(value) if key.endswith('bytes') else f'{value:.4g}'}")
        parts.append(f"{metrics.get('time/round_s', 0.0):.2f}s")
        log.info(" | ".join(parts))

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        pass

    def close(self) -> None:
        pass


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


class Sinks:
    """Fan-out to several sinks; closes all of them even if one fails."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(values)

    def log_media(self, *, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        for sink in self.sinks:
            sink.log_media(images=images, tables=tables)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - close the rest, then re-raise
                errors.append(err)
        if errors:
            raise errors[0]
