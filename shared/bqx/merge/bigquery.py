"""The `bigquery` merge method: a staged plan that stays inside BigQuery's limits, then a streaming stitch.

A pair's merged table has ~17,000 columns (BigQuery tables hold at most 10,000), 668 inputs (a query may
reference at most 1,000 tables, and hundreds of joins fail as "too complex"), and gigabytes of output (an
export over 1 GB needs a wildcard URI). So no single join or export can do it. The plan:

1. **Load** every checkpoint (Parquet, microsecond UTC timestamps) into a table of the temporary dataset,
   which is created with a default table expiration as a backstop. Load jobs are free.
2. **Stages**: the feature tables, in manifest order, are cut into batches of at most `max_joins` joins and
   `max_columns` output columns. Each stage is one `EXPORT DATA ... AS SELECT` of the targets' keys LEFT
   JOINed with its batch, `ORDER BY interval_time`, to a wildcard URI: BigQuery distributes a sorted export
   sequentially across the files, so reading them in name order yields the rows in key order. A dry run of
   each stage's SELECT gives the bytes it will bill before anything runs.
3. **Stitch**: the stage exports are read in order, one row group at a time, cut into the output's row groups
   and appended as column chunks (bqx.merge.stitch), so the merge job holds one stage's row group, never the file.
   Every stage's keys must equal the targets' keys, row for row.
4. **Clean up**: temp tables are deleted in a `finally`, success or failure. Exports are deleted after a
   successful stitch and kept after a failure, so a retry resumes.

Job ids are deterministic: pair, run, step, a digest of the job's configuration and an attempt number. A
retried merge job that inserts a job again gets 409 `duplicate` and reattaches to the existing one, so a
finished stage is never paid for twice; a finished stage whose export files exist is skipped outright.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx import layout
from bqx.catalog import KEY, Manifest, TableEntry
from bqx.config import Settings
from bqx.errors import BadCheckpoint, TerminalError, TransientError
from bqx.extract.sources import quote_bigquery
from bqx.gcp import storage
from bqx.gcp.clients import bigquery_client, is_transient
from bqx.ids import digest
from bqx.logs import Log
from bqx.merge.plan import CountingWriter, MergeJob, MergeStats, output_schema, stitch_group_rows, targets_rows
from bqx.merge.stitch import Stitcher
from bqx.parquet.conventions import WRITER_OPTIONS
from bqx.parquet.keys import key_micros
from bqx.pricing import BIGQUERY_PER_TIB_SCANNED, TIB

log = Log("bqx.bigquery")

# BigQuery's hard limits (https://cloud.google.com/bigquery/quotas).
MAX_TABLE_COLUMNS = 10_000
MAX_TABLES_PER_QUERY = 1_000
MAX_QUERY_CHARS = 1024 * 1024  # unresolved GoogleSQL query length
# What a stage uses: well inside the limits ("too complex" appears with hundreds of joins).
STAGE_MAX_JOINS = 48
STAGE_MAX_COLUMNS = 4_000
STAGE_MAX_SQL_CHARS = 256 * 1024

TEMP_TABLE_TTL_MS = 24 * 3600 * 1000  # backstop: the temp dataset's default table expiration
LOAD_CONCURRENCY = 8  # below the client's HTTP connection pool (10)
STAGE_CONCURRENCY = 4
JOB_ATTEMPTS = 5  # attempt suffixes tried when an existing job with the same id failed or lost its output
READ_CHUNK = 4 * 1024 * 1024
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_joins: int = STAGE_MAX_JOINS
    max_columns: int = STAGE_MAX_COLUMNS
    max_sql_chars: int = STAGE_MAX_SQL_CHARS

    def __post_init__(self) -> None:
        if not 1 <= self.max_joins < MAX_TABLES_PER_QUERY:
            raise TerminalError(f"max_joins must be in 1..{MAX_TABLES_PER_QUERY - 1}")
        if not 2 <= self.max_columns <= MAX_TABLE_COLUMNS:
            raise TerminalError(f"max_columns must be in 2..{MAX_TABLE_COLUMNS}")
        if self.max_sql_chars > MAX_QUERY_CHARS:
            raise TerminalError(f"max_sql_chars must be at most {MAX_QUERY_CHARS}")


@dataclass(frozen=True)
class Load:
    table: TableEntry
    source_uri: str
    temp_table: str  # table id in the temp dataset


@dataclass(frozen=True)
class Stage:
    index: int
    features: tuple[TableEntry, ...]
    with_targets: bool  # stage 0 also carries the targets' value columns
    columns: tuple[str, ...]  # output names, key first
    select_sql: str
    export_sql: str
    export_prefix: str  # object prefix (staging bucket) of this stage's files
    key: str  # digest of the stage's SQL: part of its job id and its export prefix

    @property
    def joins(self) -> int:
        return len(self.features)

    @property
    def tables(self) -> int:
        return len(self.features) + 1


@dataclass(frozen=True)
class Plan:
    project: str
    dataset: str
    pair: str
    run_id: str
    bucket: str
    loads: tuple[Load, ...]
    stages: tuple[Stage, ...]
    schema: pa.Schema

    def statements(self) -> list[str]:
        """Every SQL statement the plan runs (the exports) or dry-runs (their SELECTs)."""
        return [s for st in self.stages for s in (st.select_sql, st.export_sql)]

    def job_id(self, step: str, config_key: str, attempt: int) -> str:
        return layout.bigquery_job_id(self.pair, self.run_id, step, config_key, attempt)


@dataclass
class BigQueryMergeStats(MergeStats):
    stages: int = 0
    stages_reused: int = 0
    loads: int = 0
    bytes_processed: int = 0
    estimated_cost_usd: float = 0.0
    job_ids: list[str] = field(default_factory=list)


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def batch_features(manifest: Manifest, limits: Limits) -> list[list[TableEntry]]:
    """Feature tables in manifest order, cut so each stage has <= max_joins joins and <= max_columns columns."""
    batches: list[list[TableEntry]] = [[]]
    width = 1 + len(manifest.targets.value_columns)  # stage 0: key + the targets' columns
    if width > limits.max_columns:
        raise TerminalError(f"the targets table alone has {width} columns, over the stage limit")
    for t in manifest.features:
        w = len(t.value_columns)
        if 1 + w > limits.max_columns:
            raise TerminalError(f"table {t.name} has {w} value columns, over the stage limit {limits.max_columns}")
        if batches[-1] and (len(batches[-1]) >= limits.max_joins or width + w > limits.max_columns):
            batches.append([])
            width = 1
        batches[-1].append(t)
        width += w
    return batches


def build_plan(settings: Settings, manifest: Manifest, project: str, limits: Limits | None = None) -> Plan:
    limits = limits or Limits()
    pair, run_id, dataset = manifest.pair, manifest.run_id, settings.temp_dataset
    bucket = settings.staging_bucket
    loads = tuple(
        Load(t, f"gs://{bucket}/{t.checkpoint}", layout.bigquery_temp_table(pair, run_id, t.name))
        for t in manifest.tables
    )
    temp = {ld.table.name: f"{quote_bigquery(project)}.{quote_bigquery(dataset)}.{quote_bigquery(ld.temp_table)}"
            for ld in loads}
    q = quote_bigquery
    stages = []
    for i, batch in enumerate(batch_features(manifest, limits)):
        select = [f"t.{q(KEY)} AS {q(KEY)}"]
        names = [KEY]
        if i == 0:
            for c in manifest.targets.value_columns:
                select.append(f"t.{q(c.name)} AS {q(c.name)}")
                names.append(c.name)
        joins = []
        for j, f in enumerate(batch, start=1):
            prefix = layout.prefix_of(pair, f.name)
            for c in f.value_columns:
                select.append(f"j{j}.{q(c.name)} AS {q(f'{prefix}_{c.name}')}")
                names.append(f"{prefix}_{c.name}")
            joins.append(f"LEFT JOIN {temp[f.name]} AS j{j} ON j{j}.{q(KEY)} = t.{q(KEY)}")
        select_sql = (
            "SELECT\n  " + ",\n  ".join(select) + f"\nFROM {temp[manifest.targets.name]} AS t\n"
            + "".join(j + "\n" for j in joins) + f"ORDER BY t.{q(KEY)}"
        )
        key = digest("stage", select_sql, length=12)
        prefix = layout.bigquery_stage_exports(pair, run_id, i, key)
        uri = f"gs://{bucket}/{prefix}part-*.parquet"
        export_sql = (
            f"EXPORT DATA OPTIONS (uri = {_sql_string(uri)}, format = 'PARQUET', overwrite = true) AS\n"
            + select_sql
        )
        if len(names) > limits.max_columns or len(export_sql) > limits.max_sql_chars:
            raise TerminalError(f"stage {i} exceeds its limits ({len(names)} columns, {len(export_sql)} chars)")
        stages.append(Stage(i, tuple(batch), i == 0, tuple(names), select_sql, export_sql, prefix, key))
    return Plan(project, dataset, pair, run_id, bucket, loads, tuple(stages), output_schema(manifest))


# ------------------------------------------------------------------------------------------ BigQuery calls


def _classify(exc: Exception, what: str) -> Exception:
    return (TransientError if is_transient(exc) else TerminalError)(f"{what}: {exc}")


class Runner:
    """Runs the plan's jobs with deterministic ids; reattaches to jobs that already exist."""

    def __init__(self, client: Any, plan: Plan, settings: Settings, location: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.plan = plan
        self.location = location
        self.job_ids: list[str] = []

    def _job(self, step: str, config_key: str, insert: Callable[[str], Any],
             usable: Callable[[Any], bool] = lambda job: True) -> Any:
        """Insert (or reattach to) the job for `step`, wait for it, return it. Raises Terminal/TransientError."""
        from google.api_core import exceptions as gexc

        for attempt in range(JOB_ATTEMPTS):
            job_id = self.plan.job_id(step, config_key, attempt)
            try:
                job = insert(job_id)
            except gexc.Conflict:
                job = self.client.get_job(job_id, location=self.location)
                if job.state == "DONE" and (job.error_result or not usable(job)):
                    log.info("existing job failed or lost its output; next attempt", job_id=job_id)
                    continue
                log.info("reattached to an existing job", job_id=job_id, state=job.state)
            except gexc.GoogleAPICallError as exc:
                raise _classify(exc, f"{step}: inserting job {job_id}") from exc
            try:
                job.result()
            except gexc.GoogleAPICallError as exc:
                raise _classify(exc, f"{step}: job {job_id} failed") from exc
            self.job_ids.append(job_id)
            return job
        raise TransientError(f"{step}: {JOB_ATTEMPTS} attempts of job {self.plan.job_id(step, config_key, 0)} failed")

    def ensure_dataset(self) -> None:
        from google.cloud import bigquery

        ds = bigquery.Dataset(f"{self.plan.project}.{self.plan.dataset}")
        ds.default_table_expiration_ms = TEMP_TABLE_TTL_MS
        ds.description = "bqx merge temporary tables (deleted after each merge; expiring as a backstop)"
        if self.location:
            ds.location = self.location
        found = self.client.create_dataset(ds, exists_ok=True)
        if not found.default_table_expiration_ms:
            log.warning("temp dataset has no default table expiration; tables rely on the merge's cleanup",
                        dataset=self.plan.dataset)

    def load(self, ld: Load) -> Any:
        from google.cloud import bigquery

        config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET,
                                        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
                                        create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED)
        dest = f"{self.plan.project}.{self.plan.dataset}.{ld.temp_table}"
        key = digest("load", ld.source_uri, dest, length=12)

        def exists(job: Any) -> bool:
            from google.api_core import exceptions as gexc

            try:
                self.client.get_table(dest)
                return True
            except gexc.NotFound:
                return False

        return self._job(f"load_{ld.table.name}", key, lambda job_id: self.client.load_table_from_uri(
            ld.source_uri, dest, job_id=job_id, job_config=config, location=self.location), exists)

    def dry_run(self, stage: Stage) -> int:
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        try:
            job = self.client.query(stage.select_sql, location=self.location,
                                    job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False))
        except gexc.GoogleAPICallError as exc:
            raise _classify(exc, f"stage {stage.index}: dry run") from exc
        return int(job.total_bytes_processed or 0)

    def export(self, stage: Stage) -> Any:
        """Run the stage's export; a finished job whose files are gone (cleaned up) runs again as a new attempt."""
        return self._job(f"stage{stage.index:03d}", stage.key, lambda job_id: self.client.query(
            stage.export_sql, job_id=job_id, location=self.location, job_retry=None),
            lambda job: bool(_stage_files(self.settings, stage)))

    def finished(self, stage: Stage) -> bool:
        """A stage is finished when one of its export jobs is DONE without error (its files are checked apart)."""
        from google.api_core import exceptions as gexc

        for attempt in range(JOB_ATTEMPTS):
            try:
                job = self.client.get_job(self.plan.job_id(f"stage{stage.index:03d}", stage.key, attempt),
                                          location=self.location)
            except gexc.NotFound:
                return False
            if job.state == "DONE" and not job.error_result:
                return True
        return False

    def delete_tables(self, names: list[str]) -> list[str]:
        """Delete temp tables; returns those that could not be deleted (logged, never raised)."""
        failed = []
        for name in names:
            try:
                self.client.delete_table(f"{self.plan.project}.{self.plan.dataset}.{name}", not_found_ok=True)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the run's own error
                log.warning("temp table not deleted (it expires on its own)", table=name, error=str(exc)[:300])
                failed.append(name)
        return failed


# ------------------------------------------------------------------------------------------ stitching


def _stage_files(settings: Settings, stage: Stage) -> list[str]:
    return sorted(n for n in storage.list_names(settings, settings.staging_bucket, stage.export_prefix)
                  if n.endswith(".parquet"))


def _batches(settings: Settings, names: list[str], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    bucket = storage.bucket(settings, settings.staging_bucket)
    for name in names:
        with bucket.blob(name).open("rb", chunk_size=READ_CHUNK) as f:
            pf = pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise BadCheckpoint(f"export {name} lacks columns {missing[:3]}")
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def _groups(batches: Iterator[pa.RecordBatch], bounds: list[tuple[int, int]], what: str) -> Iterator[pa.Table]:
    """Re-cut a stream of batches into tables of exactly the row groups' sizes."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for s, e in bounds:
        need = e - s
        while have < need:
            try:
                b = next(batches)
            except StopIteration:
                raise BadCheckpoint(f"{what}: {s + have} rows, expected at least {e}") from None
            pending.append(b)
            have += b.num_rows
        table = pa.Table.from_batches(pending)
        yield table.slice(0, need)
        rest = table.slice(need)
        pending, have = rest.to_batches(), rest.num_rows
    if have or next(batches, None) is not None:
        raise BadCheckpoint(f"{what}: more rows than the targets' {bounds[-1][1]}")


def stitch(settings: Settings, plan: Plan, rows: int, sink: BinaryIO, memory_budget: int,
           metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """Stage exports -> one Parquet file in `sink`. Returns (bytes, rows per row group)."""
    widest = max(len(st.columns) for st in plan.stages)
    group = stitch_group_rows(memory_budget, widest, rows)
    bounds = [(s, min(s + group, rows)) for s in range(0, rows, group)]
    counting = CountingWriter(sink)
    md = {"bqx.rows": str(rows), **(metadata or {})}
    if rows == 0:
        pq.write_table(plan.schema.empty_table(), counting, **WRITER_OPTIONS)  # type: ignore[arg-type]
        return counting.size, 0
    stitcher = Stitcher(counting, plan.schema, [e - s for s, e in bounds], **WRITER_OPTIONS)  # type: ignore[arg-type]
    keys: np.ndarray | None = None
    for st in plan.stages:
        files = _stage_files(settings, st)
        if not files:
            raise BadCheckpoint(f"stage {st.index} exported no files under {st.export_prefix}")
        what = f"stage {st.index} export"
        stream = _batches(settings, files, list(st.columns), min(group, 65_536))
        for g, part in enumerate(_groups(stream, bounds, what)):
            s, e = bounds[g]
            if keys is None:
                keys = np.empty(rows, dtype=np.int64)
            if st.index == 0:
                keys[s:e] = key_micros(what, part.column(KEY), int(keys[s - 1]) if s else None)
                stitcher.add(g, part)
            else:
                if not np.array_equal(key_micros(what, part.column(KEY)), keys[s:e]):
                    raise BadCheckpoint(f"{what}: keys differ from the targets' in rows {s}..{e}")
                stitcher.add(g, part.drop_columns([KEY]))
    stitcher.close(md)
    return counting.size, group


def delete_exports(settings: Settings, plan: Plan) -> None:
    bucket = storage.bucket(settings, settings.staging_bucket)
    for name in storage.list_names(settings, settings.staging_bucket, layout.bigquery_exports(plan.pair, plan.run_id)):
        try:
            bucket.blob(name).delete()
        except Exception as exc:  # noqa: BLE001 - leftovers are harmless scratch
            log.warning("export file not deleted", name=name, error=str(exc)[:300])


# ------------------------------------------------------------------------------------------ the method


def run(job: MergeJob, sink: BinaryIO) -> BigQueryMergeStats:
    """The method (bqx.merge.plan's contract), with the process's BigQuery client (bqx.gcp.clients)."""
    s = job.settings
    return merge(s, job.manifest, sink, bigquery_client(s), job.metadata, location=s.bigquery_location or None,
                 budget=job.budget)


def merge(settings: Settings, manifest: Manifest, sink: BinaryIO, client: Any, metadata: dict[str, str] | None = None,
          limits: Limits | None = None, location: str | None = None, budget: int | None = None
          ) -> BigQueryMergeStats:
    """`budget`: bytes the stitch may hold (default: settings.memory_budget)."""
    started = time.time()
    plan = build_plan(settings, manifest, client.project, limits)
    runner = Runner(client, plan, settings, location)
    rlog = log.bind(pair=plan.pair, run_id=plan.run_id, stage="merge", method="bigquery")
    stats = BigQueryMergeStats(tables=len(manifest.tables), columns=len(plan.schema), stages=len(plan.stages))
    rlog.info("bigquery plan", stages=len(plan.stages), loads=len(plan.loads),
              widest_stage=max(len(s.columns) for s in plan.stages),
              most_joins=max(s.joins for s in plan.stages))

    pending = [st for st in plan.stages if not (runner.finished(st) and _stage_files(settings, st))]
    stats.stages_reused = len(plan.stages) - len(pending)
    needed = {manifest.targets.name} | {f.name for st in pending for f in st.features}
    loads = [ld for ld in plan.loads if ld.table.name in needed] if pending else []
    try:
        if loads:
            runner.ensure_dataset()
            with ThreadPoolExecutor(LOAD_CONCURRENCY, thread_name_prefix="bq-load") as pool:
                list(pool.map(runner.load, loads))
            stats.loads = len(loads)
        estimates = [runner.dry_run(st) for st in pending]
        stats.bytes_processed = sum(estimates)
        stats.estimated_cost_usd = round(stats.bytes_processed / TIB * BIGQUERY_PER_TIB_SCANNED, 6)
        rlog.info("bigquery stages estimated", pending=len(pending), reused=stats.stages_reused,
                  bytes_processed=stats.bytes_processed, estimated_cost_usd=stats.estimated_cost_usd)
        # Every stage runs to its end even if one fails: what finished is kept for the retry to reuse.
        with ThreadPoolExecutor(STAGE_CONCURRENCY, thread_name_prefix="bq-stage") as pool:
            futures = [pool.submit(runner.export, st) for st in pending]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
    finally:
        runner.delete_tables([ld.temp_table for ld in loads])
    stats.job_ids = list(runner.job_ids)

    rows = targets_rows(settings, manifest)
    stats.rows, stats.row_groups = rows, 0
    stats.bytes, stats.group_rows = stitch(settings, plan, rows, sink,
                                           settings.memory_budget if budget is None else budget, metadata)
    stats.row_groups = -(-rows // stats.group_rows) if stats.group_rows else 0
    delete_exports(settings, plan)
    stats.seconds = time.time() - started
    rlog.info("bigquery merge stitched", rows=rows, columns=stats.columns, bytes=stats.bytes,
              seconds=round(stats.seconds, 2))
    return stats


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Numbers that show the plan respects the limits (for logs, docs and tests)."""
    return {
        "stages": len(plan.stages),
        "loads": len(plan.loads),
        "columns": len(plan.schema),
        "max_stage_columns": max(len(s.columns) for s in plan.stages),
        "max_stage_joins": max(s.joins for s in plan.stages),
        "max_stage_tables": max(s.tables for s in plan.stages),
        "max_sql_chars": max(len(s.export_sql) for s in plan.stages),
    }


def describe(plan: Plan) -> str:
    return json.dumps(plan_summary(plan), sort_keys=True)
