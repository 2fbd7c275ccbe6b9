"""The channel: the ONLY place bytes are counted.

Every message that would cross a network goes through :meth:`Channel.send`: its tensors are
encoded by the direction's codec and serialized with safetensors (its small ``meta`` travels in the
safetensors header), ``len(payload)`` is recorded for (round, client, direction, kind), and the
receiver gets a message decoded from those bytes: fresh tensors, never an alias of the sender's.
Each transfer also records the wall-clock seconds the channel spent on it (encode, serialize,
deserialize, decode): the run's ``time/comm_s`` is read from here.

``wire="compact"`` serializes with :mod:`fedtune.comm.wire` instead: a string table per
(client, direction), counted in the payload that first needs each string, then a few bytes a tensor.
That table is the channel's only state (:meth:`Channel.state_dict`, checkpointed so a resumed run
counts the same bytes). ``entropy="zstd"`` compresses either format's payload, and the compressed
length is what is counted. Under the parallel engine every ``send`` runs on rank 0 (a worker's channel
would keep its own tables; no strategy sends from a worker today).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.comm import wire as compact
from fedtune.comm.codec import Codec, Identity
from fedtune.comm.entropy import ENTROPY, compress, decompress
from fedtune.errors import ConfigError

DIRECTIONS = ("up", "down")
WIRES = ("safetensors", "compact")


@dataclass
class Message:
    """What one side sends the other.

    Attributes:
        tensors: named tensors (adapters, deltas, logits, activations ...).
        meta: small JSON-able values that travel with them (e.g. ``num_examples``); counted too.
        pool: simulation routing only, never serialized: when non-empty the receiving client trains
            on the union of these clients' shards (the centralized baseline).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    pool: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not self.tensors and not self.meta


@dataclass(frozen=True)
class Transfer:
    round_idx: int
    client_id: int
    direction: str
    kind: str
    num_bytes: int
    seconds: float = 0.0  # wall clock spent in send(): encode + serialize + deserialize + decode


# dtypes numpy holds: their payload goes through safetensors.numpy, the same bytes as safetensors.torch
# without its per-tensor pointer work (~3-5x faster on a LoRA payload; bf16 and the like take the torch path)
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool})


def serialize(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """safetensors bytes of CPU, contiguous tensors plus a string header."""
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    if all(t.dtype in _NUMPY_DTYPES for t in cpu.values()):
        return np_save({k: t.numpy() for k, t in cpu.items()}, metadata=header)
    return st_save(cpu, metadata=header)


def deserialize(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inverse of :func:`serialize` (fresh tensors)."""
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {})
    return st_load(payload), header


class Channel:
    """Serializes, counts and delivers messages; one codec per direction.

    Args:
        up, down: the codecs (default: none).
        kinds: codecs for some kinds of traffic instead of their direction's (``comm.activations``,
            ``comm.gradients``: split learning's mid-update traffic), e.g. ``{"activations": Cast(fp16)}``.
        wire: ``safetensors`` (a JSON header per payload) or ``compact`` (:mod:`fedtune.comm.wire`).
        entropy: ``none`` or ``zstd`` (:mod:`fedtune.comm.entropy`) on the serialized payload.
    """

    def __init__(self, *, up: Codec | None = None, down: Codec | None = None, wire: str = "safetensors",
                 entropy: str = "none", kinds: dict[str, Codec] | None = None) -> None:
        if wire not in WIRES:
            raise ConfigError(f"comm.wire={wire}: unknown wire format; use {' or '.join(WIRES)}")
        if entropy not in ENTROPY:
            raise ConfigError(f"comm.entropy={entropy}: unknown entropy coder; use {' or '.join(ENTROPY)}")
        self.codecs = {"up": up or Identity(), "down": down or Identity()}
        self.kinds = dict(kinds or {})
        self.wire, self.entropy = wire, entropy
        self.transfers: list[Transfer] = []
        self.tables: dict[tuple[int, str], compact.Table] = {}  # compact wire: the receivers' tables

    def send(self, message: Message, *, round_idx: int, client_id: int, direction: str, kind: str = "model") -> Message:
        """Encode, serialize, count and decode ``message``; returns the receiver's copy."""
        assert direction in DIRECTIONS, direction
        if message.is_empty():  # nothing crosses the network
            return Message(pool=message.pool)
        start = time.perf_counter()
        codec = self.kinds.get(kind) or self.codecs[direction]
        encoded, codec_meta = codec.encode(message.tensors)
        if self.wire == "compact":
            table = self.tables.setdefault((client_id, direction), compact.Table())
            sender = table.copy()  # each end keeps its own copy; the receiver's is the one kept here
            payload = compress(compact.encode(encoded, message.meta, codec_meta, sender), self.entropy)
            tensors, meta, got_codec = compact.decode(decompress(payload, self.entropy), table)
            assert sender == table, "the two ends' string tables diverged"
        else:
            header = {"meta": json.dumps(message.meta, sort_keys=True),
                      "codec": json.dumps(codec_meta, sort_keys=True)}
            payload = compress(serialize(encoded, header), self.entropy)
            tensors, got = deserialize(decompress(payload, self.entropy))
            meta, got_codec = json.loads(got["meta"]), json.loads(got["codec"])
        out = Message(tensors=codec.decode(tensors, got_codec), meta=meta, pool=message.pool)
        self.transfers.append(Transfer(round_idx, client_id, direction, kind, len(payload),
                                       time.perf_counter() - start))
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to count the same bytes: each connection's string table."""
        return {"tables": [[cid, direction, table.state_dict()] for (cid, direction), table in self.tables.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tables = {(int(cid), str(direction)): compact.Table.from_state(table)
                       for cid, direction, table in state["tables"]}

    def seconds(self, round_idx: int, *, kinds: tuple[str, ...] = ("model",)) -> float:
        """Wall-clock seconds this round's transfers of ``kinds`` took in the channel (both directions).
        The default, the model exchange, is ``time/comm_s``; mid-update traffic (split's activations and
        gradients) is part of the update it happens in."""
        return sum(t.seconds for t in self.transfers if t.round_idx == round_idx and t.kind in kinds)

    def bytes_by(self, round_idx: int) -> dict[str, int]:
        """This round's bytes: ``up``, ``down`` and per kind (``up/<kind>``, ``down/<kind>``)."""
        out: dict[str, int] = defaultdict(int)
        for t in self.transfers:
            if t.round_idx == round_idx:
                out[t.direction] += t.num_bytes
                out[f"{t.direction}/{t.kind}"] += t.num_bytes
        out.setdefault("up", 0)
        out.setdefault("down", 0)
        return dict(out)

    def bytes_by_client(self, round_idx: int) -> dict[tuple[int, str], int]:
        """This round's bytes per (client_id, direction)."""
        out: dict[tuple[int, str], int] = defaultdict(int)
        for t in self.transfers:
            if t.round_idx == round_idx:
                out[(t.client_id, t.direction)] += t.num_bytes
        return dict(out)

    def total_bytes(self) -> int:
        return sum(t.num_bytes for t in self.transfers)
