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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bqx import thrift
from bqx.chunks import Chunk, row_groups
from bqx.errors import BadCheckpoint
from bqx.thrift import I16, I64, LIST, STRUCT, Raw

MAGIC = b"PAR1"


def footer_start(data: bytes | memoryview) -> int:
    """Offset where a whole Parquet file's encoded FileMetaData starts (it ends 8 bytes before the file does)."""
    if bytes(data[-4:]) != MAGIC:
        raise ValueError("not a Parquet file")
    return len(data) - 8 - struct.unpack("<I", bytes(data[-8:-4]))[0]


def footer_of(data: bytes | memoryview) -> tuple[thrift.Struct, int]:
    """(decoded FileMetaData, offset where the footer starts)."""
    start = footer_start(data)
    return thrift.decode_struct(memoryview(data)[start : len(data) - 8]), start


class FileRange:
    """`length` bytes at `start` of an open binary file. Iterating reads them in pieces; a sink with `copy_range`
    may instead copy them inside the kernel (two local files: no trip through Python's memory)."""

    PIECE = 4 << 20

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        self.f, self.start, self.length = f, start, length

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


def column_signature(schema: pq.ParquetSchema, i: int) -> tuple:
    """What an encoded column chunk's bytes depend on besides its values: type, logical type, levels, width."""
    c = schema.column(i)
    return (c.physical_type, c.logical_type.to_json(), c.max_definition_level, c.max_repetition_level, c.length)


class Stitcher:
    def __init__(self, sink: BinaryIO, schema: pa.Schema, group_rows: list[int], reorder_limit: int = 64 << 20,
                 **writer_options: object):
        self.sink = sink
        self.schema = schema
        self.group_rows = group_rows
        self.options = {**writer_options, "write_page_index": False, "store_schema": False}
        self.index = {name: i for i, name in enumerate(schema.names)}
        if len(self.index) != len(schema.names):
            raise ValueError("output column names are not unique")
        self.columns: list[list[bytes | None]] = [[None] * len(schema.names) for _ in group_rows]
        self.sizes = [[0, 0] for _ in group_rows]  # uncompressed, compressed per row group
        self.first_offset = [0 for _ in group_rows]
        self.lock = threading.Lock()
        # Deterministic output: tables write in their turn order, whichever worker finishes first. A piece of a
        # later table waits in a bounded reorder buffer; past the bound its worker waits for its turn.
        self.turns = threading.Condition(self.lock)
        self.local = threading.local()
        self.head = 0
        self.finished: set[int] = set()
        self.waiting: dict[int, list[tuple[int, list[tuple[str, Chunk, bool]], list[bytes | memoryview], int]]] = {}
        self.waiting_bytes = 0
        self.reorder_limit = reorder_limit
        self.failed = False
        self._signatures: dict[tuple, list[tuple]] = {}
        self.sink.write(MAGIC)
        self.pos = len(MAGIC)

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
        target = pa.schema([self.schema.field(n) for n in table.column_names])
        if table.schema != target:
            table = table.cast(target)
        mini = memoryview(self.encode(table)).cast("B")
        start = footer_start(mini)
        chunks = row_groups(bytes(mini[start:-8]))[0] if table.num_rows else []
        self._append(group, [(n, c, False) for n, c in zip(table.column_names, chunks, strict=True)],
                     [mini[len(MAGIC) : start]], len(MAGIC))
        del mini

    def add_raw(self, group: int, chunks: list[tuple[str, Chunk]], pieces: Iterable[bytes | memoryview],
                source_start: int, size: int | None = None) -> None:
        """Append already-encoded column chunks as they are: `chunks` are (output name, Chunk) whose byte ranges,
        at offsets in their source file, together make up `pieces` (`size` bytes, if known before reading them),
        which start at `source_start`. They are
        renamed to the output's names; page indexes and bloom filters are not copied."""
        self._append(group, [(n, c, True) for n, c in chunks], pieces, source_start, size)

    @contextmanager
    def turn(self, order: int) -> Iterator[None]:
        """Everything this thread appends inside is written in `order`'s turn (0, 1, 2, ...), so the file's bytes
        do not depend on which worker finishes first. Every order from 0 up must take its turn once."""
        self.local.order = order
        try:
            yield
        except BaseException:
            with self.turns:
                self.failed = True
                self.turns.notify_all()
            raise
        finally:
            self.local.order = None
        with self.turns:
            self.finished.add(order)
            self._advance()

    def _advance(self) -> None:
        while self.head in self.finished:
            self.head += 1
            for item in self.waiting.pop(self.head, []):
                self.waiting_bytes -= sum(len(p) for p in item[2])
                self._write(*item)
        self.turns.notify_all()

    def _append(self, group: int, chunks: list[tuple[str, Chunk, bool]], pieces: Iterable[bytes | memoryview],
                source_start: int, size: int | None = None) -> None:
        order = getattr(self.local, "order", None)
        with self.turns:
            if order is None or order == self.head:
                self._write(group, chunks, pieces, source_start)
                return
            if isinstance(pieces, FileRange) or (size is not None and size > self.reorder_limit):
                # Bytes not read yet (copied chunks): wait for the turn and copy them then, rather than holding
                # them in memory (or too big to hold for its turn).
                while order != self.head:
                    if self.failed:
                        raise RuntimeError("another table of this merge failed")
                    self.turns.wait()
                self._write(group, chunks, pieces, source_start)
                return
        pieces = list(pieces)  # read before waiting: a later table's bytes are kept until its turn
        with self.turns:
            size = sum(len(p) for p in pieces)
            while order != self.head and self.waiting_bytes and self.waiting_bytes + size > self.reorder_limit:
                if self.failed:
                    raise RuntimeError("another table of this merge failed")
                self.turns.wait()
            if order == self.head:
                self._write(group, chunks, pieces, source_start)
            else:
                self.waiting.setdefault(order, []).append((group, chunks, pieces, source_start))
                self.waiting_bytes += size

    def _write(self, group: int, chunks: list[tuple[str, Chunk, bool]], pieces: Iterable[bytes | memoryview],
               source_start: int) -> None:
        delta = self.pos - source_start
        copy_range = getattr(self.sink, "copy_range", None)
        if isinstance(pieces, FileRange) and copy_range is not None:
            copy_range(pieces)
            self.pos += pieces.length
        else:
            for piece in pieces:
                self.sink.write(piece)
                self.pos += len(piece)
        for name, chunk, moved in chunks:
            i = self.index[name]
            if i == 0:
                self.first_offset[group] = chunk.offsets.get(11, chunk.offsets.get(9, 0)) + delta
            self.sizes[group][0] += chunk.uncompressed
            self.sizes[group][1] += chunk.compressed
            self.columns[group][i] = chunk.encode(delta, name if moved else None, drop_bloom=moved)

    def close(self, metadata: dict[str, str] | None = None) -> int:
        """Write the footer; returns the file's size."""
        if self.waiting:
            raise ValueError(f"tables {sorted(self.waiting)[:5]} never got their turn (turn {self.head} missing)")
        out = pa.BufferOutputStream()  # the footer's template keeps the Arrow schema (store_schema)
        pq.write_table(self.schema.empty_table(), out, **{**self.options, "store_schema": True})
        template, _ = footer_of(memoryview(out.getvalue()).cast("B"))
        groups = []
        for g, cols in enumerate(self.columns):
            missing = [self.schema.names[i] for i, c in enumerate(cols) if c is None]
            if missing and self.group_rows[g]:
                raise ValueError(f"row group {g} lacks {len(missing)} columns, e.g. {missing[:3]}")
            if not self.group_rows[g]:
                continue
            groups.append({
                1: (LIST, (STRUCT, [Raw(c) for c in cols])),
                2: (I64, self.sizes[g][0]),
                3: (I64, self.group_rows[g]),
                5: (I64, self.first_offset[g]),
                6: (I64, self.sizes[g][1]),
                7: (I16, len(groups)),
            })
        kv = list(template.get(5, (LIST, (STRUCT, [])))[1][1])
        for k, v in (metadata or {}).items():
            kv.append({1: (thrift.BINARY, k.encode()), 2: (thrift.BINARY, v.encode())})
        fmd = {
            1: template[1],
            2: template[2],
            3: (I64, sum(self.group_rows)),
            4: (LIST, (STRUCT, groups)),
            5: (LIST, (STRUCT, kv)),
        }
        for fid in (6, 7):
            if fid in template:
                fmd[fid] = template[fid]
        footer = thrift.encode_struct(fmd)
        with self.lock:
            self.sink.write(footer)
            self.sink.write(struct.pack("<I", len(footer)))
            self.sink.write(MAGIC)
            self.pos += len(footer) + 8
        return self.pos
