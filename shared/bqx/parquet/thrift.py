"""Just enough of Thrift's compact protocol to read, edit and write Parquet footers.

Structs decode to `{field_id: (type, value)}`; lists to `(element_type, [values])`. Encoding a struct is
context-free, so encoded structs can be kept as bytes and spliced into a list later (`Raw`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)

Struct = dict[int, tuple[int, Any]]


@dataclass(frozen=True)
class Raw:
    """An already-encoded struct, written as is."""

    data: bytes


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


class Reader:
    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def value(self, ttype: int) -> Any:
        if ttype in (TRUE, FALSE):  # only reached for list elements: one byte each
            return self.byte() == TRUE
        if ttype == BYTE:
            return struct.unpack("b", bytes([self.byte()]))[0]
        if ttype in (I16, I32, I64):
            return unzigzag(self.varint())
        if ttype == DOUBLE:
            v = struct.unpack_from("<d", self.data, self.pos)[0]
            self.pos += 8
            return v
        if ttype == BINARY:
            n = self.varint()
            v = bytes(self.data[self.pos : self.pos + n])
            self.pos += n
            return v
        if ttype in (LIST, SET):
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return (etype, [self.value(etype) for _ in range(size)])
        if ttype == MAP:
            size = self.varint()
            if size == 0:
                return (0, 0, [])
            kv = self.byte()
            kt, vt = kv >> 4, kv & 0x0F
            return (kt, vt, [(self.value(kt), self.value(vt)) for _ in range(size)])
        if ttype == STRUCT:
            return self.struct()
        raise ValueError(f"unknown thrift type {ttype}")

    def struct(self) -> Struct:
        fields: Struct = {}
        last = 0
        while True:
            head = self.byte()
            ttype = head & 0x0F
            if ttype == STOP:
                return fields
            delta = head >> 4
            fid = last + delta if delta else unzigzag(self.varint())
            if ttype in (TRUE, FALSE):
                fields[fid] = (TRUE, ttype == TRUE)
            else:
                fields[fid] = (ttype, self.value(ttype))
            last = fid


def put_varint(out: bytearray, n: int) -> None:
    """Append unsigned `n` as a varint."""
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def put_field_header(out: bytearray, fid: int, last: int, wire: int) -> None:
    """Append a struct field's header: short form (a delta from the previous field id `last`) when it fits."""
    delta = fid - last
    if 0 < delta <= 15:
        out.append((delta << 4) | wire)
    else:
        out.append(wire)
        put_varint(out, zigzag(fid))  # field ids are zigzag i16 varints


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


def decode_struct(data: bytes | memoryview) -> Struct:
    return Reader(data).struct()


def encode_struct(fields: Struct) -> bytes:
    w = Writer()
    w.struct(fields)
    return bytes(w.out)
