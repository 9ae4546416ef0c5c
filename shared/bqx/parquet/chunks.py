"""Parquet ColumnChunk metadata kept as encoded Thrift and spliced, not decoded into objects and encoded again.

Moving a column chunk from one Parquet file into another changes four things in its metadata: its byte offsets
(shifted by where it lands), its path_in_schema (the output's column name), and which optional fields travel with
it (page indexes and bloom filters are not copied). Everything else (statistics, encoding stats, size statistics)
is carried over byte for byte. Each field is kept as (field id, wire type, encoded value); only the few that change
are decoded. The wide merge handles ~17,000 column chunks per row group, so this is what its footer costs.
"""

from __future__ import annotations

from bqx.parquet.thrift import (
    BINARY,
    BYTE,
    DOUBLE,
    FALSE,
    I16,
    I32,
    I64,
    LIST,
    MAP,
    SET,
    STOP,
    STRUCT,
    TRUE,
    put_field_header,
    put_varint,
    unzigzag,
    zigzag,
)

Field = tuple[int, int, bytes]  # (field id, wire type, encoded value); booleans live in the wire type

# ColumnChunk fields
CC_FILE_OFFSET, CC_META = 2, 3
CC_KEEP = frozenset({1, 2, 3})  # file_path, file_offset, meta_data: page index / encryption fields are dropped
# ColumnMetaData fields
MD_PATH, MD_UNCOMPRESSED, MD_COMPRESSED = 3, 6, 7
MD_DATA_PAGE, MD_INDEX_PAGE, MD_DICT_PAGE, MD_BLOOM_OFFSET, MD_BLOOM_LENGTH = 9, 10, 11, 14, 15
MD_OFFSETS = (MD_DATA_PAGE, MD_INDEX_PAGE, MD_DICT_PAGE, MD_BLOOM_OFFSET)
MD_NO_BLOOM = frozenset({MD_BLOOM_OFFSET, MD_BLOOM_LENGTH})
# FileMetaData / RowGroup fields
FMD_ROW_GROUPS, RG_COLUMNS = 4, 1


def varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def zigzag_varint(n: int) -> bytes:
    out = bytearray()
    put_varint(out, zigzag(n) & 0xFFFFFFFFFFFFFFFF)
    return bytes(out)


def read_i64(raw: bytes) -> int:
    return unzigzag(varint(raw, 0)[0])


def skip(data: bytes, pos: int, ttype: int) -> int:
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
        etype, size, pos = _list_items(data, pos)
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
        while True:
            head = data[pos]
            pos += 1
            t = head & 0x0F
            if t == STOP:
                return pos
            if not head >> 4:
                _, pos = varint(data, pos)
            if t == I64 or t == I32 or t == I16:  # noqa: PLR1714
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            elif t != TRUE and t != FALSE:  # noqa: PLR1714
                pos = skip(data, pos, t)
    raise ValueError(f"unknown thrift type {ttype}")


def fields(data: bytes, pos: int) -> tuple[list[Field], int]:
    """The fields of the struct at `pos`, each with its encoded value, and the position after the struct."""
    out: list[Field] = []
    last = 0
    while True:
        head = data[pos]
        pos += 1
        t = head & 0x0F
        if t == STOP:
            return out, pos
        fid, pos = _field_id(head, last, data, pos)
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
        out.append((fid, t, data[pos:end]))
        pos, last = end, fid


def encode_fields(items: list[Field]) -> bytes:
    out = bytearray()
    last = 0
    for fid, t, raw in items:
        put_field_header(out, fid, last, t)
        out += raw
        last = fid
    out.append(STOP)
    return bytes(out)


def _list_items(data: bytes, pos: int) -> tuple[int, int, int]:
    """(element type, count, position of the first element) of the list value at `pos`."""
    head = data[pos]
    pos += 1
    size, etype = head >> 4, head & 0x0F
    if size == 15:
        size, pos = varint(data, pos)
    return etype, size, pos


class Chunk:
    """One ColumnChunk: its fields as encoded bytes, with the ones a move changes read out."""

    __slots__ = ("top", "meta", "path", "uncompressed", "compressed", "offsets", "file_offset")

    def __init__(self, top: list[Field], meta: list[Field]) -> None:
        self.top, self.meta = top, meta
        self.offsets: dict[int, int] = {}
        self.path = ""
        self.uncompressed = self.compressed = 0
        for fid, _, raw in meta:
            if fid == MD_PATH:
                etype, n, p = _list_items(raw, 0)
                parts = []
                for _ in range(n):
                    size, p = varint(raw, p)
                    parts.append(raw[p : p + size])
                    p += size
                self.path = b".".join(parts).decode()
            elif fid == MD_UNCOMPRESSED:
                self.uncompressed = read_i64(raw)
            elif fid == MD_COMPRESSED:
                self.compressed = read_i64(raw)
            elif fid in MD_OFFSETS:
                self.offsets[fid] = read_i64(raw)
        self.file_offset = next((read_i64(raw) for fid, _, raw in top if fid == CC_FILE_OFFSET), 0)

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Chunk, int]:
        """The ColumnChunk at `pos` and the position after it; its bytes are walked once."""
        top: list[Field] = []
        meta: list[Field] | None = None
        last = 0
        while True:
            head = data[pos]
            pos += 1
            t = head & 0x0F
            if t == STOP:
                break
            fid, pos = _field_id(head, last, data, pos)
            if fid == CC_META and t == STRUCT:
                meta, end = fields(data, pos)
                top.append((fid, t, b""))  # re-encoded from `meta` by encode()
            else:
                end = skip(data, pos, t)
                top.append((fid, t, data[pos:end]))
            pos, last = end, fid
        if meta is None:
            raise ValueError("column chunk without inline metadata (encrypted or external): cannot be moved")
        return cls(top, meta), pos

    @property
    def start(self) -> int:
        """Where the chunk's bytes begin: its dictionary page if it has one, else its first data page."""
        d = self.offsets.get(MD_DICT_PAGE, 0)
        return d if d > 0 else self.offsets[MD_DATA_PAGE]

    def encode(self, delta: int, name: str | None = None, drop_bloom: bool = False) -> bytes:
        """This chunk's ColumnChunk, moved by `delta` bytes, renamed to `name`, without page-index fields."""
        return self.prepare(name, drop_bloom).at(delta)

    def prepare(self, name: str | None = None, drop_bloom: bool = False) -> Moved:
        """encode()'s bytes with the offsets left open: a worker prepares a chunk, and the writer, which learns
        where it landed, only fills in the offsets (it writes ~17,000 per row group, between copies)."""
        meta: list[tuple[int, int, bytes | int | list]] = []
        for fid, t, raw in self.meta:
            value: bytes | int = raw
            if fid in self.offsets:
                if drop_bloom and fid in MD_NO_BLOOM:
                    continue
                value = self.offsets[fid]
            elif drop_bloom and fid == MD_BLOOM_LENGTH:
                continue
            elif fid == MD_PATH and name is not None:
                b = name.encode()
                path = bytearray([(1 << 4) | BINARY])  # a list of one string
                put_varint(path, len(b))
                value = bytes(path + b)
            meta.append((fid, t, value))
        top: list[tuple[int, int, bytes | int | list]] = []
        for fid, t, raw in self.top:
            if fid not in CC_KEEP:
                continue
            if fid == CC_META:
                top.append((fid, t, meta))
            elif fid == CC_FILE_OFFSET and self.file_offset:
                top.append((fid, t, self.file_offset))
            else:
                top.append((fid, t, raw))
        out = Moved()
        out.put(top)
        return out


class Moved:
    """An encoded ColumnChunk whose byte offsets are still to be shifted: segments around holes, one per offset."""

    __slots__ = ("segments", "offsets")

    def __init__(self) -> None:
        self.segments: list[bytearray] = [bytearray()]
        self.offsets: list[int] = []

    def hole(self, offset: int) -> None:
        self.offsets.append(offset)
        self.segments.append(bytearray())

    def put(self, items: list[tuple[int, int, bytes | int | list]]) -> None:
        """A struct's fields: a value is encoded bytes, an offset (a hole) or a nested struct's fields."""
        last = 0
        for fid, t, value in items:
            put_field_header(self.segments[-1], fid, last, t)
            if isinstance(value, int):
                self.hole(value)
            elif isinstance(value, list):
                self.put(value)
            else:
                self.segments[-1] += value
            last = fid
        self.segments[-1].append(STOP)

    def at(self, delta: int) -> bytes:
        segments = self.segments
        out = [segments[0]]
        for i, offset in enumerate(self.offsets, 1):
            out.append(zigzag_varint(offset + delta))
            out.append(segments[i])
        return b"".join(out)


def row_groups(footer: bytes) -> list[list[Chunk]]:
    """The column chunks of every row group of an encoded FileMetaData (read up to the end of its row groups)."""
    pos = last = 0
    while True:
        head = footer[pos]
        pos += 1
        t = head & 0x0F
        if t == STOP:
            return []
        fid, pos = _field_id(head, last, footer, pos)
        if fid == FMD_ROW_GROUPS and t == LIST:
            _, n, pos = _list_items(footer, pos)
            out = []
            for _ in range(n):
                chunks, pos = _row_group(footer, pos)
                out.append(chunks)
            return out
        pos, last = skip(footer, pos, t), fid


def _row_group(data: bytes, pos: int) -> tuple[list[Chunk], int]:
    chunks: list[Chunk] = []
    last = 0
    while True:
        head = data[pos]
        pos += 1
        t = head & 0x0F
        if t == STOP:
            return chunks, pos
        fid, pos = _field_id(head, last, data, pos)
        if fid == RG_COLUMNS and t == LIST:
            _, m, pos = _list_items(data, pos)
            for _ in range(m):
                c, pos = Chunk.parse(data, pos)
                chunks.append(c)
        else:
            pos = skip(data, pos, t)
        last = fid


def _field_id(head: int, last: int, data: bytes, pos: int) -> tuple[int, int]:
    """(field id, position after it) of the field header byte `head` (short form: a delta from `last`)."""
    if head >> 4:
        return last + (head >> 4), pos
    z, pos = varint(data, pos)
    return unzigzag(z), pos
