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

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc

from bqx import layout, runs
from bqx.catalog import KEY, Column, Manifest, TableEntry
from bqx.config import Settings
from bqx.errors import BadCheckpoint, TerminalError, TransientError
from bqx.extract.sources import Source, SourceTable, open_source
from bqx.gcp import storage
from bqx.logs import Log
from bqx.parquet.conventions import CHECKPOINT_ROW_GROUP, WRITER_OPTIONS, arrow_type, schema_of, type_name
from bqx.parquet.keys import key_micros

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


def build_manifest(pair: str, run_id: str, tables: list[SourceTable], source: str, row_limit: int) -> Manifest:
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
    return Manifest(pair, run_id, entries, source, row_limit, time.time())


def plan_reuse(settings: Settings, manifest: Manifest) -> Manifest:
    """`manifest` with `reused_from` set on each table that the pair's last published run holds unchanged
    (bqx.runs.unchanged) in a checkpoint that still exists (one listing of that run's checkpoints)."""
    found = runs.published(settings, manifest.pair)
    if found is None or found[1].run_id == manifest.run_id:
        return manifest
    previous = found[1]
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


def write_checkpoint(settings: Settings, source: Source, manifest: Manifest, entry: TableEntry) -> TableResult:
    result = TableResult(entry.name, started_at=time.time())
    schema = schema_of(entry.columns).with_metadata(
        {"bqx.pair": manifest.pair, "bqx.run_id": manifest.run_id, "bqx.table": entry.name}
    )
    blob = storage.bucket(settings, settings.staging_bucket).blob(entry.checkpoint)
    blob.metadata = {"run_id": manifest.run_id, "table": entry.name}
    previous: int | None = None
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    # Create-once (a duplicated task cannot replace a checkpoint that may be validated already), in one request
    # while it fits in UPLOAD_CHUNK; leaving the `with` on an exception uploads nothing.
    try:
        with storage.ObjectSink(blob, UPLOAD_CHUNK, UPLOAD_CHUNK, "application/vnd.apache.parquet",
                                if_generation_match=0) as sink:
            writer = pq.ParquetWriter(sink, schema, **WRITER_OPTIONS)
            try:
                for batch in source.read(entry.name, manifest.row_limit):
                    batch = _conform(batch, schema, entry.name)
                    keys = key_micros(entry.name, batch.column(KEY), previous)
                    previous = int(keys[-1]) if keys.size else previous
                    pending.append(batch)
                    pending_rows += batch.num_rows
                    if pending_rows >= CHECKPOINT_ROW_GROUP:
                        writer.write_table(pa.Table.from_batches(pending, schema),
                                           row_group_size=CHECKPOINT_ROW_GROUP)
                        result.rows += pending_rows
                        pending, pending_rows = [], 0
                if pending_rows or result.rows == 0:
                    writer.write_table(pa.Table.from_batches(pending, schema),
                                       row_group_size=CHECKPOINT_ROW_GROUP)
                    result.rows += pending_rows
                writer.close()
            except BaseException:
                writer.is_open = False  # the upload is being cancelled: no footer, no __del__ close
                raise
            result.bytes = sink.tell()
    except gexc.PreconditionFailed:
        # create-once: this checkpoint exists already (a duplicated task, or an attempt whose answer was lost)
        log.info("checkpoint already written; kept as it is", pair=manifest.pair, run_id=manifest.run_id,
                 table=entry.name)
        result.skipped = True
    result.seconds = time.time() - result.started_at
    return result


def copy_checkpoint(settings: Settings, source: Source, manifest: Manifest, entry: TableEntry) -> TableResult:
    """Copy the checkpoint of `entry.reused_from` to this run's name, server-side and create-once. If that checkpoint
    is gone meanwhile, the table is extracted instead (its fingerprint is the warehouse's current one)."""
    result = TableResult(entry.name, started_at=time.time(), reused=True, reused_from=entry.reused_from)
    bucket = storage.bucket(settings, settings.staging_bucket)
    src = bucket.blob(layout.checkpoint(manifest.pair, entry.reused_from, entry.name))
    dst = bucket.blob(entry.checkpoint)
    # Custom metadata of its own (not the source's validation marker): the completion function validates the copy.
    dst.metadata = {"run_id": manifest.run_id, "table": entry.name, "reused_from": entry.reused_from}
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
        return write_checkpoint(settings, source, manifest, entry)
    else:
        result.bytes = int(size)
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
    tables = source.discover(pair)
    planned = plan_reuse(settings, build_manifest(pair, run_id, tables, source.name, settings.row_limit))
    manifest = ensure_manifest(settings, planned)
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
    # Reads and copies in pools of their own: the copies (a request each) never wait behind the reads.
    with ThreadPoolExecutor(settings.extract_concurrency, thread_name_prefix="extract") as pool, \
            ThreadPoolExecutor(COPY_CONCURRENCY, thread_name_prefix="copy") as copier:
        futures = {
            (copier if entry.reused_from else pool).submit(
                _with_retries, settings, rlog,
                lambda e=entry: (copy_checkpoint if e.reused_from else write_checkpoint)(settings, source, manifest, e),
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
            save_report(settings, report, failed=True)
            raise
    report.seconds = time.time() - started
    save_report(settings, report)
    rlog.info("extract finished", written=report.written, reused=report.reused,
              skipped=len(report.tables) - report.written, seconds=round(report.seconds, 2))
    return report
