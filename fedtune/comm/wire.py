"""The compact wire format (``comm.wire=compact``): a string table per connection, a few bytes a tensor.

The safetensors format repeats a JSON header with every tensor's full name, dtype, shape and offsets
in every payload (~7.3 kB for the default model's 58 LoRA tensors, whose peft names are ~60 characters).
Here each (client, direction) connection keeps a :class:`Table`, the same on both ends: the strings
already sent (tensor names, codec-derived names such as ``w::absmax``, meta keys, recurring meta
words) and the last shape sent under each. A payload only adds the strings new to that connection,
so the table is counted once per connection and run, and again, for the new strings only, whenever
new names appear. Layout (``varint``: unsigned LEB128; ``zigzag``: signed to unsigned first)::

    payload  := strings meta meta tensors            (message meta, then the codec's meta)
    strings  := varint n, n x (varint shared, varint len, len bytes)
                -- UTF-8, sorted, each front-coded against the table's previous string
                   (``shared`` leading bytes of it, then ``len`` new bytes); string i gets id len(table)+i
    meta     := varint 2k, k x (varint key id, value)  |  varint 1, varint len, JSON bytes
                -- keys sorted; the JSON form only when a key is not a string
    tensors  := varint n, n x (varint id, byte code, [varint ndim, ndim x varint dim], raw bytes)
                -- code: dtype index in DTYPES, + 0x80 when the shape equals the last one sent under
                   this id (then no shape follows); raw: numel x itemsize bytes, little-endian, row-major

A value is one tag byte and its data: ``None``/``False``/``True`` (nothing), an int (zigzag varint),
a float (8 bytes, IEEE double), a list or dict (varint len + ``json.dumps(sort_keys=True)``), or a
string, packed by what it looks like: a decimal integer (zigzag varint), a shape ``AxB...`` (varint
ndim, dims), ``A:B`` (the two halves, each packed), a word ending in digits such as ``r1234``
(word id, varint number), a word already in the table or an identifier (its id; added to the table),
anything else (varint len, UTF-8). The receiver gets exactly what a JSON round trip of ``meta``
gives, as the safetensors path delivers it.

Per-tensor header on the default ``tiny`` model (58 tensors of 8x128 / 128x8): 6 bytes the first
time (id, code, ndim, two dims), 2 bytes after, against ~126 bytes of JSON in safetensors.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]

# index = the dtype code on the wire; append only (codes are part of the format)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
          torch.float8_e5m2)
_CODE = {dtype: i for i, dtype in enumerate(DTYPES)}
SAME_SHAPE = 0x80

# value tags
NONE, FALSE, TRUE, INT, FLOAT, JSON, S_INT, S_SHAPE, S_PAIR, S_WORD_INT, S_WORD, S_TEXT = range(12)
_INT = r"-?(?:0|[1-9][0-9]*)"
_DIM = r"(?:0|[1-9][0-9]*)"
_SHAPE = re.compile(rf"{_DIM}(?:x{_DIM})+")
_WORD_INT = re.compile(r"([A-Za-z_]+)(0|[1-9][0-9]*)")
_WORD = re.compile(r"[A-Za-z_@][A-Za-z0-9_@.]{0,63}")

assert sys.byteorder == "little", "raw tensor bytes are written in the host's order, which must be little-endian"


@dataclass
class Table:
    """One connection's shared state: the strings sent so far (id = position) and each id's last shape."""

    strings: list[str] = field(default_factory=list)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids = {s: i for i, s in enumerate(self.strings)}

    def add(self, text: str) -> None:
        self.ids[text] = len(self.strings)
        self.strings.append(text)

    def copy(self) -> Table:
        return Table(list(self.strings), dict(self.shapes))

    def state_dict(self) -> dict[str, Any]:
        return {"strings": list(self.strings), "shapes": {i: list(s) for i, s in self.shapes.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Table:
        return cls(list(state["strings"]), {int(i): tuple(s) for i, s in state["shapes"].items()})


# ---- bytes

def put_varint(out: bytearray, n: int) -> None:
    assert n >= 0, n
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int) -> int:
    return 2 * n if n >= 0 else -2 * n - 1


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data, self.pos = memoryview(data), 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return n

    def signed(self) -> int:
        n = self.varint()
        return n // 2 if n % 2 == 0 else -(n + 1) // 2

    def take(self, n: int) -> memoryview:
        assert self.pos + n <= len(self.data), "truncated payload"
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def text(self) -> str:
        return bytes(self.take(self.varint())).decode()


# ---- strings and values

def _interned(value: Any, table: Table) -> list[str]:
    """The table strings a value is packed with (the choices of :func:`_put_str`, in its order)."""
    if not isinstance(value, str) or _is_int(value) or _SHAPE.fullmatch(value):
        return []
    if value.count(":") == 1:
        return [s for part in value.split(":") for s in _interned(part, table)]
    if m := _WORD_INT.fullmatch(value):
        return [m[1]]
    return [value] if value in table.ids or _WORD.fullmatch(value) else []


def _is_int(s: str) -> bool:
    return re.fullmatch(_INT, s) is not None and s != "-0"


def _put_str(out: bytearray, s: str, table: Table) -> None:
    if _is_int(s):
        out.append(S_INT)
        put_varint(out, _zigzag(int(s)))
    elif _SHAPE.fullmatch(s):
        dims = s.split("x")
        out.append(S_SHAPE)
        put_varint(out, len(dims))
        for d in dims:
            put_varint(out, int(d))
    elif s.count(":") == 1:
        out.append(S_PAIR)
        for part in s.split(":"):
            _put_str(out, part, table)
    elif m := _WORD_INT.fullmatch(s):
        out.append(S_WORD_INT)
        put_varint(out, table.ids[m[1]])
        put_varint(out, int(m[2]))
    elif s in table.ids:
        out.append(S_WORD)
        put_varint(out, table.ids[s])
    else:
        raw = s.encode()
        out.append(S_TEXT)
        put_varint(out, len(raw))
        out += raw


def _put_value(out: bytearray, value: Any, table: Table) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: NONE, False: FALSE, True: TRUE}[value])
    elif isinstance(value, int):
        out.append(INT)
        put_varint(out, _zigzag(value))
    elif isinstance(value, float):
        out.append(FLOAT)
        out += struct.pack("<d", value)
    elif isinstance(value, str):
        _put_str(out, value, table)
    else:  # lists, dicts: what the JSON round trip would deliver
        raw = json.dumps(value, sort_keys=True).encode()
        out.append(JSON)
        put_varint(out, len(raw))
        out += raw


def _get_value(r: _Reader, table: Table) -> Any:
    tag = r.byte()
    if tag in (NONE, FALSE, TRUE):
        return (None, False, True)[tag]
    if tag == INT:
        return r.signed()
    if tag == FLOAT:
        return struct.unpack("<d", r.take(8))[0]
    if tag == JSON:
        return json.loads(r.text())
    if tag == S_INT:
        return str(r.signed())
    if tag == S_SHAPE:
        return "x".join(str(r.varint()) for _ in range(r.varint()))
    if tag == S_PAIR:
        return f"{_get_value(r, table)}:{_get_value(r, table)}"
    if tag == S_WORD_INT:
        return f"{table.strings[r.varint()]}{r.varint()}"
    if tag == S_WORD:
        return table.strings[r.varint()]
    assert tag == S_TEXT, f"unknown value tag {tag}"
    return r.text()


def _put_meta(out: bytearray, meta: dict[str, Any], table: Table) -> None:
    if not all(isinstance(k, str) for k in meta):
        raw = json.dumps(meta, sort_keys=True).encode()
        put_varint(out, 1)
        put_varint(out, len(raw))
        out += raw
        return
    put_varint(out, 2 * len(meta))
    for key in sorted(meta):
        put_varint(out, table.ids[key])
        _put_value(out, meta[key], table)


def _get_meta(r: _Reader, table: Table) -> dict[str, Any]:
    n = r.varint()
    if n == 1:
        return dict(json.loads(r.text()))
    return {table.strings[r.varint()]: _get_value(r, table) for _ in range(n // 2)}


def _put_strings(out: bytearray, new: list[str], table: Table) -> None:
    prev = table.strings[-1].encode() if table.strings else b""
    put_varint(out, len(new))
    for s in new:
        raw = s.encode()
        shared = 0
        limit = min(len(raw), len(prev))
        while shared < limit and raw[shared] == prev[shared]:
            shared += 1
        put_varint(out, shared)
        put_varint(out, len(raw) - shared)
        out += raw[shared:]
        table.add(s)
        prev = raw


def _get_strings(r: _Reader, table: Table) -> None:
    prev = table.strings[-1].encode() if table.strings else b""
    for _ in range(r.varint()):
        shared = r.varint()
        raw = prev[:shared] + bytes(r.take(r.varint()))
        table.add(raw.decode())
        prev = raw


# ---- messages

def encode(tensors: Tensors, meta: dict[str, Any], codec_meta: dict[str, Any], table: Table) -> bytes:
    """The compact payload of one message; ``table`` (the sender's copy) gains the new strings and shapes."""
    needed = list(tensors)
    for m in (meta, codec_meta):
        if all(isinstance(k, str) for k in m):
            needed += list(m)
            needed += [s for v in m.values() for s in _interned(v, table)]
    out = bytearray()
    _put_strings(out, sorted(set(needed) - table.ids.keys()), table)
    _put_meta(out, meta, table)
    _put_meta(out, codec_meta, table)
    put_varint(out, len(tensors))
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ident, shape = table.ids[name], tuple(t.shape)
        put_varint(out, ident)
        if t.dtype not in _CODE:
            raise ValueError(f"{name}: dtype {t.dtype} has no code in the compact wire format")
        same = table.shapes.get(ident) == shape
        out.append(_CODE[t.dtype] | (SAME_SHAPE if same else 0))
        if not same:
            put_varint(out, len(shape))
            for d in shape:
                put_varint(out, d)
            table.shapes[ident] = shape
        out += t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return bytes(out)


def decode(payload: bytes, table: Table) -> tuple[Tensors, dict[str, Any], dict[str, Any]]:
    """Inverse of :func:`encode` with the receiver's ``table`` (updated in place): fresh tensors, both metas."""
    r = _Reader(payload)
    _get_strings(r, table)
    meta, codec_meta = _get_meta(r, table), _get_meta(r, table)
    tensors: Tensors = {}
    for _ in range(r.varint()):
        ident, code = r.varint(), r.byte()
        if code & SAME_SHAPE:
            shape = table.shapes[ident]
        else:
            shape = tuple(r.varint() for _ in range(r.varint()))
            table.shapes[ident] = shape
        dtype = DTYPES[code & ~SAME_SHAPE]
        numel = 1
        for d in shape:
            numel *= d
        raw = r.take(numel * dtype.itemsize)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
        tensors[table.strings[ident]] = flat.view(dtype).reshape(shape)
    assert r.pos == len(payload), f"{len(payload) - r.pos} trailing bytes in the payload"
    return tensors, meta, codec_meta
