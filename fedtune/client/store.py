"""Per-client state (a persistent adapter, optimizer moments, error-feedback residuals ...).

Kept in memory up to ``max_memory_bytes``; beyond that the least recently used entries spill to
``spill_dir`` and come back on access. Memory therefore grows with what clients keep, not with
the number of clients times a model.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fedtune.tensors import nbytes


class ClientStore:
    """``client_id -> dict`` with LRU spill to disk."""

    def __init__(self, *, max_memory_bytes: int | None = None, spill_dir: str | Path | None = None) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._memory: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._on_disk: set[int] = set()
        if self.spill_dir is not None and self.spill_dir.is_dir():  # files of an earlier process: stale
            for stale in self.spill_dir.glob("client_*.pt"):
                stale.unlink()

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._on_disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk)

    def ids(self) -> list[int]:
        return sorted([*self._memory, *self._on_disk])

    def memory_bytes(self) -> int:
        return sum(self._sizes.values())

    def get(self, client_id: int) -> dict[str, Any]:
        """The client's state (an empty dict for a client never seen)."""
        if client_id in self._on_disk:
            state = torch.load(self._path(client_id), weights_only=False)
            self._path(client_id).unlink()
            self._on_disk.discard(client_id)
            self.put(client_id, state)
        if client_id not in self._memory:
            return {}
        self._memory.move_to_end(client_id)
        return self._memory[client_id]

    def put(self, client_id: int, state: dict[str, Any]) -> None:
        if not state:
            return
        if client_id in self._on_disk:  # a newer state replaces the spilled one
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)
        self._memory[client_id] = state
        self._memory.move_to_end(client_id)
        self._sizes[client_id] = nbytes(state)
        self._spill()

    def state_dict(self, spill_to: Path | None = None) -> dict[str, Any]:
        """For checkpoints: the in-memory entries as they are, and the spilled ones as files.

        Spilled entries are never loaded for this (that would put every client in memory at once, past
        the store's limit): each spill file is hard-linked (or, across file systems, copied) into
        ``spill_to``, and the state names them. Without ``spill_to`` there must be nothing spilled.
        """
        spilled = sorted(self._on_disk)
        if spilled:
            assert spill_to is not None, "the store has spilled entries: pass a folder to keep them in"
            spill_to.mkdir(parents=True, exist_ok=True)
            for cid in spilled:
                _link_or_copy(self._path(cid), spill_to / self._path(cid).name)
        return {"memory": dict(self._memory), "spilled": spilled,
                "spill_dir": str(spill_to) if spilled else None}

    def load_state_dict(self, state: dict[str, Any], base: Path | None = None) -> None:
        """Restore :meth:`state_dict`'s output; spilled entries come back as files, still not loaded
        (``spill_dir`` is resolved against ``base`` when relative)."""
        if "memory" not in state:  # an older checkpoint: {client_id: state}
            state = {"memory": state, "spilled": []}
        for cid, entry in state["memory"].items():
            self.put(int(cid), entry)
        if state["spilled"]:
            assert self.spill_dir is not None, "a checkpoint with spilled clients needs a store with a spill_dir"
            source = Path(state["spill_dir"])
            source = source if source.is_absolute() or base is None else base / source
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            for cid in state["spilled"]:
                cid = int(cid)
                self._memory.pop(cid, None)
                self._sizes.pop(cid, None)
                _link_or_copy(source / self._path(cid).name, self._path(cid))
                self._on_disk.add(cid)

    def _path(self, client_id: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"client_{client_id}.pt"

    def _spill(self) -> None:
        if self.max_memory_bytes is None or self.spill_dir is None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        while self.memory_bytes() > self.max_memory_bytes and len(self._memory) > 1:
            cid, state = self._memory.popitem(last=False)
            self._sizes.pop(cid)
            # a new file replaces the name, never rewrites it: a checkpoint may hold a link to the old one
            tmp = self._path(cid).with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self._path(cid))
            self._on_disk.add(cid)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same bytes as ``src`` without reading them into memory."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
