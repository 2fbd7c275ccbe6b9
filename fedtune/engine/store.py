"""Per-client state (a persistent adapter, optimizer moments, error-feedback residuals ...).

Kept in memory up to ``max_memory_bytes``; beyond that the least recently used entries spill to
``spill_dir`` and come back on access. Memory therefore grows with what clients keep, not with
the number of clients times a model.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class ClientStore:
    """``client_id -> dict`` with LRU spill to disk."""

    def __init__(self, *, max_memory_bytes: int | None = None, spill_dir: str | Path | None = None) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._memory: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._on_disk: set[int] = set()

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
        self._sizes[client_id] = _nbytes(state)
        self._spill()

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Every client's state (loads spilled entries): for checkpoints."""
        return {cid: self.get(cid) for cid in self.ids()}

    def load_state_dict(self, states: dict[int, dict[str, Any]]) -> None:
        for cid, state in states.items():
            self.put(int(cid), state)

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
            torch.save(state, self._path(cid))
            self._on_disk.add(cid)
