"""Checkpoints after every round, written atomically, for exact resume.

A checkpoint holds everything a run needs to continue as if it had never stopped: the strategy's
state (global adapter, server optimizer moments, KD teacher, split server half, block schedule ...),
the client store (persistent adapters, optimizer states, error-feedback residuals), the RNG states,
the counters, the W&B run id and the last round's metrics. Every random draw in fedtune is derived
from (seed, round, client), so restoring these and starting at the next round is exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.errors import ConfigError

LATEST = "latest"
log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, round_idx: int, state: dict[str, Any], *, keep_last: int, store: Any = None) -> Path:
    """Write ``round_XXXXX.pt`` (temp file, fsync, rename), point ``latest`` at it, prune old ones.

    With a client ``store``, its spilled entries go next to it as files (``round_XXXXX.store/``, hard
    links to the spill files) instead of being loaded into the checkpoint, so checkpointing keeps the
    store's memory limit; ``state["store"]`` is set from it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{round_idx:05d}.pt"
    if store is not None:
        side = path.with_suffix(".store")
        shutil.rmtree(side, ignore_errors=True)
        state = {**state, "store": store.state_dict(spill_to=side)}
        if state["store"]["spill_dir"] is not None:
            state["store"]["spill_dir"] = side.name  # relative to the checkpoint folder
    tmp, pointer = path.with_suffix(".tmp"), folder / f"{LATEST}.tmp"
    try:
        with tmp.open("wb") as f:
            torch.save({"round_idx": round_idx, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        pointer.write_text(json.dumps({"file": path.name, "round_idx": round_idx}))
        os.replace(pointer, folder / LATEST)
    except BaseException:  # disk full, killed ...: no temp files left; the previous checkpoint stands
        tmp.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
        if store is not None and not path.exists():
            shutil.rmtree(path.with_suffix(".store"), ignore_errors=True)
        raise
    for old in sorted(folder.glob("round_*.pt"))[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    kept = {p.stem for p in folder.glob("round_*.pt")}
    for side in folder.glob("round_*.store"):
        if side.stem not in kept:
            shutil.rmtree(side, ignore_errors=True)
    return path


def latest_round(folder: Path) -> int | None:
    """The round ``latest`` points at, or None (no pointer, or an unreadable one)."""
    try:
        return int(json.loads((folder / LATEST).read_text())["round_idx"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``folder``, or None when there is none at all.

    ``latest`` names the newest one; when it is malformed, or the file it names is truncated or
    corrupted, the older checkpoints ``keep_last`` kept are tried newest first, with a warning naming
    each unreadable file. Checkpoints exist but none is readable: a ConfigError (one line).
    """
    pointer = folder / LATEST
    candidates = sorted(folder.glob("round_*.pt"), reverse=True) if folder.is_dir() else []
    if not pointer.exists() and not candidates:
        return None
    try:
        named = folder / json.loads(pointer.read_text())["file"]
        candidates = [named, *(c for c in candidates if c != named)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is unreadable (%s); trying the checkpoint files themselves", pointer,
                    type(err).__name__)
    for path in candidates:
        try:
            state = torch.load(path, weights_only=False)
            if not isinstance(state, dict) or "round_idx" not in state:
                raise ValueError("not a fedtune checkpoint")
        except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to an older one
            log.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path, type(err).__name__,
                        " ".join(str(err).split())[:120])
            continue
        return state
    raise ConfigError(f"resume={folder.parent}: no readable checkpoint in {folder} "
                      f"({', '.join(p.name for p in candidates) or 'none'} unreadable); start a new run")


def truncate_metrics(path: Path, *, last_round: int) -> int:
    """Keep the metrics rows of rounds <= last_round (a killed run may have logged one more); returns rows kept."""
    if not path.exists():
        return 0
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["round_idx"] <= last_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


_HELD_LOCKS: set[int] = set()  # file descriptors of the run locks this process holds


def _drop_locks_in_child() -> None:
    """In a forked child (the heatmap drawer, CPU workers): close the inherited lock descriptors. An flock
    belongs to the open file, shared across fork: a child still running after the run was killed would
    otherwise keep the run locked until it ends. Closing the child's copy leaves the parent's lock held."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (an exclusive ``flock``, released when the process ends, however it ends)
    while a run writes the folder: a second process starting or resuming the same run gets one line
    naming the holder's PID instead of computing the same rounds twice into the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(f"{folder}: another fedtune process (PID {holder}) is writing this run; wait for "
                              "it to finish or stop it, then resume") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD_LOCKS.add(f.fileno())
        try:
            yield
        finally:
            _HELD_LOCKS.discard(f.fileno())
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)

