"""Reading the warehouse: discovery from the information schema and streaming table reads to Arrow.

DuckDB (local) and BigQuery (cloud) share this shape: `discover(pair)` -> tables with columns and a fingerprint,
`read(table)` -> Arrow record batches sorted by interval_time. Identifiers are always quoted, never
interpolated raw; the pair only reaches SQL as a bound parameter.

A table's fingerprint (`fingerprint()`) is its version, its row count and a digest of its schema: BigQuery's last
modification time and row count from the dataset's `__TABLES__`; the DuckDB warehouse's per-table version, which
every write of the table bumps (bqx.local.warehouse). A table with no version has no fingerprint, and is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pyarrow as pa

from bqx.catalog import FAMILIES, KEY, VERSIONS_TABLE, IgnoredTable, belongs_to, family_of, targets_table
from bqx.config import Settings
from bqx.errors import TerminalError
from bqx.layout import TABLE_RE

BATCH_ROWS = 16_384


@dataclass(frozen=True)
class SourceTable:
    name: str
    role: str
    columns: tuple[tuple[str, str], ...]  # (name, warehouse type)
    fingerprint: str = ""  # version/rows/schema digest; "" when the source cannot tell (never reused)


def fingerprint(version: object, rows: int, columns: tuple[tuple[str, str], ...]) -> str:
    """`<version>/<rows>/<schema digest>`, or "" without a version: a table whose fingerprint is unchanged holds the
    same rows (the warehouse bumps the version, or BigQuery the modification time, on every write)."""
    if version is None or version == "":
        return ""
    digest = hashlib.sha256(json.dumps([list(c) for c in columns]).encode()).hexdigest()[:16]
    return f"{version}/{int(rows)}/{digest}"


@dataclass(frozen=True)
class Discovery:
    tables: list[SourceTable]
    ignored: tuple[IgnoredTable, ...] = ()  # the pair's tables left out (an unknown family), with the reason


class Source(Protocol):
    """A warehouse. `read` streams a table ordered by interval_time: its first `row_limit` rows (0: all), as of
    `snapshot_at` (epoch seconds; 0: now). The DuckDB and BigQuery sources also have `discover_all` (tables and
    ignored tables), `keys` (a table's ordered key column as int64 microseconds) and `read_aligned` (a table LEFT
    JOINed onto the first `row_limit` keys of the targets, in the targets' order); the extract aligns in Python
    for a source without them."""

    name: str

    def discover(self, pair: str) -> list[SourceTable]: ...

    def read(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]: ...


def as_of_micros(snapshot_at: float) -> int:
    return int(round(snapshot_at * 1_000_000))


def _aligned_sql(table_ref: str, targets_ref: str, key: str, row_limit: int, as_of: str = "") -> str:
    """`table` LEFT JOINed onto the targets' first `row_limit` keys: exactly those rows, in their order, the key
    column the targets' (a table's other columns null where it lacks the key), its columns in its own order.
    A key repeated in the table repeats the row: the extract's key check names the table (DuplicateKeys)."""
    limit = f" LIMIT {int(row_limit)}" if row_limit else ""
    return (f"SELECT t.* REPLACE (k.{key} AS {key}) "
            f"FROM (SELECT {key} FROM {targets_ref}{as_of} ORDER BY {key}{limit}) AS k "
            f"LEFT JOIN {table_ref} AS t{as_of} ON t.{key} = k.{key} ORDER BY k.{key}")


def quote_duckdb(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def quote_bigquery(identifier: str) -> str:
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _classify(pair: str, rows: list[tuple[str, str, str]]) -> tuple[list[SourceTable], list[IgnoredTable]]:
    """(table, column, type) rows in ordinal order -> the pair's tables, targets first, then by name; and the
    pair's tables that are left out, with the reason (never dropped without a word)."""
    by_table: dict[str, list[tuple[str, str]]] = {}
    ignored: list[IgnoredTable] = []
    for table, column, dtype in rows:
        if not belongs_to(pair, table):
            continue
        if not TABLE_RE.match(table):
            if not any(i.name == table for i in ignored):
                ignored.append(IgnoredTable(table, "name is not a valid table name (lowercase letters, digits, _)"))
            continue
        by_table.setdefault(table, []).append((column, dtype))
    out = []
    for table in sorted(by_table):
        if table == targets_table(pair):
            role = "targets"
        elif family_of(table) in FAMILIES:
            role = "feature"
        else:
            ignored.append(IgnoredTable(table, f"unknown family {family_of(table)!r}"))
            continue
        cols = tuple(by_table[table])
        if KEY not in (c for c, _ in cols):
            raise TerminalError(f"table {table!r} has no {KEY} column")
        out.append(SourceTable(table, role, cols))
    out.sort(key=lambda t: (t.role != "targets", t.name))
    if not out or out[0].role != "targets":
        raise TerminalError(f"no table {targets_table(pair)!r} in the warehouse for pair {pair}")
    return out, sorted(ignored, key=lambda i: i.name)


class DuckDBSource:
    def __init__(self, path: str, dataset: str) -> None:
        import duckdb

        self.name = f"duckdb:{path}"
        self.dataset = dataset
        self._con = duckdb.connect(path, read_only=True)
        self._con.execute("SET TimeZone='UTC'")
        self._con.execute("SET enable_progress_bar=false")

    def discover(self, pair: str) -> list[SourceTable]:
        return self.discover_all(pair).tables

    def discover_all(self, pair: str) -> Discovery:
        rows = self._con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name LIKE ? ORDER BY table_name, ordinal_position",
            [self.dataset, f"%{pair}%"],
        ).fetchall()
        tables, ignored = _classify(pair, rows)
        return Discovery(self._with_fingerprints(tables), tuple(ignored))

    def _with_fingerprints(self, tables: list[SourceTable]) -> list[SourceTable]:
        """Each table's version (the warehouse's bookkeeping table) and row count: two queries for all of them."""
        import duckdb

        cursor = self._con.cursor()
        try:
            try:
                versions = dict(cursor.execute(f"SELECT table_name, version FROM {quote_duckdb(VERSIONS_TABLE)} "
                                               "WHERE dataset = ?", [self.dataset]).fetchall())
            except duckdb.CatalogException:  # a warehouse written before versions were kept
                versions = {}
            ds = quote_duckdb(self.dataset)
            counts = dict(cursor.execute(" UNION ALL ".join(
                f"SELECT {i} AS i, count(*) AS n FROM {ds}.{quote_duckdb(t.name)}" for i, t in enumerate(tables)
            )).fetchall()) if tables else {}
        finally:
            cursor.close()
        return [replace(t, fingerprint=fingerprint(versions.get(t.name), counts[i], t.columns))
                for i, t in enumerate(tables)]

    def estimate_bytes(self, table: str, row_limit: int = 0) -> int:
        """What BigQuery would bill for reading the table: logical bytes of every column."""
        from bqx.pricing import logical_bytes

        ref = f"{quote_duckdb(self.dataset)}.{quote_duckdb(table)}"
        rows = self._con.cursor().execute(f"SELECT count(*) FROM {ref}").fetchone()[0]
        cols = self._con.cursor().execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
            [self.dataset, table]).fetchall()
        return logical_bytes(cols, min(rows, row_limit) if row_limit else rows)

    def _ref(self, table: str) -> str:
        return f"{quote_duckdb(self.dataset)}.{quote_duckdb(table)}"

    def _as_of(self, cursor, tables: list[str], snapshot_at: float) -> None:  # type: ignore[no-untyped-def]
        """DuckDB keeps no history: a read is as of the run's snapshot when none of its tables was written since
        (its version, the write's time in ns, is not past the snapshot). Checked in the read's own transaction,
        so what it checks is what it reads; a table rewritten after the snapshot fails the run, never mixes in."""
        if not snapshot_at:
            return
        if not cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                              [VERSIONS_TABLE]).fetchall()[0][0]:
            return  # a warehouse written before versions were kept: nothing to compare
        versions = cursor.execute(
            f"SELECT table_name, version FROM {quote_duckdb(VERSIONS_TABLE)} WHERE dataset = ? AND "
            f"table_name IN ({', '.join('?' for _ in tables)})", [self.dataset, *tables]).fetchall()
        newer = sorted(t for t, v in versions if v is not None and int(v) > as_of_micros(snapshot_at) * 1000)
        if newer:
            raise TerminalError(f"table(s) {', '.join(newer)} changed after this run's snapshot "
                                f"({snapshot_at:.6f}); the local warehouse keeps no history: start a new run")

    def _stream(self, sql: str, tables: list[str], snapshot_at: float) -> Iterator[pa.RecordBatch]:
        cursor = self._con.cursor()  # one cursor per thread: DuckDB connections are not thread-safe
        try:
            cursor.execute("SET TimeZone='UTC'")
            cursor.execute("BEGIN TRANSACTION")  # the snapshot check and the read see the same state
            self._as_of(cursor, tables, snapshot_at)
            relation = cursor.sql(sql)  # a relation streams Arrow batches without an extra copy
            # duckdb >= 1.4 names it to_arrow_reader; older releases fetch_arrow_reader
            reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
            yield from reader(BATCH_ROWS)
        finally:
            cursor.close()  # ends the (read-only) transaction

    def keys(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> np.ndarray:
        """The table's ordered key column, first `row_limit` rows, as int64 microseconds."""
        key = quote_duckdb(KEY)
        sql = f"SELECT {key} FROM {self._ref(table)} ORDER BY {key}" + (f" LIMIT {int(row_limit)}" if row_limit
                                                                        else "")
        arrays = [b.column(0) for b in self._stream(sql, [table], snapshot_at)]
        return _int_keys(arrays)

    def read(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]:
        sql = f"SELECT * FROM {self._ref(table)} ORDER BY {quote_duckdb(KEY)}"
        if row_limit:
            sql += f" LIMIT {int(row_limit)}"
        yield from self._stream(sql, [table], snapshot_at)

    def read_aligned(self, table: str, targets: str, row_limit: int = 0,
                     snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]:
        """`table` LEFT JOINed onto the targets' keys, in the query (one hash join; see _aligned_sql)."""
        sql = _aligned_sql(self._ref(table), self._ref(targets), quote_duckdb(KEY), row_limit)
        yield from self._stream(sql, [table, targets], snapshot_at)


def _int_keys(arrays: list[pa.Array]) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    keys = pa.chunked_array(arrays).combine_chunks()
    if keys.null_count:
        raise TerminalError(f"null {KEY} values in the targets")
    return np.ascontiguousarray(keys.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


class BigQuerySource:
    """The warehouse in BigQuery, through google-cloud-bigquery.

    Discovery is one INFORMATION_SCHEMA.COLUMNS query with the pair as a bound parameter, and one of the dataset's
    `__TABLES__` (last modification time and row count of every table: the fingerprints). Each table is read
    by a query ordered by interval_time; its rows stream to Arrow through the BigQuery Storage Read API (one
    ordered stream) in the cloud, or wherever BQX_BIGQUERY_STORAGE_ENDPOINT is set, and through the query
    results pages otherwise (the local stack). Without google-cloud-bigquery-storage the source fails when it
    is created, never falls back. `estimate_bytes` is a dry run, so the bytes a read scans are known before it
    runs. The clients are thread-safe: the extract job reads several tables at once (BQX_EXTRACT_CONCURRENCY).
    """

    def __init__(self, settings: Settings, client=None, bqstorage_client=None) -> None:  # type: ignore[no-untyped-def]
        self.name = f"bigquery:{settings.project}.{settings.dataset}"
        self.settings = settings
        if client is None:
            from bqx.gcp.clients import bigquery_client

            client = bigquery_client(settings)
        self.client = client
        if bqstorage_client is None and (settings.bigquery_storage_endpoint or not settings.local):
            from bqx.gcp.clients import bigquery_read_client

            # With the BigQuery client's credentials: nothing asks the metadata server a second time.
            bqstorage_client = bigquery_read_client(settings, client._credentials)
        self.bqstorage = bqstorage_client

    def _dataset_ref(self) -> str:
        return f"{quote_bigquery(self.settings.project)}.{quote_bigquery(self.settings.dataset)}"

    def discover_sql(self) -> str:
        return (
            "SELECT table_name, column_name, data_type "
            f"FROM {self._dataset_ref()}.INFORMATION_SCHEMA.COLUMNS "
            "WHERE table_name LIKE @pattern ORDER BY table_name, ordinal_position"
        )

    def tables_sql(self) -> str:
        return (
            "SELECT table_id, last_modified_time, row_count "
            f"FROM {self._dataset_ref()}.__TABLES__ WHERE table_id LIKE @pattern"
        )

    def discover(self, pair: str) -> list[SourceTable]:
        return self.discover_all(pair).tables

    def discover_all(self, pair: str) -> Discovery:
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("pattern", "STRING", f"%{pair}%")]
        )
        rows = self.client.query(self.discover_sql(), job_config=config).result()
        tables, ignored = _classify(pair, [(r[0], r[1], r[2]) for r in rows])
        # Streaming inserts still in the buffer change neither value; every DML, load or copy changes the first.
        meta = {r[0]: (r[1], r[2]) for r in self.client.query(self.tables_sql(), job_config=config).result()}
        return Discovery([replace(t, fingerprint=fingerprint(*meta[t.name], t.columns)) if t.name in meta else t
                          for t in tables], tuple(ignored))

    def _ref(self, table: str) -> str:
        if not TABLE_RE.match(table):
            raise TerminalError(f"not a table name: {table!r}")
        return f"{self._dataset_ref()}.{quote_bigquery(table)}"

    @staticmethod
    def _as_of(snapshot_at: float) -> str:
        """Time travel to the run's snapshot (within the dataset's time travel window, 7 days by default)."""
        return f" FOR SYSTEM_TIME AS OF TIMESTAMP_MICROS({as_of_micros(snapshot_at)})" if snapshot_at else ""

    def read_sql(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> str:
        key = quote_bigquery(KEY)
        sql = f"SELECT * FROM {self._ref(table)}{self._as_of(snapshot_at)} ORDER BY {key}"
        return sql + (f" LIMIT {int(row_limit)}" if row_limit else "")

    def keys_sql(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> str:
        key = quote_bigquery(KEY)
        sql = f"SELECT {key} FROM {self._ref(table)}{self._as_of(snapshot_at)} ORDER BY {key}"
        return sql + (f" LIMIT {int(row_limit)}" if row_limit else "")

    def aligned_sql(self, table: str, targets: str, row_limit: int = 0, snapshot_at: float = 0.0) -> str:
        """The table LEFT JOINed onto the targets' first `row_limit` keys, both as of the snapshot. Bytes billed:
        the table's columns, as an unaligned read (a LIMIT never reduces them), plus the targets' key column
        (8 bytes a row: 0.8 MB at 100k rows, inside the 10 MB minimum a query is billed anyway), so at most
        ~8 bytes x targets rows more per table than an unaligned read."""
        return _aligned_sql(self._ref(table), self._ref(targets), quote_bigquery(KEY), row_limit,
                            self._as_of(snapshot_at))

    def estimate_bytes(self, table: str, row_limit: int = 0) -> int:
        """Bytes the read of `table` will scan (a dry run: free, nothing runs)."""
        from google.cloud import bigquery

        job = self.client.query(
            self.read_sql(table, row_limit), job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False)
        )
        return int(job.total_bytes_processed or 0)

    def _stream(self, sql: str) -> Iterator[pa.RecordBatch]:
        job = self.client.query(sql)
        # Through the Storage Read API, wait for the job without fetching rows (they would be read twice);
        # ORDER BY in the query makes the client read the result table as one ordered stream.
        rows = job.result() if self.bqstorage is not None else job.result(page_size=BATCH_ROWS)
        yield from rows.to_arrow_iterable(bqstorage_client=self.bqstorage)

    def keys(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> np.ndarray:
        return _int_keys([b.column(0) for b in self._stream(self.keys_sql(table, row_limit, snapshot_at))])

    def read(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]:
        yield from self._stream(self.read_sql(table, row_limit, snapshot_at))

    def read_aligned(self, table: str, targets: str, row_limit: int = 0,
                     snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]:
        yield from self._stream(self.aligned_sql(table, targets, row_limit, snapshot_at))


def open_source(settings: Settings) -> Source:
    if settings.warehouse == "bigquery":
        return BigQuerySource(settings)
    return DuckDBSource(settings.warehouse, settings.dataset)
