"""Thrift's compact protocol, as much as Parquet footers need: one codec and one struct walker.

- The walker, `fields(data, pos)`, returns a struct's fields as (field id, wire type, encoded value) without
  decoding them; `skip` steps over any value. Everything that reads a footer (column chunks, footers, the generic
  decoder below) walks structs with it, so there is one reading of field headers and varints.
- `encode_fields` writes such fields back; `put_varint` / `put_field_header` are the encoder's pieces.
- `decode_struct` / `Writer` turn a struct into `{field_id: (type, value)}` (lists as `(element_type, [values])`)
  and back: for small structs that are edited as values (a footer's key-value metadata). Encoding a struct is
  context-free, so encoded structs can be kept as bytes and spliced into a list later (`Raw`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)

Struct = dict[int, tuple[int, Any]]
Field = tuple[int, int, bytes]  # (field id, wire type, encoded value); booleans live in the wire type


@dataclass(frozen=True)
class Raw:
    """An already-encoded struct, written as is."""

    data: bytes


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


# ---------------------------------------------------------------------------------------------- reading


def varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(unsigned value, position after it) of the varint at `pos`."""
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def read_i64(raw: bytes) -> int:
    """An encoded integer field's value."""
    return unzigzag(varint(raw, 0)[0])


def list_header(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """(element type, count, position of the first element) of the list value at `pos`."""
    head = data[pos]
    pos += 1
    size, etype = head >> 4, head & 0x0F
    if size == 15:
        size, pos = varint(data, pos)
    return etype, size, pos


def field_header(data: bytes | memoryview, pos: int, last: int) -> tuple[int, int, int]:
    """(field id, wire type, position of its value) of the field header at `pos`; the type is STOP at a struct's
    end. `last` is the previous field's id (the short form is a delta from it)."""
    head = data[pos]
    pos += 1
    t = head & 0x0F
    if t == STOP:
        return 0, STOP, pos
    if head >> 4:
        return last + (head >> 4), t, pos
    z, pos = varint(data, pos)
    return unzigzag(z), t, pos


def skip(data: bytes | memoryview, pos: int, ttype: int) -> int:
    """Position just after the value of type `ttype` starting at `pos` (a struct field's value, not its header)."""
    if ttype in (TRUE, FALSE):
        return pos
    if ttype == BYTE:
        return pos + 1
    if ttype in (I16, I32, I64):
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if ttype == DOUBLE:
        return pos + 8
    if ttype == BINARY:
        n, pos = varint(data, pos)
        return pos + n
    if ttype in (LIST, SET):
        etype, size, pos = list_header(data, pos)
        if etype in (TRUE, FALSE):  # list booleans take one byte each
            return pos + size
        if etype == I64 or etype == I32 or etype == I16:  # noqa: PLR1714 - inline: lists of ints are common
            for _ in range(size):
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            return pos
        for _ in range(size):
            pos = skip(data, pos, etype)
        return pos
    if ttype == MAP:
        size, pos = varint(data, pos)
        if not size:
            return pos
        kv = data[pos]
        pos += 1
        for _ in range(size):
            pos = skip(data, skip(data, pos, kv >> 4), kv & 0x0F)
        return pos
    if ttype == STRUCT:
        return fields(data, pos, keep=False)[1]
    raise ValueError(f"unknown thrift type {ttype}")


def fields(data: bytes | memoryview, pos: int, keep: bool = True) -> tuple[list[Field], int]:
    """The walker: the fields of the struct at `pos`, each with its encoded value (a copy: what a caller keeps
    never pins a larger buffer), and the position after the struct. `keep=False` only finds the end."""
    out: list[Field] = []
    last = 0
    while True:
        fid, t, pos = field_header(data, pos, last)
        if t == STOP:
            return out, pos
        # The common scalars inline (this loop is most of what a wide footer costs); the rest through skip().
        if t == I64 or t == I32 or t == I16:  # noqa: PLR1714 - ints: cheaper than a tuple lookup here
            end = pos
            while data[end] & 0x80:
                end += 1
            end += 1
        elif t == BINARY:
            n, end = varint(data, pos)
            end += n
        else:
            end = skip(data, pos, t)
        if keep:
            out.append((fid, t, bytes(data[pos:end])))
        pos, last = end, fid


def field(data: bytes | memoryview, pos: int, wanted: int) -> tuple[int, int] | None:
    """(wire type, position of its value) of field `wanted` of the struct at `pos`, stepping over the fields
    before it without copying them; None if the struct has no such field."""
    last = 0
    while True:
        fid, t, pos = field_header(data, pos, last)
        if t == STOP:
            return None
        if fid == wanted:
            return t, pos
        pos, last = skip(data, pos, t), fid


def _value(data: bytes | memoryview, pos: int, ttype: int) -> tuple[Any, int]:
    if ttype in (TRUE, FALSE):  # only reached for list elements: one byte each
        return data[pos] == TRUE, pos + 1
    if ttype == BYTE:
        return struct.unpack_from("b", data, pos)[0], pos + 1
    if ttype in (I16, I32, I64):
        n, pos = varint(data, pos)
        return unzigzag(n), pos
    if ttype == DOUBLE:
        return struct.unpack_from("<d", data, pos)[0], pos + 8
    if ttype == BINARY:
        n, pos = varint(data, pos)
        return bytes(data[pos : pos + n]), pos + n
    if ttype in (LIST, SET):
        etype, size, pos = list_header(data, pos)
        items = []
        for _ in range(size):
            v, pos = _value(data, pos, etype)
            items.append(v)
        return (etype, items), pos
    if ttype == MAP:
        size, pos = varint(data, pos)
        if size == 0:
            return (0, 0, []), pos
        kt, vt = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        pairs = []
        for _ in range(size):
            k, pos = _value(data, pos, kt)
            v, pos = _value(data, pos, vt)
            pairs.append((k, v))
        return (kt, vt, pairs), pos
    if ttype == STRUCT:
        found, end = fields(data, pos)
        return {fid: ((TRUE, t == TRUE) if t in (TRUE, FALSE) else (t, _value(raw, 0, t)[0]))
                for fid, t, raw in found}, end
    raise ValueError(f"unknown thrift type {ttype}")


def decode_value(data: bytes | memoryview, ttype: int) -> Any:
    """The value of type `ttype` encoded in `data` (e.g. one of `fields`' encoded values), decoded in full."""
    return _value(data, 0, ttype)[0]


def decode_struct(data: bytes | memoryview) -> Struct:
    return decode_value(data, STRUCT)


# ---------------------------------------------------------------------------------------------- writing


def put_varint(out: bytearray, n: int) -> None:
    """Append unsigned `n` as a varint."""
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def zigzag_varint(n: int) -> bytes:
    out = bytearray()
    put_varint(out, zigzag(n) & 0xFFFFFFFFFFFFFFFF)
    return bytes(out)


def put_field_header(out: bytearray, fid: int, last: int, wire: int) -> None:
    """Append a struct field's header: short form (a delta from the previous field id `last`) when it fits."""
    delta = fid - last
    if 0 < delta <= 15:
        out.append((delta << 4) | wire)
    else:
        out.append(wire)
        put_varint(out, zigzag(fid))  # field ids are zigzag i16 varints


def encode_fields(items: list[Field]) -> bytes:
    """A struct of already-encoded fields (what `fields` returns)."""
    out = bytearray()
    last = 0
    for fid, t, raw in items:
        put_field_header(out, fid, last, t)
        out += raw
        last = fid
    out.append(STOP)
    return bytes(out)


class Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        put_varint(self.out, n)

    def value(self, ttype: int, v: Any) -> None:
        if ttype in (TRUE, FALSE):
            self.out.append(TRUE if v else FALSE)
        elif ttype == BYTE:
            self.out += struct.pack("b", v)
        elif ttype in (I16, I32, I64):
            self.varint(zigzag(v) & 0xFFFFFFFFFFFFFFFF)
        elif ttype == DOUBLE:
            self.out += struct.pack("<d", v)
        elif ttype == BINARY:
            data = v.encode() if isinstance(v, str) else v
            self.varint(len(data))
            self.out += data
        elif ttype in (LIST, SET):
            etype, items = v
            if len(items) < 15:
                self.out.append((len(items) << 4) | etype)
            else:
                self.out.append(0xF0 | etype)
                self.varint(len(items))
            for item in items:
                self.value(etype, item)
        elif ttype == MAP:
            kt, vt, items = v
            self.varint(len(items))
            if items:
                self.out.append((kt << 4) | vt)
                for k, val in items:
                    self.value(kt, k)
                    self.value(vt, val)
        elif ttype == STRUCT:
            if isinstance(v, Raw):
                self.out += v.data
            else:
                self.struct(v)
        else:
            raise ValueError(f"unknown thrift type {ttype}")

    def struct(self, fields: Struct) -> None:
        last = 0
        for fid in sorted(fields):
            ttype, v = fields[fid]
            wire = (TRUE if v else FALSE) if ttype in (TRUE, FALSE) else ttype
            put_field_header(self.out, fid, last, wire)
            if ttype not in (TRUE, FALSE):
                self.value(ttype, v)
            last = fid
        self.out.append(STOP)


def encode_value(ttype: int, v: Any) -> bytes:
    w = Writer()
    w.value(ttype, v)
    return bytes(w.out)


def encode_struct(fields: Struct) -> bytes:
    return encode_value(STRUCT, fields)
