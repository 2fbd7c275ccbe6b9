"""How the global trainable state reaches the clients of FedAvg and GradualDiff.

Down, per client, per round (meta flags are a few bytes in the payload header):

- default: the global trainable state.
- ``comm.down_delta=true``: ``global - held[cid]``, where ``held[cid]`` is the state that client holds. The
  server tracks ``held`` as exactly what the client decoded: it runs the (deterministic) downlink codec on
  the same delta, so a lossy codec never makes the two copies drift, and what a codec drops one round is
  part of the next round's delta (no error accumulates). A client that holds nothing yet (or a state of
  other keys: Fed-SB's switch) gets the full state. Tensors whose delta is exactly zero are not sent.
  The client keeps ``held`` in its store entry; the server keeps its table in ``state_dict`` (resume).
- ``lora.mode=sb`` (Fed-SB, simplified): before round 1 (after the first aggregation of plain LoRA) the
  server freezes the global A and B and the global state becomes the R matrices: with ``lora.sb_init=svd``
  (default) each layer's B A is first re-factored as B' diag(s) A' (orthonormal B', A';
  :func:`~fedtune.models.lora.sb_factorize`) and R starts at diag(s); with ``identity``, A and B are frozen
  as they are and R starts at I. Either way the global model is unchanged. Each
  client receives the frozen factors once, on its first contact after the switch, and keeps them in its
  store entry; from then on only R (r x r per adapted layer) crosses the wire, both ways.
- ``lora.mode=alt``: each message names the factor the round trains (``alt``: B in even rounds, A in odd
  ones, :func:`~fedtune.models.lora.alt_factor`); within :meth:`GlobalDownlink.training` the client trains
  and returns only that factor (and anything else trainable), and the server's :meth:`GlobalDownlink.merged`
  puts the mean of what came back over the global state, the idle factor unchanged: exact, since every
  client trained against the same global idle factor. With ``comm.down_delta`` the idle factor is left out.

``comm.down_delta`` and tensors the server did not change: a client's copy of a tensor is ``held + delta``,
which can differ from the global tensor by a rounding (~1e-9 for a LoRA factor), so its next delta would
be a few ulps, not zero. With a lossless downlink the server therefore numbers each global tensor's
versions (a new version when its values change between broadcasts) and leaves out a tensor whose version
the client already has. With a lossy codec the delta of an unchanged tensor is what the codec dropped,
and it is sent (that is how the copies converge).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.comm.codec import Identity
from fedtune.models.lora import (
    State,
    alt_factor,
    frozen_keys,
    get_trainable_state,
    sb_factorize,
    set_alt_phase,
    set_frozen_state,
    to_sb,
)
from fedtune.strategies.aggregate import add_scaled

if TYPE_CHECKING:
    from fedtune.strategies.base import ServerContext

SB_WARMUP_ROUNDS = 1  # rounds of plain LoRA before Fed-SB freezes A and B
_R_KEY = re.compile(r"(.*)\.lora_B\.[^.]+\.R\.weight")  # Fed-SB's R -> the prefix of its layer's A and B keys


class GlobalDownlink:
    """Mixin (before :class:`~fedtune.strategies.base.Strategy`): :meth:`send_global` makes ``broadcast``'s
    messages (the global state, whole or as deltas), and :meth:`received` on the client turns a message back
    into the global state to train from."""

    supports_down_delta: ClassVar[bool] = True
    lora_modes: ClassVar[tuple[str, ...]] = ("lora", "ffa", "sb", "alt")
    server: ServerContext | None
    global_state: State
    _held: dict[int, State]  # comm.down_delta: per client, the state it holds (what it decoded)
    _factors: State | None = None  # Fed-SB after the switch: the frozen A and B as the server sends them
    _has_factors: set[int]  # Fed-SB: clients that received the frozen factors
    # comm.down_delta, lossless downlink: each global tensor's version (a new one when its values change
    # between broadcasts), the global state at the last broadcast, and the versions each client holds
    _versions: dict[str, int]
    _last_global: State
    _synced: dict[int, dict[str, int]]

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)  # type: ignore[misc]  # Strategy.setup, next in the MRO
        self._held, self._factors, self._has_factors = {}, None, set()
        self._versions, self._last_global, self._synced = {}, {}, {}

    # ---- server
    def send_global(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        """Server (``broadcast``): each client's message carrying the global state."""
        # (a server context of a unit test may lack the exchange settings: their defaults then)
        if getattr(self.server, "lora_mode", "lora") == "sb" and self._factors is None and round_idx >= SB_WARMUP_ROUNDS:
            self._switch_to_sb()
        alt = alt_factor(round_idx) if getattr(self.server, "lora_mode", "lora") == "alt" else None
        if getattr(self.server, "down_delta", False) and isinstance(getattr(self.server, "down_codec", None),
                                                                      Identity | None):  # lossless
            self._new_versions()
        return {cid: self._message(cid, alt=alt) for cid in client_ids}

    def _new_versions(self) -> None:
        """A new version of each global tensor whose values changed since the last broadcast."""
        for k, t in self.global_state.items():
            last = self._last_global.get(k)
            if last is None or last.shape != t.shape or last.dtype != t.dtype or not torch.equal(last, t):
                self._versions[k] = self._versions.get(k, 0) + 1
                self._last_global[k] = t.detach().clone()

    def merged(self, update: State) -> State:
        """The new global state from the mean of a round's updates (states, or the deltas already added to
        the global entries they cover): the update itself, or under ``lora.mode=alt`` the global state with
        the entries the round trained replaced (the idle factor stays as it was)."""
        if getattr(self.server, "lora_mode", "lora") != "alt":
            assert update.keys() == self.global_state.keys(), sorted(update.keys() ^ self.global_state.keys())[:5]
            return update
        assert update.keys() <= self.global_state.keys(), sorted(update.keys() - self.global_state.keys())[:5]
        return {**self.global_state, **update}

    def _message(self, cid: int, *, alt: str | None = None) -> Message:
        tensors, meta = self.global_state, dict[str, Any]()
        if alt is not None:
            meta["alt"] = alt
        if getattr(self.server, "down_delta", False):
            held = self._held.get(cid)
            synced = self._synced.setdefault(cid, {})
            if held is not None and held.keys() == tensors.keys():
                delta = {k: t - held[k] for k, t in tensors.items()
                         if synced.get(k, -1) != self._versions.get(k)}  # (a version the client has: not sent)
                tensors = {k: d for k, d in delta.items() if bool(d.any())}  # unchanged tensors: nothing to send
                self._held[cid] = {**held, **add_scaled({k: held[k] for k in tensors}, self._as_received(tensors), 1.0)}
                meta["down"] = "delta"
            else:
                self._held[cid] = self._as_received(tensors)
                meta["down"] = "full"
            synced.update(self._versions)
        if self._factors is not None:
            meta["sb"] = 1
            if cid not in self._has_factors:
                self._has_factors.add(cid)
                tensors = {**self._factors, **tensors}
        return Message(tensors=tensors, meta=meta)

    def _as_received(self, tensors: State) -> State:
        """What a client decodes from ``tensors`` sent down (the channel's codec round trip, serialization
        being lossless): the codec is deterministic and works tensor by tensor."""
        codec = getattr(self.server, "down_codec", None)
        if codec is None or not tensors:
            return {k: t.detach().clone() for k, t in tensors.items()}
        encoded, meta = codec.encode(dict(tensors))
        decoded = codec.decode(dict(encoded), json.loads(json.dumps(meta)))
        return {k: t.detach().clone() for k, t in decoded.items()}

    def _switch_to_sb(self) -> None:
        """Freeze the global A and B (as clients will decode them; re-factored by SVD under
        ``lora.sb_init=svd``) into the server's model; the global state becomes each adapted layer's R (I, or
        the singular values), so the model's outputs do not change."""
        assert self.server is not None
        model = self.server.model
        to_sb(model)  # type: ignore[arg-type]  # the resident model is a PeftModel under lora.mode=sb
        keys = frozen_keys(model)
        factors = {k: self.global_state[k] for k in sorted(keys)}
        trainable = get_trainable_state(model)
        start = {k: torch.eye(v.shape[0], dtype=v.dtype) for k, v in trainable.items() if _R_KEY.fullmatch(k)}
        if getattr(self.server, "sb_init", "svd") == "svd":
            for rk in start:
                prefix = _R_KEY.fullmatch(rk).group(1)  # type: ignore[union-attr]  # start's keys all match
                ak, bk = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
                factors[ak], factors[bk], start[rk] = sb_factorize(factors[ak], factors[bk])
        self._factors = factors
        set_frozen_state(model, self._as_received(factors))
        rest = {k: v for k, v in self.global_state.items() if k not in keys}
        self.global_state = {k: rest[k] if k in rest else start[k] for k in trainable}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # type: ignore[misc]
        return {**out, "down_held": self._held, "sb_factors": self._factors, "sb_has_factors": sorted(self._has_factors),
                "down_versions": self._versions, "down_last_global": self._last_global, "down_synced": self._synced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        self._held = state.get("down_held", {})
        self._factors = state.get("sb_factors")
        self._has_factors = set(state.get("sb_has_factors", []))
        self._versions = dict(state.get("down_versions", {}))
        self._last_global = dict(state.get("down_last_global", {}))
        self._synced = {int(c): dict(v) for c, v in state.get("down_synced", {}).items()}
        if self._factors is not None and self.server is not None:  # the server's model, as it was at the switch
            to_sb(self.server.model)  # type: ignore[arg-type]
            set_frozen_state(self.server.model, self._as_received(self._factors))

    # ---- client
    @contextmanager
    def training(self, client: ClientContext, message: Message) -> Iterator[None]:
        """Client, around training and reading back the trained state: under ``lora.mode=alt`` only the
        factor ``message`` names is trainable (and in the trainable state); both again on the way out."""
        factor = message.meta.get("alt")
        if factor is None:
            yield
            return
        set_alt_phase(client.model, str(factor))
        try:
            yield
        finally:
            set_alt_phase(client.model, None)

    def received(self, client: ClientContext, message: Message) -> Message:
        """Client: the global state (as this client holds it) from what came down; keeps what it must."""
        tensors = dict(message.tensors)
        if message.meta.get("sb"):  # Fed-SB: this process's model carries R, with this client's frozen factors
            to_sb(client.model)  # type: ignore[arg-type]
            factors = {k: tensors.pop(k) for k in frozen_keys(client.model) if k in tensors}
            if factors:
                client.state["sb_factors"] = factors
            set_frozen_state(client.model, client.state["sb_factors"])
        down = message.meta.get("down")
        if down == "delta":
            held = client.state["down_held"]
            tensors = {**held, **add_scaled({k: held[k] for k in tensors}, tensors, 1.0)}
        if down is not None:
            client.state["down_held"] = tensors
        return Message(tensors=tensors, meta=message.meta, pool=message.pool)
