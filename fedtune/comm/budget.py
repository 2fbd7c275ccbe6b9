"""``comm.budget_bytes``: each upload picks the least lossy codec of a ladder whose payload fits a byte budget.

The choice is measured, not estimated: every candidate of ``comm.ladder`` (ordered from least to most
lossy, e.g. ``none, bf16, int8, nf4, int3, int2, sign, topk0.1+int8, ...``) encodes the update and is
serialized exactly as the channel would (the same wire format and entropy coder); the first whose
payload is at most the budget is sent, with its position in the ladder in the codec meta (``@budget``)
so the receiver decodes it with the same rung. When none fits, the last (most compressed) rung is sent.

What the budget bounds: the codec's payload in the steady state of a connection. Two things the
channel also counts are outside it: the compact wire's one-time name table (the first payload of a
connection) and the message's own meta (``num_examples``: a few bytes). The measure is a pure function
of the update, so the client's error feedback (which encodes before the channel does) and the channel
make the same choice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fedtune.comm import wire as compact
from fedtune.comm.channel import serialize
from fedtune.comm.codec import Codec, Tensors
from fedtune.comm.entropy import compress
from fedtune.comm.spec import make_codec
from fedtune.errors import ConfigError

KEY = "@budget"  # the rung sent, in the codec meta (the default ladder is conf/comm/default.yaml's ladder)


def payload_bytes(encoded: Tensors, codec_meta: dict[str, str], *, wire: str, entropy: str) -> int:
    """Bytes of an encoded update as the channel would send it in a connection's steady state
    (compact wire: names and shapes already known to the receiver; empty message meta)."""
    if wire == "compact":
        table = compact.Table()
        compact.encode(encoded, {}, codec_meta, table)  # the first payload teaches the table
        payload = compact.encode(encoded, {}, codec_meta, table)
    else:
        payload = serialize(encoded, {"meta": "{}", "codec": json.dumps(codec_meta, sort_keys=True)})
    return len(compress(payload, entropy))


class Budget:
    """The least lossy rung of ``ladder`` whose payload is at most ``budget_bytes`` (else the last rung)."""

    def __init__(self, ladder: Sequence[str], *, budget_bytes: int, wire: str = "safetensors",
                 entropy: str = "none", seed: int = 0) -> None:
        if budget_bytes < 1:
            raise ConfigError(f"comm.budget_bytes={budget_bytes}: must be a positive number of bytes (or null)")
        if not ladder:
            raise ConfigError("comm.ladder=[]: list at least one codec spec, least lossy first")
        self.rungs: list[Codec] = [make_codec(spec, key="comm.ladder", seed=seed) for spec in ladder]
        self.budget, self.wire, self.entropy = int(budget_bytes), wire, entropy
        self.name = f"budget{self.budget}"

    def choose(self, tensors: Tensors) -> tuple[int, Tensors, dict[str, str]]:
        """(rung, encoded, meta) of the first rung that fits."""
        for rung, codec in enumerate(self.rungs):
            encoded, meta = codec.encode(tensors)
            last = rung == len(self.rungs) - 1
            if last or payload_bytes(encoded, {**meta, KEY: str(rung)}, wire=self.wire,
                                     entropy=self.entropy) <= self.budget:
                return rung, encoded, meta
        raise AssertionError("unreachable: the last rung is always taken")

    def encode(self, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
        rung, encoded, meta = self.choose(tensors)
        assert KEY not in meta, f"a codec uses the budget's meta key {KEY}"
        return encoded, {**meta, KEY: str(rung)}

    def decode(self, tensors: Tensors, meta: dict[str, str]) -> Tensors:
        rung = int(meta[KEY])
        return self.rungs[rung].decode(tensors, {k: v for k, v in meta.items() if k != KEY})
