"""Assemble one Parquet file from column chunks encoded one table at a time.

Parquet does not require a row group's column chunks to be adjacent: the footer records where each one
starts. So each (table, row group) is encoded on its own as a tiny Parquet file, its column-chunk bytes are
appended to the output as they are, and their metadata (offsets shifted) is kept as encoded Thrift. At the end
one footer lists every row group with its columns in schema order. Memory holds one table's row group at a
time plus ~100 bytes of metadata per column chunk, whatever the width of the whole file.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bqx.errors import BadCheckpoint
from bqx.parquet import thrift
from bqx.parquet.chunks import Chunk, Moved, row_groups
from bqx.parquet.footer import MAGIC, footer_start
from bqx.parquet.thrift import I16, I64, LIST, STRUCT, Raw, encode_fields, fields

DETACHED_RANGE_COST = 256 << 10  # a copied range waiting for its turn holds a descriptor, not its bytes


class FileRange:
    """`length` bytes at `start` of an open binary file. Iterating reads them in pieces; a sink with `copy_range`
    may instead copy them inside the kernel (two local files: no trip through Python's memory). `detached`: the
    file is the merge's own descriptor, so the range can wait, unread, for its turn to be written."""

    PIECE = 4 << 20

    def __init__(self, f: BinaryIO, start: int, length: int, detached: bool = False) -> None:
        self.f, self.start, self.length, self.detached = f, start, length, detached

    def __iter__(self) -> Iterator[bytes]:
        return self.read_from(0)

    def read_from(self, done: int) -> Iterator[bytes]:
        self.f.seek(self.start + done)
        left = self.length - done
        while left:
            piece = self.f.read(min(self.PIECE, left))
            if not piece:
                raise BadCheckpoint("checkpoint ended inside a column chunk")
            left -= len(piece)
            yield piece


@dataclass
class _Piece:
    """Something to write, in turn order: encoded or copied column chunks, or a file to close once they are out."""

    group: int
    chunks: list[tuple[str, Chunk, Moved]]  # (output name, chunk, its metadata less the offsets)
    pieces: Iterable[bytes | memoryview]  # a FileRange: read (or copied in the kernel) when written
    source_start: int
    size: int  # what holding it until its turn costs (bytes of memory)
    closes: Callable[[], object] | None = None


def column_signature(schema: pq.ParquetSchema, i: int) -> tuple:
    """What an encoded column chunk's bytes depend on besides its values: type, logical type, levels, width."""
    c = schema.column(i)
    return (c.physical_type, c.logical_type.to_json(), c.max_definition_level, c.max_repetition_level, c.length)


def footer_template(schema: pa.Schema, options: dict[str, object]) -> dict[int, tuple[int, bytes]]:
    """The encoded fields of the footer of a file of `schema` written with `options` (and the Arrow schema stored),
    to which encode_footer adds the row groups."""
    if len(set(schema.names)) != len(schema.names):
        raise ValueError("output column names are not unique")
    # A writer closed before any table: the footer of a file without row groups. An empty table would add a
    # row group of 17k empty column chunks: 7x the time to write and 4x to parse, all thrown away.
    out = pa.BufferOutputStream()
    pq.ParquetWriter(out, schema, **{**options, "store_schema": True}).close()  # type: ignore[arg-type]
    data = out.getvalue().to_pybytes()
    # Its fields are kept encoded (the schema alone is ~5 elements per column: decoding it into objects cost
    # more than the rest of the footer); encode_footer changes only the row groups, row count and key-values.
    return {fid: (t, raw) for fid, t, raw in fields(data, footer_start(data))[0]}


@dataclass(frozen=True)
class FooterGroup:
    """One row group of a footer: its encoded ColumnChunks in schema order (offsets final) and its sizes."""

    columns: list[bytes]
    rows: int
    file_offset: int  # where its first column chunk starts
    uncompressed: int
    compressed: int


def encode_footer(template: dict[int, tuple[int, bytes]], groups: list[FooterGroup],
                  metadata: dict[str, str] | None = None) -> bytes:
    """The encoded FileMetaData: `template`'s fields (footer_template), these row groups, their row count, and the
    template's key-values plus `metadata`."""
    rgs = [{1: (LIST, (STRUCT, [Raw(c) for c in g.columns])), 2: (I64, g.uncompressed), 3: (I64, g.rows),
            5: (I64, g.file_offset), 6: (I64, g.compressed), 7: (I16, i)} for i, g in enumerate(groups)]
    kv = thrift.decode_value(template[5][1], LIST)[1] if 5 in template else []
    for k, v in (metadata or {}).items():
        kv.append({1: (thrift.BINARY, k.encode()), 2: (thrift.BINARY, v.encode())})
    changed = {3: (I64, sum(g.rows for g in groups)), 4: (LIST, (STRUCT, rgs)), 5: (LIST, (STRUCT, kv))}
    items = []
    for fid in sorted({*template, *changed} - {8, 9}):  # 8, 9: encryption, which the output does not use
        if fid in changed:
            items.append((fid, changed[fid][0], thrift.encode_value(*changed[fid])))
        else:
            items.append((fid, *template[fid]))
    return encode_fields(items)


class Stitcher:
    """`schema` is the output's, or a Future of it: appending does not need it (each chunk carries its output
    name), only the footer does, so the merge can start before every checkpoint's schema has been read."""

    def __init__(self, sink: BinaryIO, schema: pa.Schema | Future[pa.Schema], group_rows: list[int],
                 reorder_limit: int = 64 << 20, **writer_options: object):
        self.sink = sink
        self._schema = schema
        # A schema given up front declares the types to cast to; a planned one is derived from the tables' own.
        self._cast = not isinstance(schema, Future)
        self.group_rows = group_rows
        self.options = {**writer_options, "write_page_index": False, "store_schema": False}
        self.columns: list[dict[str, tuple[bytes, int]]] = [{} for _ in group_rows]  # name: (chunk, where it starts)
        self.sizes = [[0, 0] for _ in group_rows]  # uncompressed, compressed per row group
        # Deterministic output: tables write in their turn order, whichever worker finishes first. What a table
        # appends before its turn waits in `waiting`; when a turn is over its pieces move to `ready`, which one
        # thread at a time (whoever holds `writing`) writes out of the lock, so no worker waits on another's I/O.
        # Encoded bytes held (ready + waiting) are bounded by `reorder_limit`; past it a worker waits.
        self.lock = threading.Lock()
        self.turns = threading.Condition(self.lock)
        self.local = threading.local()
        self.head = 0
        self.finished: set[int] = set()
        self.waiting: dict[int, list[_Piece]] = {}
        self.waiting_bytes = 0
        self.ready: deque[_Piece] = deque()
        self.ready_bytes = 0
        self.writing = False
        self.reorder_limit = reorder_limit
        self.failed: BaseException | None = None
        self._signatures: dict[tuple, list[tuple]] = {}
        # The footer's template (the footer of a file of the whole schema, which keeps the Arrow schema) takes
        # ~0.1 s at 17k columns; it is encoded while the tables are merged rather than after them.
        background = ThreadPoolExecutor(1, thread_name_prefix="stitch-template")
        self._template = background.submit(self._encode_template)
        background.shutdown(wait=False)
        self.sink.write(MAGIC)
        self.pos = len(MAGIC)

    @property
    def schema(self) -> pa.Schema:
        if isinstance(self._schema, Future):
            self._schema = self._schema.result()
        return self._schema

    def _encode_template(self) -> dict[int, tuple[int, bytes]]:
        return footer_template(self.schema, self.options)

    def encode(self, table: pa.Table) -> pa.Buffer:
        """`table` as a small Parquet file, in an Arrow buffer (its pool returns memory promptly; a Python bytes
        would fragment the C heap). The buffer is allocated once at an upper bound of the encoded size: growing
        one while writing copies it over and over, which cost more than the encoding."""
        bound = int(table.nbytes * 1.2) + 4096 * table.num_columns + (1 << 20)  # snappy's worst case + headers
        try:
            buf = pa.allocate_buffer(bound)
            out = pa.FixedSizeBufferWriter(buf)
            pq.write_table(table, out, row_group_size=max(table.num_rows, 1), **self.options)
            return buf.slice(0, out.tell())
        except (OSError, pa.ArrowException):  # over the bound after all (e.g. long strings): let it grow
            grow = pa.BufferOutputStream()
            pq.write_table(table, grow, row_group_size=max(table.num_rows, 1), **self.options)
            return grow.getvalue()

    def signatures(self, schema: pa.Schema) -> list[tuple]:
        """column_signature of every column as this stitcher's writer encodes `schema` (cached by types: names do
        not change how a column is encoded)."""
        key = tuple((f.type, f.nullable) for f in schema)
        found = self._signatures.get(key)
        if found is None:
            mini = pq.ParquetFile(pa.BufferReader(self.encode(schema.empty_table()))).schema
            found = self._signatures[key] = [column_signature(mini, i) for i in range(len(mini))]
        return found

    def add(self, group: int, table: pa.Table) -> None:
        """Append the columns of `table` (output names, exactly row group `group`'s rows)."""
        if table.num_rows != self.group_rows[group]:
            raise ValueError(f"row group {group} needs {self.group_rows[group]} rows, got {table.num_rows}")
        if self._cast:
            target = pa.schema([self.schema.field(n) for n in table.column_names])
            if table.schema != target:
                table = table.cast(target)
        mini = memoryview(self.encode(table)).cast("B")
        start = footer_start(mini)
        chunks = row_groups(bytes(mini[start:-8]))[0] if table.num_rows else []
        self._append(group, [(n, c, c.prepare()) for n, c in zip(table.column_names, chunks, strict=True)],
                     [mini[len(MAGIC) : start]], len(MAGIC))
        del mini

    def add_raw(self, group: int, chunks: list[tuple[str, Chunk]], pieces: Iterable[bytes | memoryview],
                source_start: int, size: int | None = None) -> None:
        """Append already-encoded column chunks as they are: `chunks` are (output name, Chunk) whose byte ranges,
        at offsets in their source file, together make up `pieces` (`size` bytes, if known before reading them),
        which start at `source_start`. They are renamed to the output's names; page indexes and bloom filters
        are not copied."""
        self._append(group, [(n, c, c.prepare(n, drop_bloom=True)) for n, c in chunks], pieces, source_start, size)

    def close_after_turn(self, f: BinaryIO) -> None:
        """Close `f` once everything this turn appended has been written (a copied range may still read it)."""
        self._append(0, [], [], 0, 0, closes=f.close)

    @contextmanager
    def turn(self, order: int) -> Iterator[None]:
        """Everything this thread appends inside is written in `order`'s turn (0, 1, 2, ...), so the file's bytes
        do not depend on which worker finishes first. Every order from 0 up must take its turn once."""
        self.local.order = order
        try:
            yield
        except BaseException as exc:
            with self.turns:
                self.failed = self.failed or exc
                self.turns.notify_all()
            raise
        finally:
            self.local.order = None
        with self.turns:
            self.finished.add(order)
            while self.head in self.finished:
                self.head += 1
                for item in self.waiting.pop(self.head, []):
                    self.waiting_bytes -= item.size
                    self.ready_bytes += item.size
                    self.ready.append(item)
            self.turns.notify_all()
            drain = self._take_writer()
        if drain:
            self._drain()

    def _take_writer(self) -> bool:
        """(Under the lock.) Become the writer if there is something ready and nobody is writing it."""
        if self.ready and not self.writing and not self.failed:
            self.writing = True
            return True
        return False

    def _check(self) -> None:
        if self.failed:
            raise RuntimeError("another part of this merge failed") from self.failed

    def _append(self, group: int, chunks: list[tuple[str, Chunk, bool]], pieces: Iterable[bytes | memoryview],
                source_start: int, size: int | None = None, closes: Callable[[], object] | None = None) -> None:
        order = getattr(self.local, "order", None)
        if isinstance(pieces, FileRange) and pieces.detached:
            self._enqueue(order, _Piece(group, chunks, pieces, source_start, DETACHED_RANGE_COST, closes))
            return
        if isinstance(pieces, list | tuple):
            self._enqueue(order, _Piece(group, chunks, pieces, source_start, sum(len(p) for p in pieces), closes))
            return
        # Bytes still to be read (a range of a reader the table shares, e.g. a GCS object's): read ahead of the
        # turn when they fit the bound (object stores: the latency of the next tables' reads overlaps), else
        # written by this thread in its turn, straight from the source.
        n = pieces.length if isinstance(pieces, FileRange) else size
        with self.turns:
            while True:
                self._check()
                if (order is None or order == self.head) and not self.ready and not self.writing:
                    self.writing = direct = True
                    break
                if n is not None and self._room(n):
                    self.waiting_bytes += n  # reserved while they are read
                    direct = False
                    break
                self.turns.wait()
        if not direct:
            assert n is not None
            try:
                data = list(pieces)
            except BaseException:
                with self.turns:
                    self.waiting_bytes -= n
                    self.turns.notify_all()
                raise
            self._enqueue(order, _Piece(group, chunks, data, source_start, n, closes), reserved=n)
            return
        self._write_or_fail(_Piece(group, chunks, pieces, source_start, 0))
        with self.turns:
            self.writing = False
            drain = self._take_writer()
        if drain:
            self._drain()

    def _room(self, size: int) -> bool:
        """(Under the lock.) Whether `size` more bytes may be held: within the bound, or the first ones held."""
        held = self.ready_bytes + self.waiting_bytes
        return size <= self.reorder_limit and (not held or held + size <= self.reorder_limit)

    def _enqueue(self, order: int | None, item: _Piece, reserved: int = 0) -> None:
        """Hold `item` until its turn (`reserved`: bytes already counted for it), then write what is ready."""
        with self.turns:
            self.waiting_bytes -= reserved
            while not reserved:
                self._check()
                if order is None or order == self.head:  # the writer drains `ready`: no need to wait for the rest
                    if not self.ready_bytes or self.ready_bytes + item.size <= self.reorder_limit:
                        break
                elif not (self.ready_bytes or self.waiting_bytes) or \
                        self.ready_bytes + self.waiting_bytes + item.size <= self.reorder_limit:
                    break
                self.turns.wait()
            self._check()
            if order is None or order == self.head:
                self.ready.append(item)
                self.ready_bytes += item.size
            else:
                self.waiting.setdefault(order, []).append(item)
                self.waiting_bytes += item.size
            drain = self._take_writer()
        if drain:
            self._drain()

    def discard(self) -> None:
        """After a failure: drop what was never written and close the files it held open."""
        with self.turns:
            self.failed = self.failed or RuntimeError("merge abandoned")
            items = [*self.ready, *(i for pending in self.waiting.values() for i in pending)]
            self.ready.clear()
            self.waiting.clear()
            self.turns.notify_all()
        for item in items:
            if item.closes is not None:
                item.closes()
            elif isinstance(item.pieces, FileRange) and item.pieces.detached:
                item.pieces.f.close()

    def _drain(self) -> None:
        """Write what is ready, in order, outside the lock; this thread holds `writing` until `ready` is empty."""
        while True:
            with self.turns:
                if not self.ready or self.failed:
                    self.writing = False
                    self.turns.notify_all()
                    return
                item = self.ready.popleft()
            self._write_or_fail(item)
            with self.turns:
                self.ready_bytes -= item.size
                self.turns.notify_all()

    def _write_or_fail(self, item: _Piece) -> None:
        """_write, by the thread holding `writing`; if it fails, the merge fails and the token is let go."""
        try:
            self._write(item)
        except BaseException as exc:
            with self.turns:
                self.failed = self.failed or exc
                self.writing = False
                self.turns.notify_all()
            raise

    def _write(self, item: _Piece) -> None:
        if item.closes is not None:
            item.closes()
            return
        delta = self.pos - item.source_start
        pieces = item.pieces
        copy_range = getattr(self.sink, "copy_range", None)
        if isinstance(pieces, FileRange) and copy_range is not None:
            copy_range(pieces)
            self.pos += pieces.length
        else:
            for piece in pieces:
                self.sink.write(piece)
                self.pos += len(piece)
        group = item.group
        columns = self.columns[group]
        for name, chunk, prepared in item.chunks:
            if name in columns:
                raise ValueError(f"column {name} written twice in row group {group}")
            self.sizes[group][0] += chunk.uncompressed
            self.sizes[group][1] += chunk.compressed
            columns[name] = (prepared.at(delta), chunk.start + delta)

    def close(self, metadata: dict[str, str] | None = None) -> int:
        """Write the footer; returns the file's size."""
        if self.waiting or self.ready:
            raise ValueError(f"tables {sorted(self.waiting)[:5]} never got their turn (turn {self.head} missing)")
        template = self._template.result()  # or the schema's own failure (e.g. a checkpoint it could not read)
        names = self.schema.names
        groups = []
        for g, written in enumerate(self.columns):
            if not self.group_rows[g]:
                continue
            cols = [written.get(n) for n in names]
            missing = [n for n, c in zip(names, cols, strict=True) if c is None]
            if missing:
                raise ValueError(f"row group {g} lacks {len(missing)} columns, e.g. {missing[:3]}")
            if len(written) != len(names):
                extra = sorted(set(written) - set(names))
                raise ValueError(f"row group {g} has {len(extra)} columns the schema lacks, e.g. {extra[:3]}")
            groups.append(FooterGroup([c[0] for c in cols], self.group_rows[g], cols[0][1],  # type: ignore[index]
                                      self.sizes[g][0], self.sizes[g][1]))
        footer = encode_footer(template, groups, metadata)
        with self.lock:
            self.sink.write(footer)
            self.sink.write(struct.pack("<I", len(footer)))
            self.sink.write(MAGIC)
            self.pos += len(footer) + 8
        return self.pos
