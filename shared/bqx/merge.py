"""The memory-bounded merge: LEFT JOIN every feature table onto the targets by interval_time.

Every input is sorted by interval_time with unique keys (extraction guarantees it; this checks again). The
output's row groups follow the targets' rows. Each feature table is streamed once, aligned to the targets'
keys one row group at a time (a sorted merge-join: no hash table, no sort), encoded, and its column chunks
appended to the output (see stitch.py). At any moment a worker holds one table's row group, so memory is
set by the budget and the widest table, never by the number of tables or rows.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.catalog import KEY
from bqx.errors import BadCheckpoint, DuplicateKeys, TerminalError
from bqx.logs import Log
from bqx.parquet_io import KEY_TYPE, WRITER_OPTIONS
from bqx.stitch import Stitcher

log = Log("bqx.merge")

READ_BUFFER = 1 << 20  # stream column chunks instead of loading whole row groups of a checkpoint
MIN_GROUP_ROWS, MAX_GROUP_ROWS = 1_024, 1 << 17
BYTES_PER_CELL_IN_FLIGHT = 8 * 5  # decoded input + aligned copy + encoder buffers + compressed output


@dataclass(frozen=True)
class MergeInput:
    table: str
    prefix: str  # "" for the targets: its columns keep their names
    open: Callable[[], BinaryIO | str]


@dataclass
class MergeStats:
    rows: int = 0
    columns: int = 0
    tables: int = 0
    row_groups: int = 0
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0
    group_rows: int = 0
    workers: int = 1
    table_seconds: dict[str, float] = field(default_factory=dict)


class HashingWriter:
    """Counts and hashes what passes through to the real sink."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def local_inputs(directory: Path, targets: str | None = None) -> tuple[MergeInput, list[MergeInput]]:
    """DIR with one Parquet file per table -> (targets, features). Targets: the file named `targets*`."""
    files = sorted(p for p in Path(directory).glob("*.parquet") if p.is_file())
    if not files:
        raise TerminalError(f"no .parquet files in {directory}")
    chosen = [p for p in files if (p.stem == targets if targets else p.stem.startswith("targets"))]
    if len(chosen) != 1:
        raise TerminalError(
            f"need exactly one targets file in {directory} (matching {targets or 'targets*'}), found {len(chosen)}"
        )
    t = chosen[0]
    features = [MergeInput(p.stem, p.stem, (lambda p=p: str(p))) for p in files if p != t]
    return MergeInput(t.stem, "", lambda: str(t)), features


def _open(inp: MergeInput) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(inp.open(), buffer_size=READ_BUFFER, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadCheckpoint(f"{inp.table}: not a readable Parquet file ({exc})") from exc


def _keys_int(table: str, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if arr.null_count:
        raise BadCheckpoint(f"{table}: null {KEY}")
    if arr.type != KEY_TYPE:
        if not pa.types.is_timestamp(arr.type):
            raise BadCheckpoint(f"{table}: {KEY} is {arr.type}, expected {KEY_TYPE}")
        arr = arr.cast(KEY_TYPE)  # a ms or ns key is converted by its declared unit, never reinterpreted
    return np.asarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _check_increasing(table: str, keys: np.ndarray, previous: int | None) -> None:
    if previous is not None and keys.size and keys[0] <= previous:
        if keys[0] == previous:
            raise DuplicateKeys(table, np.datetime64(int(previous), "us"))
        raise BadCheckpoint(f"{table}: not ordered by {KEY}")
    if keys.size > 1:
        d = np.diff(keys)
        if (d <= 0).any():
            i = int(np.flatnonzero(d <= 0)[0])
            if d[i] == 0:
                raise DuplicateKeys(table, np.datetime64(int(keys[i]), "us"))
            raise BadCheckpoint(f"{table}: not ordered by {KEY}")


class Aligner:
    """A forward-only cursor over one sorted table that lines its rows up with successive key slices."""

    def __init__(self, name: str, batches: Iterator[pa.RecordBatch], value_names: list[str]) -> None:
        self.name = name
        self.batches = batches
        self.value_names = value_names
        self.buf: pa.Table | None = None
        self.buf_keys = np.empty(0, dtype=np.int64)
        self.last: int | None = None
        self.done = False

    def _pull(self) -> bool:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.done = True
            return False
        keys = _keys_int(self.name, batch.column(KEY))
        _check_increasing(self.name, keys, self.last)
        if keys.size:
            self.last = int(keys[-1])
        values = pa.Table.from_batches([batch]).select(self.value_names)
        self.buf = values if self.buf is None else pa.concat_tables([self.buf, values])
        self.buf_keys = np.concatenate([self.buf_keys, keys]) if self.buf_keys.size else keys
        return True

    def align(self, keys: np.ndarray) -> pa.Table:
        while not self.done and (not self.buf_keys.size or self.buf_keys[-1] < keys[-1]):
            self._pull()
        bk = self.buf_keys
        if self.buf is None:
            return pa.table({n: pa.nulls(len(keys)) for n in self.value_names})
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


def group_rows_for(budget: int, widest: int, workers: int, rows: int) -> int:
    """Rows per output row group so that every worker's table row group fits in its share of the budget."""
    per_worker = budget // max(workers, 1)
    r = per_worker // max(widest * BYTES_PER_CELL_IN_FLIGHT, 1)
    r = int(min(max(r, MIN_GROUP_ROWS), MAX_GROUP_ROWS))
    # Even groups so the last one is not a sliver.
    groups = max(1, -(-rows // r))
    return -(-rows // groups) if rows else r


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
    tfile = _open(targets)
    keys = _keys_int(targets.table, tfile.read(columns=[KEY]).column(KEY))
    _check_increasing(targets.table, keys, None)
    n = int(keys.size)

    fields: list[pa.Field] = [pa.field(KEY, KEY_TYPE)]
    fields += [f for f in tfile.schema_arrow if f.name != KEY]
    plan: list[tuple[MergeInput, list[str], list[str]]] = []
    widest = len(tfile.schema_arrow)
    for inp in features:
        schema = _open(inp).schema_arrow
        if KEY not in schema.names:
            raise BadCheckpoint(f"{inp.table}: no {KEY} column")
        names = [f.name for f in schema if f.name != KEY]
        out_names = [f"{inp.prefix}_{c}" for c in names]
        fields += [pa.field(o, schema.field(c).type) for c, o in zip(names, out_names, strict=True)]
        plan.append((inp, names, out_names))
        widest = max(widest, len(names))
    out_schema = pa.schema(fields)
    if len(set(out_schema.names)) != len(out_schema.names):
        raise TerminalError("merged column names collide; table prefixes must be unique")

    rows_per_group = group_rows_for(memory_budget, widest, workers, n)
    bounds = [(s, min(s + rows_per_group, n)) for s in range(0, n, rows_per_group)] or [(0, 0)]
    hashing = HashingWriter(sink)
    md = {"bqx.rows": str(n), **(metadata or {})}
    if n == 0:
        pq.write_table(out_schema.empty_table(), hashing, **WRITER_OPTIONS)  # type: ignore[arg-type]
        return MergeStats(rows=0, columns=len(out_schema), tables=len(features) + 1, bytes=hashing.size,
                          sha256=hashing.hash.hexdigest(), seconds=time.time() - started)
    stitcher = Stitcher(hashing, out_schema, [e - s for s, e in bounds], **WRITER_OPTIONS)  # type: ignore[arg-type]
    stats = MergeStats(rows=n, columns=len(out_schema), tables=len(features) + 1, row_groups=len(bounds),
                       group_rows=rows_per_group, workers=workers)

    # The targets: already aligned, just cut into the row groups.
    t_names = [f.name for f in tfile.schema_arrow]
    t_cursor = Aligner(targets.table, tfile.iter_batches(batch_size=rows_per_group, columns=t_names),
                       [c for c in t_names if c != KEY])
    for g, (s, e) in enumerate(bounds):
        part = t_cursor.align(keys[s:e])
        stitcher.add(g, part.add_column(0, KEY, pa.array(keys[s:e], type=pa.int64()).cast(KEY_TYPE)))

    done = [0]
    lock = threading.Lock()

    def one(inp: MergeInput, names: list[str], out_names: list[str]) -> tuple[str, float]:
        t0 = time.time()
        pf = _open(inp)
        cursor = Aligner(inp.table, pf.iter_batches(batch_size=rows_per_group, columns=[KEY, *names]), names)
        for g, (s, e) in enumerate(bounds):
            stitcher.add(g, cursor.align(keys[s:e]).rename_columns(out_names))
        with lock:
            done[0] += 1
            if progress:
                progress(done[0], len(plan))
        return inp.table, time.time() - t0

    with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
        futures = [pool.submit(one, *p) for p in plan]
        try:
            for fut in as_completed(futures):
                table, secs = fut.result()
                stats.table_seconds[table] = round(secs, 4)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    stitcher.close(md)
    stats.bytes = hashing.size
    stats.sha256 = hashing.hash.hexdigest()
    stats.seconds = time.time() - started
    return stats
