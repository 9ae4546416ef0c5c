"""Extract one pair: discover its tables, write the run manifest, stream each table to a Parquet checkpoint.

Checkpoints are written straight to GCS through a resumable upload (an object appears only once complete),
several tables at once, each with retries. A rerun of the same run id skips checkpoints already present.
Tasks of one execution shard the tables by index.

An unchanged table is not read again: when the manifest is planned, each table whose fingerprint (bqx.extract.sources),
columns and row limit are those of the pair's last published run, and whose checkpoint of that run still exists, is
marked `reused_from` that run; its checkpoint is then copied server-side (a rewrite, create-once like an upload, and
finalized like one: the completion function validates it as usual) instead of being extracted.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
from google.api_core import exceptions as gexc

from bqx import footer_index, layout, runs
from bqx.catalog import GRID_FILE_KEY, GRID_OBJECT_KEY, KEY, Column, Grid, IgnoredTable, Manifest, TableEntry
from bqx.config import Settings
from bqx.errors import BadCheckpoint, TerminalError, TransientError
from bqx.extract.sources import BATCH_ROWS, Discovery, Source, SourceTable, open_source
from bqx.gcp import storage
from bqx.logs import Log, peak_rss_mib
from bqx.parquet.conventions import (
    CHECKPOINT_ROW_GROUP,
    KEY_TYPE,
    CheckpointWriter,
    arrow_type,
    schema_of,
    type_name,
)
from bqx.parquet.keys import key_micros
from bqx.parquet.tails import FooterIndex, KeptFooter, KeptFooters, TailKeeper

UPLOAD_CHUNK = 8 * 1024 * 1024  # multiple of 256 KiB, as resumable uploads require
COPY_CONCURRENCY = 16  # server-side copies at once, beside the reads: each is one request's latency and no CPU here
log = Log("bqx.extract.run")


@dataclass
class TableResult:
    table: str
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    attempts: int = 0
    skipped: bool = False
    started_at: float = 0.0
    reused: bool = False  # copied from an earlier run's checkpoint, not read from the warehouse
    reused_from: str = ""


@dataclass
class ExtractReport:
    pair: str
    run_id: str
    task_index: int
    task_count: int
    tables: list[TableResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        """Checkpoints this task created: extracted or copied."""
        return sum(not t.skipped for t in self.tables)

    @property
    def reused(self) -> int:
        return sum(t.reused and not t.skipped for t in self.tables)


def build_manifest(pair: str, run_id: str, tables: list[SourceTable], source: str, row_limit: int,
                   grid: Grid | None = None, snapshot_at: float = 0.0,
                   ignored: tuple[IgnoredTable, ...] = ()) -> Manifest:
    entries = tuple(
        TableEntry(
            t.name,
            t.role,
            tuple(Column(c, type_name(arrow_type(ty))) for c, ty in t.columns),
            layout.checkpoint(pair, run_id, t.name),
            t.fingerprint,
        )
        for t in tables
    )
    manifest = Manifest(pair, run_id, entries, source, row_limit, time.time(), grid=grid, snapshot_at=snapshot_at,
                        ignored_tables=ignored)
    check_column_names(manifest)
    return manifest


def check_column_names(manifest: Manifest) -> None:
    """The training file's column names are unique: key, the targets' columns, then each feature's prefixed
    (layout.prefix_of). Checked when the manifest is built, before anything is read: a collision found by the merge
    costs a whole extract. Terminal, naming both tables and columns."""
    seen: dict[str, tuple[str, str]] = {KEY: (manifest.targets.name, KEY)}
    for t in (manifest.targets, *manifest.features):
        for c in t.value_columns:
            out = c.name if t.role == "targets" else f"{layout.prefix_of(manifest.pair, t.name)}_{c.name}"
            if out in seen:
                other_table, other_column = seen[out]
                raise TerminalError(f"column name collision in the training file of {manifest.pair}: column "
                                    f"{c.name!r} of table {t.name!r} and column {other_column!r} of table "
                                    f"{other_table!r} both become {out!r}; rename one of them in the warehouse")
            seen[out] = (t.name, c.name)


def grid_of(keys: np.ndarray) -> Grid:
    """The grid of the targets' ordered keys (int64 microseconds): row groups of CHECKPOINT_ROW_GROUP rows, as the
    targets' checkpoint is written (one empty row group for no rows)."""
    n = int(len(keys))
    groups = tuple(min(CHECKPOINT_ROW_GROUP, n - a) for a in range(0, n, CHECKPOINT_ROW_GROUP)) or (0,)
    return Grid(n, groups, keys_digest([keys]))


def keys_digest(chunks: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in chunks:
        h.update(np.ascontiguousarray(k, dtype="<i8").tobytes())
    return h.hexdigest()


def target_keys(source: Source, targets: str, row_limit: int, snapshot_at: float) -> np.ndarray:
    """The targets' first `row_limit` keys (all when 0), as of the snapshot: the source's own key read (the key
    column only), else its ordinary read. Duplicates are the targets' DuplicateKeys."""
    keys_of = getattr(source, "keys", None)
    if keys_of is not None:
        keys = keys_of(targets, row_limit, snapshot_at=snapshot_at)
    else:
        cols = [b.column(KEY) for b in _read(source, targets, row_limit, snapshot_at)]
        keys = (pa.chunked_array(cols).combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False)
                if cols else np.zeros(0, dtype=np.int64))
    return key_micros(targets, pa.array(np.asarray(keys, dtype=np.int64)).cast(KEY_TYPE))


def _read(source: Source, table: str, row_limit: int, snapshot_at: float) -> Iterator[pa.RecordBatch]:
    # A source whose read takes no snapshot (a stand-in of the tests) reads as of now.
    if snapshot_at and "snapshot_at" in inspect.signature(source.read).parameters:
        return source.read(table, row_limit, snapshot_at=snapshot_at)
    return source.read(table, row_limit)


def plan_reuse(settings: Settings, manifest: Manifest) -> Manifest:
    """`manifest` with `reused_from` set on each table that the pair's last published run holds unchanged
    (bqx.runs.unchanged) in a checkpoint that still exists (one listing of that run's checkpoints)."""
    found = runs.published(settings, manifest.pair)
    if found is None or found[1].run_id == manifest.run_id:
        return manifest
    previous = found[1]
    if previous.grid != manifest.grid:  # its checkpoints are aligned on other keys (or not at all): extract again
        return manifest
    same = runs.unchanged(previous, manifest)
    if not same:
        return manifest
    present = storage.list_names(settings, settings.staging_bucket,
                                 layout.checkpoints_prefix(manifest.pair, previous.run_id))
    entries = tuple(replace(t, reused_from=previous.run_id) if t.name in same and same[t.name].checkpoint in present
                    else t for t in manifest.tables)
    return replace(manifest, tables=entries)


def ensure_manifest(settings: Settings, manifest: Manifest) -> Manifest:
    """Write the manifest once; every later task or rerun works from the one that was written first."""
    name = layout.manifest(manifest.pair, manifest.run_id)
    if storage.create_json(settings, settings.staging_bucket, name, manifest.to_json()) is not None:
        return manifest
    existing = storage.read_json(settings, settings.staging_bucket, name)
    if existing is None:
        raise BadCheckpoint(f"manifest {name} disappeared")
    found = Manifest.from_json(existing[0])
    if [t.name for t in found.tables] != [t.name for t in manifest.tables]:
        log.warning("warehouse changed since this run's manifest was written; following the manifest",
                    pair=manifest.pair, run_id=manifest.run_id)
    return found


def _conform(batch: pa.RecordBatch, schema: pa.Schema, table: str) -> pa.RecordBatch:
    if batch.schema.names != schema.names:
        raise BadCheckpoint(f"table {table!r} columns {batch.schema.names[:5]}... differ from its manifest")
    if batch.schema == schema:
        return batch
    try:
        return batch.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise BadCheckpoint(f"table {table!r} does not match its manifest schema: {exc}") from exc


class _GridKeys:
    """The run's grid keys, read once per task when a table must be aligned in Python (a source without
    `read_aligned`); checked against the manifest's digest."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: np.ndarray | None = None

    def get(self, source: Source, manifest: Manifest) -> np.ndarray:
        with self.lock:
            if self.keys is None:
                keys = target_keys(source, manifest.targets.name, manifest.row_limit, manifest.snapshot_at)
                if manifest.grid is None or grid_of(keys) != manifest.grid:
                    raise TerminalError(f"the targets' keys of {manifest.pair} differ from run {manifest.run_id}'s "
                                        "grid: the targets changed since its manifest was written; start a new run")
                self.keys = keys
            return self.keys


def _align(batches: Iterator[pa.RecordBatch], keys: np.ndarray, schema: pa.Schema,
           table: str) -> Iterator[pa.RecordBatch]:
    """A LEFT JOIN onto `keys` in Python, streaming: a table's ordered batches -> exactly the grid's rows in order,
    nulls where the table lacks a key. Every key of the table is checked (sorted, unique), not only the grid's."""
    n = len(keys)
    done_to = 0  # grid rows emitted
    matched: list[pa.Table] = []
    positions: list[np.ndarray] = []
    previous: int | None = None

    def emit(upto: int) -> Iterator[pa.RecordBatch]:
        nonlocal done_to, matched, positions
        while done_to < upto:
            b = min(upto, done_to + BATCH_ROWS)
            m = pa.concat_tables(matched) if matched else schema.empty_table()
            p = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
            used = int(np.searchsorted(p, b))
            idx = np.full(b - done_to, -1, dtype=np.int64)
            idx[p[:used] - done_to] = np.arange(used)
            out = m.take(pa.array(idx, mask=idx < 0))
            out = out.set_column(out.schema.get_field_index(KEY), pa.field(KEY, KEY_TYPE),
                                 pa.array(keys[done_to:b]).cast(KEY_TYPE))
            matched, positions = ([m.slice(used)], [p[used:]]) if used < len(p) else ([], [])
            done_to = b
            yield from out.combine_chunks().to_batches()

    for batch in batches:
        batch = _conform(batch, schema, table)
        k = key_micros(table, batch.column(KEY), previous)
        if batch.num_rows == 0:
            continue
        previous = int(k[-1])
        pos = np.searchsorted(keys, k)
        hit = (pos < n) & (keys[np.minimum(pos, n - 1)] == k) if n else np.zeros(len(k), dtype=bool)
        if hit.any():
            matched.append(pa.Table.from_batches([batch.filter(pa.array(hit))]))
            positions.append(pos[hit])
        ready = int(np.searchsorted(keys, k[-1], side="right"))  # no later row can match a grid row up to here
        if ready - done_to >= BATCH_ROWS:
            yield from emit(ready - (ready - done_to) % BATCH_ROWS)
    yield from emit(n)


def _batches(source: Source, manifest: Manifest, entry: TableEntry, schema: pa.Schema,
             grid_keys: _GridKeys) -> Iterator[pa.RecordBatch]:
    """The rows of `entry`'s checkpoint: with a grid, every table LEFT JOINed onto the targets' keys (in the query
    when the source can, else in Python); the targets themselves are their own first `row_limit` rows."""
    snap = manifest.snapshot_at
    if manifest.grid is None or entry.role == "targets":
        return _read(source, entry.name, manifest.row_limit, snap)
    aligned = getattr(source, "read_aligned", None)
    if aligned is not None:
        return aligned(entry.name, manifest.targets.name, manifest.row_limit, snapshot_at=snap)
    keys = grid_keys.get(source, manifest)
    return _align(_read(source, entry.name, 0, snap), keys, schema, entry.name)


def write_checkpoint(settings: Settings, source: Source, manifest: Manifest, entry: TableEntry,
                     grid_keys: _GridKeys | None = None, footers: FooterIndex | None = None) -> TableResult:
    """Stream the table to its checkpoint; its footer, once uploaded, goes into `footers` (the task's index)."""
    result = TableResult(entry.name, started_at=time.time())
    grid = manifest.grid
    meta = {"bqx.pair": manifest.pair, "bqx.run_id": manifest.run_id, "bqx.table": entry.name}
    if grid:  # the compose merge reads alignment from the footer: this digest names the rows it holds
        meta[GRID_FILE_KEY] = grid.keys_sha256
    schema = schema_of(entry.columns).with_metadata(meta)
    blob = storage.bucket(settings, settings.staging_bucket).blob(entry.checkpoint)
    blob.metadata = {"run_id": manifest.run_id, "table": entry.name, **({GRID_OBJECT_KEY: grid.keys_sha256} if grid
                                                                          else {})}
    previous: int | None = None
    digest = hashlib.sha256()
    pending: pa.Table | None = None
    # Create-once (a duplicated task cannot replace a checkpoint that may be validated already), in one request
    # while it fits in UPLOAD_CHUNK; leaving the `with` on an exception uploads nothing.
    try:
        with storage.ObjectSink(blob, UPLOAD_CHUNK, UPLOAD_CHUNK, "application/vnd.apache.parquet",
                                if_generation_match=0) as sink:
            keeper = TailKeeper(sink)
            writer = CheckpointWriter(keeper, schema)
            try:
                for batch in _batches(source, manifest, entry, schema, grid_keys or _GridKeys()):
                    batch = _conform(batch, schema, entry.name)
                    keys = key_micros(entry.name, batch.column(KEY), previous)
                    previous = int(keys[-1]) if keys.size else previous
                    digest.update(np.ascontiguousarray(keys, dtype="<i8").tobytes())
                    part = pa.Table.from_batches([batch], schema)
                    pending = part if pending is None else pa.concat_tables([pending, part])
                    # Row groups of exactly CHECKPOINT_ROW_GROUP rows: at the grid's boundaries.
                    while pending.num_rows >= CHECKPOINT_ROW_GROUP:
                        writer.write_table(pending.slice(0, CHECKPOINT_ROW_GROUP), row_group_size=CHECKPOINT_ROW_GROUP)
                        result.rows += CHECKPOINT_ROW_GROUP
                        pending = pending.slice(CHECKPOINT_ROW_GROUP)
                if (pending is not None and pending.num_rows) or result.rows == 0:
                    last = pending if pending is not None else schema.empty_table()
                    writer.write_table(last, row_group_size=CHECKPOINT_ROW_GROUP)
                    result.rows += last.num_rows
                if grid and (result.rows != grid.rows or digest.hexdigest() != grid.keys_sha256):
                    raise TerminalError(
                        f"table {entry.name!r}: {result.rows} aligned rows whose keys differ from run "
                        f"{manifest.run_id}'s grid ({grid.rows} rows): the targets changed since its manifest was "
                        "written; start a new run")
                writer.close()
            except BaseException:
                writer.is_open = False  # the upload is being cancelled: no footer, no __del__ close
                raise
            result.bytes = sink.tell()
        if footers is not None:
            footers.add(entry.checkpoint, keeper.footer())
    except gexc.PreconditionFailed:
        # create-once: this checkpoint exists already (a duplicated task, or an attempt whose answer was lost)
        log.info("checkpoint already written; kept as it is", pair=manifest.pair, run_id=manifest.run_id,
                 table=entry.name)
        result.skipped = True
    result.seconds = time.time() - result.started_at
    return result


class _ReusedFooters:
    """The footer indexes of the runs whose checkpoints this task copies, each read once."""

    def __init__(self) -> None:
        self.runs: dict[str, KeptFooters] = {}
        self.lock = threading.Lock()

    def find(self, settings: Settings, pair: str, run_id: str, name: str, size: int,
             crc32c: str | None) -> KeptFooter | None:
        """The footer run `run_id` kept of its object `name`, if that object was `size` bytes of crc32c `crc32c`."""
        with self.lock:
            if run_id not in self.runs:
                self.runs[run_id] = footer_index.load(settings, pair, run_id)[0]
            return self.runs[run_id].find(name, size, crc32c)


def copy_checkpoint(settings: Settings, source: Source, manifest: Manifest, entry: TableEntry,
                    footers: FooterIndex | None = None, reused: _ReusedFooters | None = None) -> TableResult:
    """Copy the checkpoint of `entry.reused_from` to this run's name, server-side and create-once. If that checkpoint
    is gone meanwhile, the table is extracted instead (its fingerprint is the warehouse's current one). The copy's
    footer is the original's, as that run's index kept it (if it did): it goes into `footers`."""
    result = TableResult(entry.name, started_at=time.time(), reused=True, reused_from=entry.reused_from)
    bucket = storage.bucket(settings, settings.staging_bucket)
    src = bucket.blob(layout.checkpoint(manifest.pair, entry.reused_from, entry.name))
    dst = bucket.blob(entry.checkpoint)
    # Custom metadata of its own (not the source's validation marker): the completion function validates the copy.
    dst.metadata = {"run_id": manifest.run_id, "table": entry.name, "reused_from": entry.reused_from,
                    **({GRID_OBJECT_KEY: manifest.grid.keys_sha256} if manifest.grid else {})}
    dst.content_type = "application/vnd.apache.parquet"
    try:
        token, _, size = dst.rewrite(src, if_generation_match=0)
        while token is not None:  # large objects across locations or classes take several calls; same bucket, one
            token, _, size = dst.rewrite(src, token=token, if_generation_match=0)
    except gexc.PreconditionFailed:
        log.info("checkpoint already written; kept as it is", pair=manifest.pair, run_id=manifest.run_id,
                 table=entry.name)
        result.skipped = True
    except gexc.NotFound:
        log.warning("the checkpoint to reuse is gone; extracting the table", pair=manifest.pair,
                    run_id=manifest.run_id, table=entry.name, reused_from=entry.reused_from)
        return write_checkpoint(settings, source, manifest, entry, footers=footers)
    else:
        result.bytes = int(size)
        if footers is not None and reused is not None:
            # the copy is the original's bytes: the footer kept of the original, if its size and crc32c are the copy's
            footers.add(dst.name, reused.find(settings, manifest.pair, entry.reused_from, src.name,
                                              int(dst.size or 0), dst.crc32c))
    result.seconds = time.time() - result.started_at
    return result


def save_report(settings: Settings, report: ExtractReport, failed: bool = False) -> None:
    """This task attempt's report: per-table timings for `bqx report`, and, when it did not fail, the signal the
    completion function waits for before it asks whether the run is complete (bqx.completion.handler). So a
    success report that cannot be written fails the task transiently (retried; the rerun skips what is written);
    a failure report is best effort (the task is failing anyway)."""
    attempt = settings.task.attempt
    body = {**asdict(report), "failed": failed, "attempt": attempt, "finished_at": time.time()}
    try:
        storage.write_json(settings, settings.staging_bucket,
                           layout.extract_report(report.pair, report.run_id, report.task_index, attempt), body)
    except Exception as exc:
        log.warning(f"could not save the extract report: {exc}", pair=report.pair, run_id=report.run_id)
        if not failed:
            raise TransientError(f"could not save the extract report: {exc}") from exc


class _Progress:
    """Per-table log lines plus a summary at most once a minute."""

    def __init__(self, log: Log, total: int) -> None:
        self.log, self.total, self.done, self.rows = log, total, 0, 0
        self.start = self.last = time.time()
        self.lock = threading.Lock()

    def table_done(self, r: TableResult) -> None:
        with self.lock:
            self.done += 1
            self.rows += r.rows
            self.log.info("checkpoint reused" if r.reused else "checkpoint written", table=r.table, rows=r.rows,
                          bytes=r.bytes, seconds=round(r.seconds, 3), attempts=r.attempts, done=self.done,
                          total=self.total, **({"reused_from": r.reused_from} if r.reused else {}))
            now = time.time()
            if now - self.last >= 60 or self.done == self.total:
                rate = self.done / max(now - self.start, 1e-9)
                eta = (self.total - self.done) / rate if rate else None
                self.log.info("extract progress", done=self.done, total=self.total, rows=self.rows,
                              tables_per_second=round(rate, 2), eta_seconds=round(eta or 0, 1))
                self.last = now


def _with_retries(settings: Settings, log: Log, fn, table: str) -> TableResult:  # type: ignore[no-untyped-def]
    delay = 1.0
    for attempt in range(1, settings.extract_retries + 1):
        try:
            result = fn()
            result.attempts = attempt
            return result
        except TerminalError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else may pass on another try
            if attempt == settings.extract_retries:
                raise
            log.warning("table failed, retrying", table=table, attempt=attempt, error=str(exc)[:500])
            time.sleep(delay)
            delay = min(delay * 2, 30)
    raise AssertionError("unreachable")


def plan(settings: Settings, source: Source, pair: str, run_id: str, rlog: Log = log) -> Manifest:
    """The run's manifest as this task would write it: the pair's tables, the snapshot every read is pinned to, and
    the grid (the targets' first `row_limit` keys as of the snapshot). A row limit always aligns: it limits the
    targets, and every table to the targets' keys (a table's own first rows may share none with them)."""
    discover_all = getattr(source, "discover_all", None)
    found = discover_all(pair) if discover_all is not None else Discovery(source.discover(pair))
    for t in found.ignored:
        rlog.warning("table ignored", table=t.name, reason=t.reason)
    snapshot_at = time.time()
    grid = None
    if settings.extract_aligned or settings.row_limit:
        grid = grid_of(target_keys(source, found.tables[0].name, settings.row_limit, snapshot_at))
    return build_manifest(pair, run_id, found.tables, source.name, settings.row_limit, grid, snapshot_at,
                          found.ignored)


def run(
    settings: Settings,
    pair: str,
    run_id: str,
    task_index: int = 0,
    task_count: int = 1,
    source: Source | None = None,
) -> ExtractReport:
    started = time.time()
    rlog = log.bind(pair=pair, run_id=run_id, stage="extract")
    source = source or open_source(settings)
    # A sharded extract's tasks, and reruns, follow the manifest written first (its grid and snapshot among all).
    written = storage.read_json(settings, settings.staging_bucket, layout.manifest(pair, run_id))
    manifest = (Manifest.from_json(written[0]) if written is not None
                else ensure_manifest(settings, plan_reuse(settings, plan(settings, source, pair, run_id, rlog))))
    mine = [t for i, t in enumerate(manifest.tables) if i % task_count == task_index]
    present = storage.list_names(settings, settings.staging_bucket, layout.checkpoints_prefix(pair, run_id))
    report = ExtractReport(pair, run_id, task_index, task_count)
    todo = []
    for entry in mine:
        if entry.checkpoint in present:
            report.tables.append(TableResult(entry.name, skipped=True))
        else:
            todo.append(entry)
    reuse = sum(bool(e.reused_from) for e in todo)
    rlog.info("extract starting", tables=len(manifest.tables), mine=len(mine), todo=len(todo),
              skipped=len(mine) - len(todo), reuse=reuse, extract=len(todo) - reuse, task_index=task_index,
              task_count=task_count, source=source.name)
    progress = _Progress(rlog, len(todo))
    grid_keys = _GridKeys()
    footers, reused_footers = FooterIndex(), _ReusedFooters()
    # Reads and copies in pools of their own: the copies (a request each) never wait behind the reads.
    with ThreadPoolExecutor(settings.extract_concurrency, thread_name_prefix="extract") as pool, \
            ThreadPoolExecutor(COPY_CONCURRENCY, thread_name_prefix="copy") as copier:
        futures = {
            (copier if entry.reused_from else pool).submit(
                _with_retries, settings, rlog,
                lambda e=entry: copy_checkpoint(settings, source, manifest, e, footers, reused_footers)
                if e.reused_from else write_checkpoint(settings, source, manifest, e, grid_keys, footers),
                entry.name): entry
            for entry in todo
        }
        try:
            for fut in as_completed(futures):
                r = fut.result()
                report.tables.append(r)
                progress.table_done(r)
        except BaseException:
            for fut in futures:
                fut.cancel()
            report.seconds = time.time() - started
            footer_index.save(settings, pair, run_id, task_index, footers)
            save_report(settings, report, failed=True)
            raise
    report.seconds = time.time() - started
    footer_index.save(settings, pair, run_id, task_index, footers)  # before the report that may start the merge
    save_report(settings, report)
    rlog.info("extract finished", written=report.written, reused=report.reused,
              skipped=len(report.tables) - report.written, seconds=round(report.seconds, 2),
              peak_rss_mib=peak_rss_mib())
    return report
