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
    LIST,
    STOP,
    STRUCT,
    Field,
    field,
    fields,
    list_header,
    put_field_header,
    put_varint,
    read_i64,
    skip,
    varint,
    zigzag_varint,
)

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
                etype, n, p = list_header(raw, 0)
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
        """The ColumnChunk at `pos` and the position after it."""
        top, end = fields(data, pos)
        meta = next((fields(raw, 0)[0] for fid, t, raw in top if fid == CC_META and t == STRUCT), None)
        if meta is None:
            raise ValueError("column chunk without inline metadata (encrypted or external): cannot be moved")
        return cls(top, meta), end

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
    found = field(footer, 0, FMD_ROW_GROUPS)
    if found is None or found[0] != LIST:
        return []
    _, n, pos = list_header(footer, found[1])
    out = []
    for _ in range(n):
        columns = field(footer, pos, RG_COLUMNS)
        chunks: list[Chunk] = []
        if columns is not None and columns[0] == LIST:
            _, m, p = list_header(footer, columns[1])
            for _ in range(m):
                c, p = Chunk.parse(footer, p)
                chunks.append(c)
        out.append(chunks)
        pos = skip(footer, pos, STRUCT)
    return out
