"""The zero-copy merge (issue 19): the training file is the run's checkpoints laid end to end plus one new footer.

A Parquet file may hold bytes no footer points at. When every checkpoint is aligned to the run's grid (the
extract LEFT-JOINed it onto the targets' keys: exactly the targets' rows, in their order, in row groups of the same
sizes), row group i of the training file is the key and target column chunks of the targets' row group i followed
by every feature column chunk of each checkpoint's row group i. So the file is

    targets checkpoint | feature checkpoint 1 | ... | feature checkpoint 667 | footer, length, PAR1

whose first four bytes ("PAR1") are the targets checkpoint's own. The merge reads only footers (one tail request
per checkpoint), checks alignment, and encodes the new footer: each column chunk's metadata is kept as encoded
Thrift (bqx.parquet.chunks), renamed by the pipeline's one naming rule (`<layout.prefix_of(table)>_<column>`, as
the stream merge names them) and its offsets shifted by where its checkpoint starts. Every feature checkpoint's
own key column and footer become dead bytes. Page indexes are not carried over: an OffsetIndex holds absolute page
offsets inside the data bytes, which a footer cannot shift (the stream merge drops them too); bloom filters, which
hold no offsets, are kept and their offsets shifted.

In GCS the concatenation is made by compose (32 sources a call, in a tree, in the staging bucket; the footer is
an object of its own), so no checkpoint byte passes through the job; locally (`bqx merge --from`) by appending
the files (copy_file_range). The schema and key-value metadata are the stream merge's: the same file, read back,
is value for value the stream merge's output of the same checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx import layout
from bqx.catalog import GRID_FILE_KEY, GRID_OBJECT_KEY, KEY, Grid, Manifest
from bqx.errors import BadCheckpoint, TerminalError
from bqx.logs import Log
from bqx.merge.plan import CountingWriter, MergeInput, MergeStats, assemble_schema
from bqx.merge.stitch import MAGIC, FileRange, FooterGroup, column_signature, encode_footer, footer_template
from bqx.parquet import thrift
from bqx.parquet.chunks import Chunk
from bqx.parquet.chunks import row_groups as chunks_of
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS
from bqx.parquet.tails import KeptFooter, KeptFooters
from bqx.parquet.thrift import (
    BINARY,
    I64,
    LIST,
    STOP,
    STRUCT,
    fields,
    list_header,
    put_varint,
    skip,
    varint,
    zigzag_varint,
)

log = Log("bqx.merge.compose")

COMPOSE_SOURCES = 32  # GCS: sources per compose call
MAX_COMPONENTS = 1024  # GCS: components of one composite object
FOOTER_THREADS = 16  # footers read at once from an object store (latency-bound)
COMPOSE_THREADS = 8  # compose calls of one tree level at once
# A compose call's timeout (seconds): the client's default is 60 s, and fake-gcs-server took 54 s to compose 2.4 GB
# (docs/LOCAL-GCS.md); GCS itself composes without copying. A call that times out is retried by the job's attempt.
COMPOSE_TIMEOUT = 600
# The output's footer as the stream merge's Stitcher writes it (no page index; the Arrow schema stored).
FOOTER_OPTIONS = {**WRITER_OPTIONS, "write_page_index": False, "store_schema": False}


class TooLarge(TerminalError):
    """A training file larger than this GCS can compose (BQX_COMPOSE_MAX_BYTES); `retry` says how to merge it."""

    def __init__(self, message: str, retry: str) -> None:
        super().__init__(message)
        self.retry = retry


class Misaligned(BadCheckpoint):
    """A checkpoint that is not cut to the run's grid: the compose merge cannot use it (it names the table)."""

    def __init__(self, table: str, reason: str) -> None:
        super().__init__(f"checkpoint of table {table!r} is not aligned to the run's grid: {reason}")
        self.table = table


def keys_digest(keys: np.ndarray) -> str:
    """The grid's keys_sha256 of int64 microsecond keys (little-endian, in order)."""
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ light footer walk
# A checkpoint's footer is walked once, here, rather than parsed by pyarrow and again into Chunk objects (668 footers,
# ~17,000 column chunks: that was most of the merge's time). What the merge needs of a ColumnChunk is where its bytes
# are and, inside them, the few values a move changes (its name, its byte offsets); it is rewritten as the slices
# between those, which is byte for byte what Chunk.prepare(name).at(delta) encodes for pyarrow's footers. A footer
# in any other shape (long field headers, nested columns, encryption, no stored Arrow schema) raises _Slow and is
# read the general way (_general_footer).
_MOVED_OFFSETS = frozenset({9, 10, 11, 14})  # ColumnMetaData: data, index, dictionary page and bloom filter offsets
_DICT_PAGE, _DATA_PAGE = 11, 9


class _Slow(Exception):
    """The footer is not in the shape the light walk reads."""


class Column:
    """One ColumnChunk of a checkpoint, ready to be moved: encode(name, delta) is its ColumnChunk renamed and its
    offsets shifted by `delta`, less page-index fields."""

    __slots__ = ("path", "pieces", "uncompressed", "compressed", "start", "stats")

    def __init__(self, path: str, pieces: list[bytes | int | None], uncompressed: int, compressed: int,
                 start: int, stats: tuple[int, int] | None) -> None:
        self.path, self.pieces = path, pieces  # kept slices; None: the path's value; an int: an offset
        self.uncompressed, self.compressed = uncompressed, compressed
        self.start = start  # where its bytes begin in the checkpoint (dictionary page, else first data page)
        self.stats = stats  # (start, end) of its Statistics struct in the footer, if any

    def encode(self, name: str, delta: int) -> bytes:
        out = []
        for p in self.pieces:
            if p is None:
                b = name.encode()
                out.append(bytes((0x18, len(b))) + b if len(b) < 0x80 else _path_value(b))
            elif p.__class__ is int:
                out.append(zigzag_varint(p + delta))  # type: ignore[operator]
            else:
                out.append(p)  # type: ignore[arg-type]
        return b"".join(out)  # type: ignore[arg-type]


class _Moved(Column):
    """A Column read the general way (bqx.parquet.chunks.Chunk)."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: Chunk) -> None:
        super().__init__(chunk.path, [], chunk.uncompressed, chunk.compressed, chunk.start, None)
        self.chunk = chunk

    def encode(self, name: str, delta: int) -> bytes:
        return self.chunk.prepare(name).at(delta)


def _path_value(name: bytes) -> bytes:
    """path_in_schema's value: a list of one string."""
    out = bytearray([(1 << 4) | BINARY])
    put_varint(out, len(name))
    return bytes(out + name)


def _int(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint (i16/i32/i64) at `pos` and the position after it."""
    n, pos = varint(data, pos)
    return (n >> 1) ^ -(n & 1), pos


def _header(data: bytes, pos: int, last: int) -> tuple[int, int, int]:
    """(field id, wire type, position of the value) of the field header at `pos`; fid 0: the struct's end."""
    head = data[pos]
    t = head & 0x0F
    if t == STOP:
        return 0, STOP, pos + 1
    if not head >> 4:
        raise _Slow("long field header")
    return last + (head >> 4), t, pos + 1


def _column(data: bytes, pos: int, seen: dict[int, list[bytes]]) -> tuple[Column, int]:
    """The ColumnChunk at `pos`, and the position after it. `seen`: values of skipped metadata fields met before
    (by field id; most columns' encoding stats and size statistics are the same bytes)."""
    pieces: list[bytes | int | None] = []
    cut = pos  # where the next kept slice starts
    path = ""
    sizes = [0, 0]
    offsets = {}
    stats = None
    dropped = -1  # where the first field not carried over starts (page index, encryption)
    last = 0
    while True:
        hpos = pos
        fid, t, pos = _header(data, pos, last)
        if not fid:
            break
        if fid > 3:
            if dropped < 0:
                dropped = hpos
            pos = skip(data, pos, t)
        elif dropped >= 0:
            raise _Slow("a kept field after a dropped one")
        elif fid == 3 and t == STRUCT:  # meta_data: the header inlined (~20 fields a chunk, 17k chunks)
            mfid = 0
            while True:
                head = data[pos]
                pos += 1
                mt = head & 0x0F
                if mt == STOP:
                    break
                if not head >> 4:
                    raise _Slow("long field header")
                mfid += head >> 4
                if mt == I64:
                    vstart = pos
                    shift = value = 0
                    while True:
                        b = data[pos]
                        pos += 1
                        value |= (b & 0x7F) << shift
                        if b < 0x80:
                            break
                        shift += 7
                    value = (value >> 1) ^ -(value & 1)
                    if mfid in _MOVED_OFFSETS:
                        pieces.append(data[cut:vstart])
                        pieces.append(value)
                        cut = pos
                        offsets[mfid] = value
                    elif mfid == 6:
                        sizes[0] = value
                    elif mfid == 7:
                        sizes[1] = value
                elif mt == 5:  # i32: type, codec
                    while data[pos] & 0x80:
                        pos += 1
                    pos += 1
                elif mfid == 3 and mt == LIST:  # path_in_schema
                    if data[pos] != 0x18:  # a list of one string: flat schemas only
                        raise _Slow("nested column")
                    n, end = varint(data, pos + 1)
                    path = data[end : end + n].decode()
                    pieces.append(data[cut:pos])
                    pieces.append(None)
                    pos = cut = end + n
                else:
                    # A value met before is skipped by comparing bytes: an encoded Thrift value is self-delimiting,
                    # so bytes that start with a whole value are that value.
                    known = seen.get(mfid)
                    if known is None:
                        known = seen[mfid] = []
                    for v in known:
                        if data.startswith(v, pos):
                            end = pos + len(v)
                            break
                    else:
                        end = _skip_struct(data, pos) if mt == STRUCT else skip(data, pos, mt)
                        if len(known) < 8:
                            known.append(data[pos:end])
                    if mfid == 12 and mt == STRUCT:
                        stats = (pos, end)
                    pos = end
        elif fid == 2 and t == I64:  # file_offset: moved with the chunk when set
            vstart = pos
            value, pos = _int(data, pos)
            if value:
                pieces.append(data[cut:vstart])
                pieces.append(value)
                cut = pos
        else:
            pos = skip(data, pos, t)
        last = fid
    if not path or _DATA_PAGE not in offsets:
        raise _Slow("column chunk without inline metadata")
    pieces.append(data[cut : (dropped if dropped >= 0 else pos - 1)] + b"\x00")
    d = offsets.get(_DICT_PAGE, 0)
    return Column(path, pieces, sizes[0], sizes[1], d if d > 0 else offsets[_DATA_PAGE], stats), pos


def _skip_struct(data: bytes, pos: int) -> int:
    """skip() of a struct whose fields are mostly ints and lists of ints (size statistics), without a call a field."""
    while True:
        head = data[pos]
        pos += 1
        t = head & 0x0F
        if t == STOP:
            return pos
        if not head >> 4:
            _, pos = varint(data, pos)
        if t == I64 or t == 5 or t == 4:  # noqa: PLR1714
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        elif t == LIST and data[pos] & 0x0F in (4, 5, 6) and data[pos] >> 4 != 15:  # a short list of ints
            n = data[pos] >> 4
            pos += 1
            for _ in range(n):
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
        elif t != 1 and t != 2:  # noqa: PLR1714 - booleans live in the header
            pos = skip(data, pos, t)


def _elements(data: bytes, pos: int) -> tuple[list[tuple[str, bytes]], int]:
    """The leaf SchemaElements of a flat schema list at `pos`: (name, its encoded bytes less the name field)."""
    etype, n, pos = list_header(data, pos)
    if etype != STRUCT or not n:
        raise _Slow("no schema")
    out = []
    for i in range(n):
        start, last, name, cut = pos, 0, None, (pos, pos)
        while True:
            hpos = pos
            fid, t, pos = _header(data, pos, last)
            if not fid:
                break
            if fid == 4 and t == BINARY:
                size, vpos = varint(data, pos)
                name = data[vpos : vpos + size].decode()
                pos = vpos + size
                cut = (hpos, pos)
            elif fid == 5 and i:  # num_children of a leaf: a nested schema
                raise _Slow("nested schema")
            elif t == 5:
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            else:
                pos = skip(data, pos, t)
            last = fid
        if name is None:
            raise _Slow("schema element without a name")
        if i:
            out.append((name, data[start : cut[0]] + data[cut[1] : pos]))
    return out, pos


def _light_footer(src: Source, footer: bytes, got: int) -> Footer:
    data = footer
    pos = last = 0
    elements: list[tuple[str, bytes]] = []
    schema_list = b""
    groups: list[list[Column]] = []
    rows: list[int] = []
    kv: dict[bytes, bytes] = {}
    seen: dict[int, list[bytes]] = {}
    while True:
        fid, t, pos = _header(data, pos, last)
        if not fid:
            break
        if fid == 2 and t == LIST:
            schema_at = pos
            elements, pos = _elements(data, pos)
            schema_list = data[schema_at:pos]
        elif fid == 4 and t == LIST:
            _, n, pos = list_header(data, pos)
            for _ in range(n):
                cols: list[Column] = []
                nrows = glast = 0
                while True:
                    gfid, gt, pos = _header(data, pos, glast)
                    if not gfid:
                        break
                    if gfid == 1 and gt == LIST:
                        _, m, pos = list_header(data, pos)
                        for _ in range(m):
                            c, pos = _column(data, pos, seen)
                            cols.append(c)
                    elif gfid == 3 and gt == I64:
                        nrows, pos = _int(data, pos)
                    else:
                        pos = skip(data, pos, gt)
                    glast = gfid
                groups.append(cols)
                rows.append(nrows)
        elif fid == 5 and t == LIST:
            _, n, pos = list_header(data, pos)
            for _ in range(n):
                item, pos = fields(data, pos)
                pair = {f[0]: thrift.decode_value(f[2], BINARY) for f in item if f[1] == BINARY}
                kv[pair.get(1, b"")] = pair.get(2, b"")
        elif fid in (8, 9):
            raise _Slow("encrypted footer")
        else:
            pos = skip(data, pos, t)
        last = fid
    stored = kv.get(b"ARROW:schema")
    if stored is not None:  # a checkpoint of an earlier version, or another writer's
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(stored)))
    elif elements:
        schema = _schema_of(schema_list)
    else:
        raise _Slow("no schema")
    names = [e[0] for e in elements]
    if schema.names != names:
        raise _Slow("the stored Arrow schema is not the Parquet schema")
    if KEY not in names:
        raise BadCheckpoint(f"{src.table}: no {KEY} column")
    k = names.index(KEY)
    stats: list[tuple[Any, Any] | None] = []
    for cols in groups:
        key = cols[k] if len(cols) > k and cols[k].path == KEY else next((c for c in cols if c.path == KEY), None)
        stats.append(_min_max(data, key.stats) if key is not None and key.stats else None)
    return Footer(src, schema, [e[1] for e in elements], rows, stats, kv.get(GRID_FILE_KEY.encode(), b"").decode(),
                  groups, got, footer)


def _schema_of(schema_list: bytes) -> pa.Schema:
    """The Arrow schema pyarrow reads from a footer's encoded schema list (a checkpoint stores no Arrow schema):
    pyarrow parses a footer holding only that list (version 1, 0 rows, no row groups), ~15 us a table."""
    meta = b"\x15\x02\x19" + schema_list + b"\x16\x00\x19\x0c\x00"
    return pq.ParquetFile(pa.BufferReader(meta + struct.pack("<I", len(meta)) + MAGIC)).schema_arrow


def _min_max(data: bytes, span: tuple[int, int]) -> tuple[int, int] | None:
    """(min, max) of an int64 column's Statistics (min_value/max_value, else the legacy min/max)."""
    st = thrift.decode_struct(data[span[0] : span[1]])
    for lo, hi in ((6, 5), (2, 1)):
        if lo in st and hi in st and len(st[lo][1]) == 8 == len(st[hi][1]):
            return struct.unpack("<q", st[lo][1])[0], struct.unpack("<q", st[hi][1])[0]
    return None


# ------------------------------------------------------------------------------------------------ footers
@dataclass(frozen=True)
class Source:
    """One checkpoint as the compose merge reads it: `read(start, end)` returns its bytes [start, end)."""

    table: str
    prefix: str  # "" for the targets: their columns keep their names
    size: int
    read: Callable[[int, int], bytes]
    tail_guess: int = 0  # bytes of the first tail request (0: the last 8 bytes, then exactly the footer)
    tag: str | None = None  # its object metadata GRID_OBJECT_KEY (None: a local file, which has none)


@dataclass
class Footer:
    """What the compose merge needs of one checkpoint's footer."""

    source: Source
    schema: pa.Schema
    elements: list[bytes]  # per column: its encoded SchemaElement less its name (how its chunks are encoded)
    rows: list[int]  # per row group
    key_stats: list[tuple[Any, Any] | None]  # (min, max) of the key per row group, if recorded
    grid: str  # its GRID_FILE_KEY
    groups: list[list[Column]]
    bytes_read: int
    raw: bytes  # the encoded FileMetaData


def read_footer(src: Source) -> Footer:
    """`src`'s footer, in one tail request when `tail_guess` covers it (else one more for exactly the rest)."""
    n = min(src.size, src.tail_guess or 8)
    tail = src.read(src.size - n, src.size)
    got = len(tail)
    if src.size < 12 or tail[-4:] != MAGIC:
        raise BadCheckpoint(f"{src.table}: not a Parquet file")
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 12 > src.size:
        raise BadCheckpoint(f"{src.table}: footer length {length} exceeds the file ({src.size} bytes)")
    if length + 8 > len(tail):
        more = src.read(src.size - 8 - length, src.size - len(tail))
        got += len(more)
        tail = more + tail
    footer = tail[len(tail) - 8 - length : len(tail) - 8]
    try:
        return _light_footer(src, footer, got)
    except _Slow:
        pass  # not pyarrow's shape: the general (slower) reading below
    except (IndexError, ValueError, UnicodeDecodeError, pa.ArrowInvalid) as exc:
        raise BadCheckpoint(f"{src.table}: unreadable Parquet footer ({exc})") from exc
    return _general_footer(src, footer, got)


def _general_footer(src: Source, footer: bytes, got: int) -> Footer:
    """read_footer through pyarrow and bqx.parquet.chunks: any flat Parquet footer."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(footer + struct.pack("<I", len(footer)) + MAGIC))
        meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadCheckpoint(f"{src.table}: unreadable Parquet footer ({exc})") from exc
    if KEY not in schema.names:
        raise BadCheckpoint(f"{src.table}: no {KEY} column")
    k = schema.get_field_index(KEY)
    stats = []
    for r in range(meta.num_row_groups):
        st = meta.row_group(r).column(k).statistics
        stats.append((st.min_raw, st.max_raw) if st is not None and st.has_min_max else None)
    kv = meta.metadata or {}
    groups: list[list[Column]] = [[_Moved(c) for c in g] for g in chunks_of(footer)]
    return Footer(src, schema, [], [meta.row_group(r).num_rows for r in range(meta.num_row_groups)], stats,
                  kv.get(GRID_FILE_KEY.encode(), b"").decode(), groups, got, footer)


def check_aligned(fp: Footer, grid: Grid, targets: Footer | None = None) -> None:
    """Refuse (Misaligned, naming the table) a checkpoint that is not cut to `grid`: its digests (object and file
    metadata) must be the grid's, its row groups exactly the grid's, its key statistics the targets'."""
    table = fp.source.table
    if fp.source.tag is not None and fp.source.tag != grid.keys_sha256:
        raise Misaligned(table, f"object metadata {GRID_OBJECT_KEY}={fp.source.tag[:16] or '(none)'}..., "
                                f"the grid's is {grid.keys_sha256[:16]}...")
    if fp.grid != grid.keys_sha256:
        raise Misaligned(table, f"Parquet metadata {GRID_FILE_KEY}={fp.grid[:16] or '(none)'}..., "
                                f"the grid's is {grid.keys_sha256[:16]}...")
    if tuple(fp.rows) != grid.row_groups:
        raise Misaligned(table, f"row groups of {_sizes(fp.rows)} rows, the grid's are {_sizes(grid.row_groups)}")
    if fp.schema.field(KEY).type != KEY_TYPE:
        raise Misaligned(table, f"{KEY} is {fp.schema.field(KEY).type}, not {KEY_TYPE}")
    if targets is not None:
        for r, (mine, theirs) in enumerate(zip(fp.key_stats, targets.key_stats, strict=True)):
            if mine is not None and theirs is not None and mine != theirs:
                raise Misaligned(table, f"row group {r} spans keys {_when(mine[0])}..{_when(mine[1])}, the "
                                        f"targets' {_when(theirs[0])}..{_when(theirs[1])}")


def _when(micros: int) -> str:
    return str(np.datetime64(micros, "us"))


def _sizes(rows: Any) -> str:
    rows = list(rows)
    return str(rows) if len(rows) <= 6 else f"[{', '.join(map(str, rows[:5]))}, ... ({len(rows)} groups)]"


# ------------------------------------------------------------------------------------------------ the footer
@dataclass
class Plan:
    """The training file as the concatenation of the checkpoints (in this order) and `tail` (footer, length,
    PAR1)."""

    sources: list[Source]
    tail: bytes
    schema: pa.Schema
    rows: int
    row_groups: int
    bytes_read: int

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sources) + len(self.tail)


def output_schema(targets: pa.Schema, features: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """The stream merge's output schema (bqx.merge.plan.assemble_schema): the key, the targets' columns, then each
    feature table's value columns named `<prefix>_<column>`."""
    return assemble_schema(targets, features)


def plan(targets: Footer, features: list[Footer], grid: Grid, metadata: dict[str, str] | None = None) -> Plan:
    """Check every footer against `grid` and encode the training file's footer."""
    for fp in [targets, *features]:
        check_aligned(fp, grid, targets)
    schema = output_schema(targets.schema, [(f.source.prefix, f.schema) for f in features])
    template = footer_template(schema, FOOTER_OPTIONS)
    _check_encodings(targets, features, schema, template)
    base = targets.source.size
    offsets = []
    for fp in features:
        offsets.append(base)
        base += fp.source.size
    tnames = [KEY, *(n for n in targets.schema.names if n != KEY)]
    groups = []
    for g, rows in enumerate(grid.row_groups):
        if not rows:
            continue
        encoded: list[bytes] = []
        unc = comp = 0
        by_name = dict(zip(targets.schema.names, _in_order(targets, g, BadCheckpoint), strict=True))
        for name in tnames:
            c = by_name[name]
            encoded.append(c.encode(name, 0))
            unc += c.uncompressed
            comp += c.compressed
        for fp, delta in zip(features, offsets, strict=True):
            prefix = fp.source.prefix
            for name, c in zip(fp.schema.names, _in_order(fp, g, Misaligned), strict=True):
                if name == KEY:
                    continue  # the targets' key leads the row group: this one is dead bytes
                encoded.append(c.encode(f"{prefix}_{name}", delta))
                unc += c.uncompressed
                comp += c.compressed
        groups.append(FooterGroup(encoded, rows, by_name[KEY].start, unc, comp))
    footer = encode_footer(template, groups, {"bqx.rows": str(grid.rows), **(metadata or {})})
    return Plan([targets.source, *(f.source for f in features)], footer + struct.pack("<I", len(footer)) + MAGIC,
                schema, grid.rows, len(groups), sum(f.bytes_read for f in [targets, *features]))


def _in_order(fp: Footer, g: int, error: type[BadCheckpoint]) -> list[Column]:
    """Row group `g`'s column chunks of `fp`, in its schema's order (pyarrow writes them so)."""
    cols, names = fp.groups[g], fp.schema.names
    if len(cols) == len(names) and all(c.path == n for c, n in zip(cols, names, strict=True)):
        return cols
    by_path = {c.path: c for c in cols}
    if len(by_path) != len(cols) or set(by_path) != set(names):
        if error is Misaligned:
            raise Misaligned(fp.source.table, f"row group {g}'s column chunks do not match its schema")
        raise BadCheckpoint(f"{fp.source.table}: row group {g}'s column chunks do not match its schema")
    return [by_path[n] for n in names]


def _check_encodings(targets: Footer, features: list[Footer], schema: pa.Schema,
                     template: dict[int, tuple[int, bytes]]) -> None:
    """Each table's encoded chunks must be exactly what the output's schema declares for these columns. Their
    schema elements (less the names) equal to the output's say so at once; a table whose elements differ (another
    writer) is compared the general way, by column_signature."""
    expected = [e for _, e in _elements(template[2][1], 0)[0]] if 2 in template else []
    at = 1 + sum(1 for n in targets.schema.names if n != KEY)
    mine, nxt = [], 1  # where each of the targets' columns is in the output (the key first)
    for n in targets.schema.names:
        mine.append(0 if n == KEY else nxt)
        nxt += n != KEY
    spans = [(targets, targets.elements, [expected[i] for i in mine] if expected else [])]
    for fp in features:
        n = len(fp.schema) - 1
        spans.append((fp, [e for name, e in zip(fp.schema.names, fp.elements, strict=True) if name != KEY]
                      if fp.elements else [], expected[at : at + n]))
        at += n
    out_signature: dict[str, tuple] | None = None
    for fp, have, want in spans:
        if have and have == want:
            continue
        if out_signature is None:
            out_signature = dict(zip(schema.names, _expected_signatures(schema), strict=True))
        pschema = pq.ParquetFile(pa.BufferReader(fp.raw + struct.pack("<I", len(fp.raw)) + MAGIC)).schema
        for i, name in enumerate(fp.schema.names):
            if fp.source.prefix and name == KEY:
                continue  # not carried over
            out = f"{fp.source.prefix}_{name}" if fp.source.prefix else name
            sig = column_signature(pschema, i)
            if out_signature[out] != sig:
                raise Misaligned(fp.source.table, f"column {name} is encoded as {sig}, the output declares "
                                                  f"{out_signature[out]}")


_SIGNATURES: dict[tuple, tuple] = {}


def _expected_signatures(schema: pa.Schema) -> list[tuple]:
    """column_signature of each column as the output's writer declares it (by type: names change nothing)."""
    todo = {(f.type, f.nullable) for f in schema} - _SIGNATURES.keys()
    if todo:
        probe = pa.schema([pa.field(f"c{i}", t, n) for i, (t, n) in enumerate(sorted(todo, key=str))])
        buf = pa.BufferOutputStream()
        pq.write_table(probe.empty_table(), buf, **FOOTER_OPTIONS)  # type: ignore[arg-type]
        ps = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
        for i, tn in enumerate(sorted(todo, key=str)):
            _SIGNATURES[tn] = column_signature(ps, i)
    return [_SIGNATURES[(f.type, f.nullable)] for f in schema]


def _footers(sources: list[Source], threads: int, progress: Callable[[int, int], None] | None = None
             ) -> list[Footer]:
    done = [0]

    def one(src: Source) -> Footer:
        fp = read_footer(src)
        done[0] += 1
        if progress:
            progress(done[0], len(sources))
        return fp

    if threads <= 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(threads, thread_name_prefix="compose-footers") as pool:
        return list(pool.map(one, sources))


def _stats(p: Plan, started: float) -> MergeStats:
    return MergeStats(rows=p.rows, columns=len(p.schema), tables=len(p.sources), row_groups=p.row_groups,
                      bytes=p.size, seconds=time.time() - started, group_rows=max(p.rows // max(p.row_groups, 1), 1),
                      copied_tables=len(p.sources), bytes_read=p.bytes_read)


# ------------------------------------------------------------------------------------------------ local files
def local_source(inp: MergeInput) -> Source:
    path = inp.open()
    if not isinstance(path, str | os.PathLike):
        raise TerminalError(f"{inp.table}: the local compose merge needs a file path")
    size = os.path.getsize(path)

    def read(start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    return Source(inp.table, inp.prefix, size, read)


def local_grid(targets: MergeInput) -> Grid | None:
    """The grid a local targets file is cut to: its row groups, and the digest it carries when that is the digest
    of its keys (which it reads: the key column only). None: the file names no grid, or one it does not hold."""
    pf = pq.ParquetFile(os.fspath(targets.open()))  # type: ignore[arg-type]
    try:
        tag = (pf.metadata.metadata or {}).get(GRID_FILE_KEY.encode(), b"").decode()
        if not tag or not pf.metadata.num_rows or KEY not in pf.schema_arrow.names:
            return None
        keys = pf.read(columns=[KEY]).column(KEY)
        if keys.null_count or keys.type != KEY_TYPE:
            return None
        if keys_digest(keys.cast(pa.int64()).to_numpy()) != tag:
            return None
        return Grid(pf.metadata.num_rows, tuple(pf.metadata.row_group(r).num_rows
                                                for r in range(pf.metadata.num_row_groups)), tag)
    finally:
        pf.close()


def local_aligned(targets: MergeInput, features: list[MergeInput]) -> Grid | None:
    """The grid, when the targets file holds one and every feature file names it (their file metadata, read from
    the footers); else None (the stream merge)."""
    grid = local_grid(targets)
    if grid is None:
        return None
    for inp in features:
        md = pq.read_metadata(os.fspath(inp.open()))  # type: ignore[arg-type]
        if (md.metadata or {}).get(GRID_FILE_KEY.encode(), b"").decode() != grid.keys_sha256:
            return None
    return grid


def merge_local(targets: MergeInput, features: list[MergeInput], sink: BinaryIO, grid: Grid,
                metadata: dict[str, str] | None = None,
                progress: Callable[[int, int], None] | None = None) -> MergeStats:
    """The compose merge of local checkpoint files into `sink`: the files appended as they are (copy_file_range
    between two local files), then the new footer."""
    started = time.time()
    sources = [local_source(i) for i in [targets, *features]]
    fps = _footers(sources, 1)
    p = plan(fps[0], fps[1:], grid, metadata)
    out = CountingWriter(sink)
    for i, src in enumerate(p.sources):
        with open(os.fspath([targets, *features][i].open()), "rb") as f:  # type: ignore[arg-type]
            if os.fstat(f.fileno()).st_size != src.size:
                raise BadCheckpoint(f"{src.table}: changed while being merged")
            out.copy_range(FileRange(f, 0, src.size))
        if progress:
            progress(i + 1, len(p.sources))
    out.write(p.tail)
    stats = _stats(p, started)
    stats.bytes = out.size
    return stats


# ------------------------------------------------------------------------------------------------ GCS
def tail_guess(columns: list[str], row_groups: int) -> int:
    """Bytes that most likely hold a checkpoint's whole footer (one request): per column its schema element (~4
    bytes and its name) and its ColumnChunk in each row group (~58 and its name). A footer longer than this costs
    one more request for exactly the rest (a checkpoint of an earlier version, which stored an Arrow schema, always
    does); a shorter one reads bytes of data for nothing. Fitted to the extract's checkpoints: at 2,000 rows (one
    row group) all 668 footers in one request, 5.8 % more bytes than the footers; at 100,000 rows (two) 3.1 %."""
    return int(350 + sum(4 + 58 * row_groups + (row_groups + 1) * len(c) for c in columns))


def object_grid_tag(blob: Any) -> str:
    return (blob.metadata or {}).get(GRID_OBJECT_KEY, "") if blob is not None else ""


def aligned_run(manifest: Manifest, blobs: dict[str, Any]) -> str:
    """Why the run's checkpoints cannot be composed ("" if they can): the manifest has no grid, or a checkpoint
    (listed in `blobs`, name -> blob) does not carry the grid's digest."""
    if manifest.grid is None:
        return "the manifest has no grid (an unaligned run)"
    if not manifest.grid.rows:
        return "the grid has no rows"
    for t in manifest.tables:
        tag = object_grid_tag(blobs.get(t.checkpoint))
        if tag != manifest.grid.keys_sha256:
            return f"checkpoint of table {t.name!r} is not aligned ({GRID_OBJECT_KEY}={tag[:16] or '(none)'})"
    return ""


def gcs_sources(settings: Any, manifest: Manifest, blobs: dict[str, Any],
                kept: KeptFooters | None = None) -> tuple[list[Source], set[str]]:
    """The run's checkpoints (targets first, then the features in manifest order), each pinned to the generation
    it was listed with, and the tables whose footer is in `kept` (the extract's footer indexes): those whose listed
    size and crc32c are the kept entry's are read from it, the others from the object."""
    from bqx.gcp import storage
    from bqx.gcp.objectfile import download

    bucket = storage.bucket(settings, settings.staging_bucket)
    groups = len(manifest.grid.row_groups) if manifest.grid else 1
    out, from_index = [], set()
    for t in [manifest.targets, *manifest.features]:
        b = blobs[t.checkpoint]
        size = int(b.size or 0)
        pinned = bucket.blob(t.checkpoint, generation=int(b.generation))
        prefix = "" if t.role == "targets" else layout.prefix_of(manifest.pair, t.name)
        read: Callable[[int, int], bytes] = lambda s, e, blob=pinned: download(blob, s, e)  # noqa: E731
        guess = tail_guess([c.name for c in t.columns], groups)
        k = kept.find(t.checkpoint, size, b.crc32c) if kept is not None else None
        if k is not None:
            read, guess = _kept_tail(k, read), len(k.tail)
            from_index.add(t.name)
        out.append(Source(t.name, prefix, size, read, guess, object_grid_tag(b)))
    return out, from_index


def _kept_tail(kept: KeptFooter, read: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    """`read`, but the object's last bytes come from its kept footer."""
    start = kept.size - len(kept.tail)

    def serve(s: int, e: int) -> bytes:
        return kept.tail[s - start : e - start] if s >= start else read(s, e)

    return serve


@dataclass
class Composed:
    stats: MergeStats
    blob: Any  # the composed training file (staging bucket), to be published
    plan: Plan


def merge_gcs(settings: Any, manifest: Manifest, blobs: dict[str, Any], metadata: dict[str, str] | None = None,
              progress: Callable[..., None] | None = None) -> Composed:
    """Compose the run's training file in the staging bucket (layout.compose_output); nothing is published here.
    `blobs`: the run's checkpoints as listed (name -> blob with size, generation, metadata). `progress(done, total,
    step=...)` hears of footers read (from the extract's footer indexes where they match, else from the objects),
    then of compose calls made."""
    from bqx import footer_index
    from bqx.gcp import storage

    started = time.time()
    grid = manifest.grid
    if grid is None:
        raise TerminalError(f"run {manifest.run_id} has no grid: its checkpoints cannot be composed")
    pair, run_id = manifest.pair, manifest.run_id
    kept, index_bytes = footer_index.load(settings, pair, run_id)
    sources, from_index = gcs_sources(settings, manifest, blobs, kept)
    for src in sources:  # cheap checks first: a checkpoint that says it is not aligned is refused before reading
        if src.tag != grid.keys_sha256:
            raise Misaligned(src.table, f"object metadata {GRID_OBJECT_KEY}={(src.tag or '(none)')[:16]}, the "
                                        f"grid's is {grid.keys_sha256[:16]}...")
    total = sum(src.size for src in sources)
    if settings.compose_max_bytes and total > settings.compose_max_bytes:
        where = f"{settings.staging_bucket}/{layout.checkpoints_prefix(pair, run_id)}"
        raise TooLarge(
            f"run {run_id}: the training file would be {total / 1e9:.1f} GB, more than BQX_COMPOSE_MAX_BYTES="
            f"{settings.compose_max_bytes / 1e9:.1f} GB, what this GCS can compose (the local stack's fake-gcs-server "
            f"holds a composed object whole in memory, ~2.3x its size: docs/LOCAL-GCS.md). Its checkpoints are "
            f"gs://{where} (the local stack keeps objects as files under $BQX_HOME/gcs/<bucket>/): merge them with "
            f"`bqx merge --from DIR --to FILE`",
            retry=f"bqx merge --from $BQX_HOME/gcs/{where} --to training_{pair}.parquet  (local stack; "
                  f"elsewhere: gcloud storage cp -r gs://{where} DIR first)")
    components = sum(int(getattr(blobs[t.checkpoint], "component_count", None) or 1) for t in manifest.tables) + 1
    if components > MAX_COMPONENTS:
        raise TerminalError(f"run {run_id}: {components} components, over GCS's {MAX_COMPONENTS} for one object")
    fps = _footers(sources, FOOTER_THREADS, (lambda d, t: progress(d, t, step="footers read")) if progress else None)
    read_at = time.time()
    p = plan(fps[0], fps[1:], grid, metadata)
    planned_at = time.time()
    bucket = storage.bucket(settings, settings.staging_bucket)
    footer = bucket.blob(layout.compose_footer(pair, run_id))
    footer.upload_from_string(p.tail, content_type="application/octet-stream")
    parts: list[str] = []
    try:
        srcs = [bucket.blob(t.checkpoint, generation=int(blobs[t.checkpoint].generation))
                for t in [manifest.targets, *manifest.features]]
        srcs.append(bucket.blob(footer.name, generation=int(footer.generation)))
        calls = compose_calls(len(srcs))
        out = compose_tree(bucket, srcs, layout.compose_output(pair, run_id),
                           lambda level, i: layout.compose_part(pair, run_id, level, i), parts,
                           on_call=(lambda d: progress(d, calls, step="compose calls")) if progress else None)
    finally:
        delete_quietly(bucket, [*parts, footer.name])
    if int(out.size) != p.size:
        raise BadCheckpoint(f"composed {out.name} has {out.size} bytes, the plan {p.size}")
    stats = _stats(p, started)
    # what was read: the footer indexes, and the tails of the checkpoints they did not cover
    stats.bytes_read = index_bytes + sum(fp.bytes_read for fp in fps if fp.source.table not in from_index)
    stats.footers_indexed = len(from_index)
    log.info("training file composed", pair=pair, run_id=run_id, sources=len(srcs), parts=len(parts),
             bytes=p.size, bytes_read=stats.bytes_read, footers_indexed=len(from_index),
             seconds=round(stats.seconds, 2),
             footers_seconds=round(read_at - started, 2), plan_seconds=round(planned_at - read_at, 2),
             compose_seconds=round(time.time() - planned_at, 2))
    return Composed(stats, out, p)


def compose_calls(sources: int, fan_in: int = COMPOSE_SOURCES) -> int:
    """How many compose calls compose_tree makes for `sources` objects."""
    calls = 0
    while sources > fan_in:
        sources = -(-sources // fan_in)
        calls += sources
    return calls + 1


def compose_tree(bucket: Any, sources: list[Any], name: str, part_name: Callable[[int, int], str],
                 parts: list[str], fan_in: int = COMPOSE_SOURCES,
                 on_call: Callable[[int], None] | None = None) -> Any:
    """Compose `sources` (blobs, in order) into object `name`: at most `fan_in` sources a call, so in a tree whose
    intermediate objects (named by part_name(level, index)) are appended to `parts` for the caller to delete.
    `on_call(n)`: n compose calls done so far."""
    level = 0
    made = [0]
    lock = threading.Lock()

    def called() -> None:
        with lock:
            made[0] += 1
            n = made[0]
        if on_call:
            on_call(n)

    while len(sources) > fan_in:
        level += 1
        batches = [sources[i : i + fan_in] for i in range(0, len(sources), fan_in)]
        names = [part_name(level, i) for i in range(len(batches))]
        parts.extend(names)

        def one(job: tuple[str, list[Any]]) -> Any:
            dest = bucket.blob(job[0])
            dest.content_type = "application/octet-stream"
            dest.compose(job[1], timeout=COMPOSE_TIMEOUT)
            called()
            return bucket.blob(dest.name, generation=int(dest.generation))

        with ThreadPoolExecutor(min(COMPOSE_THREADS, len(batches)), thread_name_prefix="compose") as pool:
            sources = list(pool.map(one, zip(names, batches, strict=True)))
    dest = bucket.blob(name)
    dest.content_type = "application/vnd.apache.parquet"
    dest.compose(sources, timeout=COMPOSE_TIMEOUT)
    called()
    return dest


def delete_quietly(bucket: Any, names: list[str]) -> None:
    """Best effort: what is left is cleaned up by the next attempt (cleanup) or is harmless staging data."""
    from google.api_core import exceptions as gexc

    for n in names:
        try:
            bucket.blob(n).delete()
        except gexc.NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            log.warning(f"could not delete {n}: {exc}")


def cleanup(settings: Any, pair: str, run_id: str) -> list[str]:
    """Delete everything the compose merge left for the run (after publishing, or a killed attempt's leftovers)."""
    from bqx.gcp import storage

    names = sorted(storage.list_names(settings, settings.staging_bucket, layout.compose_prefix(pair, run_id)))
    delete_quietly(storage.bucket(settings, settings.staging_bucket), names)
    return names

