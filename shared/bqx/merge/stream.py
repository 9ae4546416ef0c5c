"""The memory-bounded merge: LEFT JOIN every feature table onto the targets by interval_time.

Every input is sorted by interval_time with unique keys (extraction guarantees it; this checks again). The
output's row groups are the targets' row groups (split if over the budget's cap, tiny ones coalesced). Per
feature table, on one of `workers` threads:

- if its row groups hold exactly the output row groups' keys (a checkpoint written aligned to the targets), its
  encoded column chunks are copied into the output as they are: no decoding (the "below the floor" path);
- otherwise it is decoded, aligned to the targets' keys one output row group at a time (a sorted merge-join: no
  hash table, no sort), encoded and its column chunks appended (see stitch.py). Arrow's reader holds a whole input
  row group of the columns it reads, so a wide table is read in slices of columns sized to the worker's share of
  the budget.

Tables are prepared by the workers in any order but written in table order: whatever a table appends before its
turn waits (bounded by the budget; an aligned local checkpoint's ranges wait as descriptors, unread), and one
thread at a time writes what is ready outside the lock. The output schema, needed only by the footer, is read from
the checkpoints' footers in the background meanwhile.

Memory is therefore set by the budget (STREAM_COPIES x BYTES_PER_CELL x rows x columns of a slice per worker), never by
the number of tables, their width or the number of rows, and nothing is staged on local disk.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from contextlib import ExitStack
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.catalog import KEY
from bqx.errors import BadCheckpoint
from bqx.logs import Log
from bqx.merge import allocator
from bqx.merge.plan import (
    BYTES_PER_CELL,
    STREAM_COPIES,
    CountingWriter,
    MergeInput,
    MergeJob,
    MergeStats,
    assemble_schema,
    gcs_inputs,
    stream_sizing,
)
from bqx.merge.stitch import FileRange, Stitcher
from bqx.merge.stitch import column_signature as _column_signature
from bqx.parquet.chunks import row_groups as chunks_of
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS
from bqx.parquet.footer import read_footer
from bqx.parquet.keys import check_row_group_order, key_micros

log = Log("bqx.merge.stream")

READ_BUFFER = 262144  # stream column chunks
COALESCE_BELOW = 16_384  # targets row groups smaller than this are merged into bigger output row groups
SWITCH_INTERVAL = 0.0002  # seconds; see merge()
PLAN_THREADS = 16  # checkpoints whose schemas are read at once, in the background (object-store latency)


def _open(inp: MergeInput) -> tuple[pq.ParquetFile, BinaryIO | None]:
    """The input as a ParquetFile, and the file object it reads from when that is the source's own (e.g. a GCS
    reader, which costs requests to open: the copy path reuses it). None for a local path."""
    try:
        src = inp.open()
        if isinstance(src, str | os.PathLike):
            # a native file: no filesystem resolution per open, no mmap
            return pq.ParquetFile(pa.OSFile(os.fspath(src)), buffer_size=READ_BUFFER, pre_buffer=False), None
        return pq.ParquetFile(src, buffer_size=READ_BUFFER, pre_buffer=False), src
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadCheckpoint(f"{inp.table}: not a readable Parquet file ({exc})") from exc


def _schema_of(inp: MergeInput) -> pa.Schema:
    pf, _ = _open(inp)
    try:
        return pf.schema_arrow
    finally:
        pf.close(force=True)  # its source too


def _names(inp: MergeInput, schema: pa.Schema) -> tuple[list[str], list[str]]:
    """A feature table's value columns and their names in the output."""
    if KEY not in schema.names:
        raise BadCheckpoint(f"{inp.table}: no {KEY} column")
    names = [f.name for f in schema if f.name != KEY]
    return names, [f"{inp.prefix}_{c}" for c in names]


def _output_schema(targets: pa.Schema, features: list[MergeInput], stop: threading.Event) -> pa.Schema:
    def schema_of(inp: MergeInput) -> pa.Schema:
        if stop.is_set():  # the merge failed: read no more
            raise RuntimeError("merge abandoned")
        return _schema_of(inp)

    # Locally one thread: more only contend for the GIL with the workers (and the writer, starved, waits).
    threads = PLAN_THREADS if any(f.remote for f in features) else 1
    with ThreadPoolExecutor(threads, thread_name_prefix="merge-plan") as pool:
        schemas = list(pool.map(schema_of, features))
    for inp, schema in zip(features, schemas, strict=True):
        _names(inp, schema)  # each has a key column
    return assemble_schema(targets, ((inp.prefix, schema) for inp, schema in zip(features, schemas, strict=True)))


def _align_and_encode(inp: MergeInput, pf: pq.ParquetFile, names: list[str], out_names: list[str], keys: np.ndarray,
                      bounds: list[tuple[int, int]], stitcher: Stitcher, worker_budget: int,
                      with_key: bool = False, govern: Callable[[], None] = lambda: None) -> None:
    """Decode, align and encode one table. Arrow's Parquet reader holds a whole row group of the columns it reads
    (whatever the batch size), so the table is read in slices of columns narrow enough that a slice of one input
    row group plus one output row group fits the worker's share of the budget: one pass per slice. Row groups that
    end before the targets' first key (history the targets lack) are not read at all."""
    md = pf.metadata
    first = _first_row_group(md, pf.schema_arrow.get_field_index(KEY), int(keys[0]))
    rg_rows = max((md.row_group(i).num_rows for i in range(first, md.num_row_groups)), default=0)
    group_rows = max(e - s for s, e in bounds)
    per_row = worker_budget // (max(rg_rows, group_rows, 1) * STREAM_COPIES)  # bytes of a slice's row
    for sub_names in _slices(names, _cell_bytes(pf, names), per_row):
        c0 = names.index(sub_names[0])
        sub, sub_out = names[c0 : c0 + len(sub_names)], out_names[c0 : c0 + len(sub_names)]
        parts = (pf.read_row_group(r, columns=[KEY, *sub], use_threads=False) for r in range(first, md.num_row_groups))
        cursor = Aligner(inp.table, parts, pa.schema([pf.schema_arrow.field(n) for n in sub]))
        for g, (s, e) in enumerate(bounds):
            part = cursor.align(keys[s:e]).rename_columns(sub_out)
            if with_key and c0 == 0:
                part = part.add_column(0, KEY, pa.array(keys[s:e], type=pa.int64()).cast(KEY_TYPE))
            stitcher.add(g, part)
            del part
            govern()


def _first_row_group(md: pq.FileMetaData, key_index: int, first_key: int) -> int:
    """The first row group that may hold a key at or after `first_key`, by the key column's statistics (the row
    groups are in key order: check_row_group_order); 0 when a row group before it has no statistics."""
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        st = rg.column(key_index).statistics if rg.num_rows else None
        if st is None or not st.has_min_max:
            return r  # the ones before end before `first_key`; this one may not
        if _micros(st.max) >= first_key:
            return r
    return md.num_row_groups


def _micros(value: object) -> int:
    """A key statistic (a datetime, or an integer for an int64-typed key) in microseconds since the epoch."""
    return int(value) if isinstance(value, int) else int(pa.scalar(value, type=KEY_TYPE).value)  # type: ignore[arg-type]


def _cell_bytes(pf: pq.ParquetFile, names: list[str]) -> list[int]:
    """Decoded bytes of one cell of each column: a fixed-width type's width (at least a byte), or for strings and
    binaries the widest row group's declared bytes per row plus the offset Arrow keeps for each value."""
    md, schema = pf.metadata, pf.schema_arrow
    out = []
    for name in names:
        t = schema.field(name).type
        try:
            out.append(max(1, t.bit_width // 8))
            continue
        except ValueError:  # not fixed-width
            pass
        i = schema.get_field_index(name)
        per_row = max((md.row_group(r).column(i).total_uncompressed_size / md.row_group(r).num_rows
                       for r in range(md.num_row_groups) if md.row_group(r).num_rows), default=0.0)
        offset = 8 if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else 4
        out.append(max(BYTES_PER_CELL, int(per_row) + 1 + offset))
    return out


def _slices(names: list[str], widths: list[int], row_bytes: int) -> Iterator[list[str]]:
    """Consecutive columns whose cells together take at most `row_bytes` a row (at least one column a slice)."""
    sub: list[str] = []
    used = 0
    for name, w in zip(names, widths, strict=True):
        if sub and used + w > row_bytes:
            yield sub
            sub, used = [], 0
        sub.append(name)
        used += w
    if sub:
        yield sub


def _copy_encoded(inp: MergeInput, pf: pq.ParquetFile, reader: BinaryIO | None, names: list[str],
                  out_names: list[str], keys: np.ndarray, bounds: list[tuple[int, int]], stitcher: Stitcher,
                  key_chunks: list[bytes] | None, with_key: bool = False) -> bool:
    """The stretch path: a checkpoint whose row groups hold exactly the output row groups' keys needs no decoding.
    Its value columns' encoded chunks are copied as they are and only their footer entries rewritten. Returns
    False (nothing written) when the checkpoint is not aligned that way."""
    md = pf.metadata
    if md.num_row_groups != len(bounds) or not keys.size:
        return False
    for r, (s, e) in enumerate(bounds):
        if md.row_group(r).num_rows != e - s:
            return False
    # The encoded chunks must be exactly what the output's schema declares for these columns.
    theirs, arrow = pf.schema, pf.schema_arrow
    if [theirs.column(i).name for i in range(len(theirs))] != arrow.names:
        return False
    if [_column_signature(theirs, i) for i in range(len(theirs))] != stitcher.signatures(arrow):
        return False
    if reader is not None:  # the source's own reader (pf's too): its ranges are read before add_raw returns
        f, detached = reader, False
    else:  # a local path: a descriptor of our own (copy_file_range can use it), closed once its ranges are out
        f, detached = _own_file(inp), True
    try:
        groups = chunks_of(read_footer(f))
        position = {name: i for i, name in enumerate(theirs.names)}
        out_of = dict(zip(names, out_names, strict=True))
        if with_key:
            out_of[KEY] = KEY
        # Same keys, row for row (which also rules out duplicates and disorder): byte for byte against the
        # targets' encoded key chunks when the writers agree, else decoded.
        exact = key_chunks is not None and arrow.field(KEY).type == KEY_TYPE
        for r, (s, e) in enumerate(bounds):
            cc = next((c for c in groups[r] if c.path == KEY), None) if r < len(groups) else None
            if cc is None:
                return False
            if exact and key_chunks and cc.compressed == len(key_chunks[r]):
                f.seek(cc.start)
                if f.read(cc.compressed) == key_chunks[r]:
                    continue
            if not np.array_equal(key_micros(inp.table, pf.read_row_group(r, columns=[KEY]).column(KEY)), keys[s:e]):
                return False
        plan = []
        for rg in groups:  # check every chunk before copying any: a refusal writes nothing
            chunks = []
            for cc in rg:
                name = cc.path
                if name == KEY and not with_key:
                    continue
                if name not in out_of or name not in position:
                    return False
                chunks.append((cc.start, cc.start + cc.compressed, out_of[name], cc))
            if len(chunks) != len(out_of):
                return False
            plan.append(sorted(chunks, key=lambda c: c[0]))
        for r, chunks in enumerate(plan):
            run: list = []
            for c in [*chunks, None]:  # contiguous runs of chunks are copied with one sequence of reads
                if run and (c is None or c[0] != run[-1][1]):
                    _copy_run(f, r, run, stitcher, detached)
                    run = []
                if c is not None:
                    run.append(c)
        if detached:
            stitcher.close_after_turn(f)
            detached = False
        return True
    finally:
        if detached:
            f.close()


def _key_chunks(targets: MergeInput, tfile: pq.ParquetFile, reader: BinaryIO | None, bounds: list[tuple[int, int]],
                limit: int) -> list[bytes] | None:
    """The targets' encoded key column chunk of every output row group, when those are the targets' own row
    groups and take at most `limit` bytes: an aligned checkpoint written the same way has the same bytes."""
    md = tfile.metadata
    i = tfile.schema_arrow.get_field_index(KEY)
    if md.num_row_groups != len(bounds) or any(md.row_group(r).num_rows != e - s for r, (s, e) in enumerate(bounds)):
        return None
    if sum(md.row_group(r).column(i).total_compressed_size for r in range(md.num_row_groups)) > limit:
        return None
    # The targets' own reader if they have one (no other thread uses it yet: no second open of an object).
    f = reader if reader is not None else _own_file(targets)
    try:
        out = []
        for rg in chunks_of(read_footer(f)):
            cc = next(c for c in rg if c.path == KEY)
            f.seek(cc.start)
            out.append(f.read(cc.compressed))
        return out
    finally:
        if f is not reader:
            f.close()


def _own_file(inp: MergeInput) -> BinaryIO:
    """A file object of our own for `inp` (for a local path: a plain OS file, whose descriptor copy_file_range
    can use)."""
    src = inp.open()
    return open(src, "rb") if isinstance(src, str | os.PathLike) else src  # noqa: SIM115 - the caller closes it


def _copy_run(f: BinaryIO, group: int, run: list, stitcher: Stitcher, detached: bool) -> None:
    start, end = run[0][0], run[-1][1]
    stitcher.add_raw(group, [(name, cc) for _, _, name, cc in run], FileRange(f, start, end - start, detached),
                     start, end - start)


class Aligner:
    """A forward-only cursor over one sorted table that lines its rows up with successive key slices."""

    def __init__(self, name: str, batches: Iterator[pa.Table], values: pa.Schema) -> None:
        self.name = name
        self.batches = batches
        self.values = values  # the value columns, with the types a table without rows still declares
        self.value_names = values.names
        self.buf: pa.Table | None = None
        self.buf_keys = np.empty(0, dtype=np.int64)
        self.last: int | None = None
        self.done = False

    def _drop_before(self, key: int) -> None:
        """Let go of the buffered rows before `key` (a slice of them would still hold their buffers: all of them
        are dropped outright)."""
        cut = int(np.searchsorted(self.buf_keys, key, side="left"))
        if not cut:
            return
        self.buf = None if cut == self.buf_keys.size else self.buf.slice(cut)  # type: ignore[union-attr]
        self.buf_keys = self.buf_keys[cut:]

    def _pull(self) -> bool:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.done = True
            return False
        keys = key_micros(self.name, batch.column(KEY), self.last)
        if keys.size:
            self.last = int(keys[-1])
        values = batch.select(self.value_names)
        self.buf = values if self.buf is None else pa.concat_tables([self.buf, values])
        self.buf_keys = np.concatenate([self.buf_keys, keys]) if self.buf_keys.size else keys
        return True

    def align(self, keys: np.ndarray) -> pa.Table:
        while not self.done and (not self.buf_keys.size or self.buf_keys[-1] < keys[-1]):
            self._pull()
            self._drop_before(int(keys[0]))  # rows before the slice are never wanted: held at most one row group
        bk = self.buf_keys
        if self.buf is None:
            return pa.table({f.name: pa.nulls(len(keys), type=f.type) for f in self.values})
        n = len(keys)
        if bk.size >= n and bk[0] == keys[0] and bk[n - 1] == keys[-1] and np.array_equal(bk[:n], keys):
            out = self.buf.slice(0, n)  # no gaps here: a zero-copy slice
        else:
            pos = np.searchsorted(bk, keys)
            clipped = np.minimum(pos, max(bk.size - 1, 0))
            hit = (pos < bk.size) & (bk[clipped] == keys) if bk.size else np.zeros(n, dtype=bool)
            out = self.buf.take(pa.array(clipped, mask=~hit)) if bk.size else self.buf.slice(0, 0).take(
                pa.array(np.zeros(n, dtype=np.int64), mask=np.ones(n, dtype=bool)))
        cut = int(np.searchsorted(bk, keys[-1], side="right"))
        self.buf = self.buf.slice(cut)
        self.buf_keys = bk[cut:]
        return out


def group_bounds(tfile: pq.ParquetFile, cap: int, n: int) -> list[tuple[int, int]]:
    """Output row groups: the targets' own row groups (so checkpoints written with the same boundaries can be
    copied without decoding), split where one is over `cap` rows and small neighbours coalesced up to `cap`."""
    sizes = [tfile.metadata.row_group(i).num_rows for i in range(tfile.metadata.num_row_groups)]
    if sum(sizes) != n or not n:
        return [(s, min(s + cap, n)) for s in range(0, n, cap)] or [(0, 0)]
    bounds: list[tuple[int, int]] = []
    start = 0
    for size in sizes:
        if not size:
            continue
        end = start + size
        if size > cap:
            parts = -(-size // cap)
            step = -(-size // parts)
            bounds += [(s, min(s + step, end)) for s in range(start, end, step)]
        elif bounds and size < COALESCE_BELOW and bounds[-1][1] - bounds[-1][0] + size <= cap:
            bounds[-1] = (bounds[-1][0], end)
        else:
            bounds.append((start, end))
        start = end
    return bounds


def merge(
    targets: MergeInput,
    features: list[MergeInput],
    sink: BinaryIO,
    memory_budget: int = 1 << 30,
    workers: int | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeStats:
    started = time.time()
    workers = workers or min(2, os.cpu_count() or 1)
    with ExitStack() as cleanup:  # undone in reverse order, whether the merge succeeds or fails
        # A thread back from I/O (a copy, a write, a read) waits for the GIL until the thread holding it is made to
        # let go, by default after 5 ms. The merge returns from ~1,000 system calls per second: with the default,
        # a copy of aligned checkpoints ran 3x slower next to a busy worker.
        cleanup.callback(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        tfile, t_reader = _open(targets)
        cleanup.callback(tfile.close, force=True)  # its source too: a failed merge holds no checkpoint open
        check_row_group_order(targets.table, tfile.metadata, tfile.schema_arrow.get_field_index(KEY))
        keys = key_micros(targets.table, tfile.read(columns=[KEY]).column(KEY))

        # The output schema needs every checkpoint's schema, but only the footer needs it: it is read in the
        # background (many at once: object-store latency) while the merge runs.
        stop_plan = threading.Event()
        planner = ThreadPoolExecutor(1, thread_name_prefix="merge-plan")
        planned = planner.submit(_output_schema, tfile.schema_arrow, features, stop_plan)
        planner.shutdown(wait=False)
        cleanup.callback(wait, [planned])  # nothing is left reading when merge() returns ...
        cleanup.callback(stop_plan.set)  # ... and after a failure the plan stops early

        n = int(keys.size)
        size = stream_sizing(memory_budget, workers, n)
        bounds = group_bounds(tfile, size.group_rows, n)
        counting = CountingWriter(sink)
        governor = allocator.MemoryGovernor(size.governor_limit)
        md = {"bqx.rows": str(n), **(metadata or {})}
        if n == 0:
            out_schema = planned.result()
            buf = pa.BufferOutputStream()
            pq.write_table(out_schema.empty_table(), buf, **WRITER_OPTIONS)  # type: ignore[arg-type]
            counting.write(memoryview(buf.getvalue()).cast("B"))
            return MergeStats(rows=0, columns=len(out_schema), tables=len(features) + 1, bytes=counting.size,
                              seconds=time.time() - started)
        stitcher = Stitcher(counting, planned, [e - s for s, e in bounds],  # type: ignore[arg-type]
                            reorder_limit=size.held_encoded, **WRITER_OPTIONS)
        stats = MergeStats(rows=n, tables=len(features) + 1, row_groups=len(bounds), group_rows=size.group_rows,
                           workers=workers)

        # The targets first (their key column leads each row group): already aligned, just cut into the row groups.
        key_chunks = _key_chunks(targets, tfile, t_reader, bounds, size.held_encoded)
        t_names = [f.name for f in tfile.schema_arrow if f.name != KEY]
        with stitcher.turn(0):
            if not _copy_encoded(targets, tfile, t_reader, t_names, t_names, keys, bounds, stitcher, key_chunks,
                                 with_key=True):
                _align_and_encode(targets, tfile, t_names, t_names, keys, bounds, stitcher, size.targets_budget,
                                  with_key=True)

        done = [0]
        lock = threading.Lock()

        def one(order: int, inp: MergeInput) -> tuple[str, float]:
            t0 = time.time()
            with stitcher.turn(order):  # inside: a failure here must release the tables waiting for this turn
                if planned.done() and planned.exception():  # a checkpoint the plan could not use: stop early
                    raise planned.exception()  # type: ignore[misc]
                pf, reader = _open(inp)
                try:
                    names, out_names = _names(inp, pf.schema_arrow)
                    check_row_group_order(inp.table, pf.metadata, pf.schema_arrow.get_field_index(KEY))
                    copied = _copy_encoded(inp, pf, reader, names, out_names, keys, bounds, stitcher, key_chunks)
                    if not copied:
                        _align_and_encode(inp, pf, names, out_names, keys, bounds, stitcher, size.worker_budget,
                                          govern=governor.check)
                finally:
                    # Its source too. Copied ranges have a descriptor of their own, or were read from it already.
                    pf.close(force=True)
                governor.check()
            with lock:
                stats.copied_tables += copied
                done[0] += 1
                if progress:
                    progress(done[0], len(features))
            return inp.table, time.time() - t0

        with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
            futures = [pool.submit(one, i, inp) for i, inp in enumerate(features, start=1)]
            try:
                for fut in as_completed(futures):
                    table, secs = fut.result()
                    stats.table_seconds[table] = round(secs, 4)
            except BaseException as exc:
                for fut in futures:
                    fut.cancel()
                wait(futures)
                root = stitcher.failed
                stitcher.discard()
                if root is not None and root is not exc:
                    raise root from None  # the first failure, not a worker told to stop because of it
                raise
        stitcher.close(md)
        stats.columns = len(stitcher.schema)
        stats.bytes = counting.size
        stats.memory_releases = governor.releases
        stats.seconds = time.time() - started
        return stats


def run(job: MergeJob, sink: BinaryIO) -> MergeStats:
    """The `stream` method (bqx.merge.plan's contract): the run's checkpoints read from GCS at the listed
    generations."""
    targets, features = gcs_inputs(job.settings, job.manifest, job.versions)
    return merge(targets, features, sink, memory_budget=job.budget, metadata=job.metadata, progress=job.progress)
