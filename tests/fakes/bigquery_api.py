"""A local HTTP server that answers like the BigQuery REST API (v2), for google-cloud-bigquery pointed at it.

It runs every SQL statement for real: the statement is parsed with sqlglot (BigQuery dialect), its table
references are resolved to DuckDB tables, it is transpiled to DuckDB and executed. Supported:

- jobs.insert (query, EXPORT DATA, load from Parquet, extract to Parquet, dry runs), a repeated job id -> 409
  `duplicate` as BigQuery answers; jobs.get; jobs.getQueryResults (paged, int64 timestamps when asked)
- datasets.insert/get, tables.get/delete
- `INFORMATION_SCHEMA.COLUMNS` of a dataset (BigQuery type names), `@named` query parameters
- a dataset's `__TABLES__` (table_id, creation_time, last_modified_time in ms, row_count, ...); `touch` changes a
  table's last_modified_time as a write would

Tables live in DuckDB: a dataset is a schema of an in-memory database, and an optional warehouse file is
attached read-only (its schemas are the warehouse's datasets). gs:// URIs are read and written through a
`Gcs` bridge (fake-gcs-server via google-cloud-storage, or a local directory).

Every request is recorded (`requests`) so tests can assert the calls a client made and their bodies.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

from bqx.local.servers import KeepAliveHandler

LOCATION = "US"


class Gcs(Protocol):
    def read(self, uri: str) -> bytes: ...

    def write(self, uri: str, data: bytes) -> None: ...


def split_uri(uri: str) -> tuple[str, str]:
    m = re.match(r"^gs://([^/]+)/(.+)$", uri)
    if not m:
        raise ValueError(f"not a gs:// URI: {uri!r}")
    return m.group(1), m.group(2)


class StorageGcs:
    """gs:// through google-cloud-storage against an emulator endpoint (never Google's)."""

    def __init__(self, endpoint: str, project: str = "test") -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        if not endpoint.startswith("http://127.0.0.1:"):
            raise ValueError("the fake only talks to loopback endpoints")
        self.client = storage.Client(project=project, credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": endpoint})

    def read(self, uri: str) -> bytes:
        bucket, name = split_uri(uri)
        return self.client.bucket(bucket).blob(name).download_as_bytes()

    def write(self, uri: str, data: bytes) -> None:
        bucket, name = split_uri(uri)
        self.client.bucket(bucket).blob(name).upload_from_string(data, content_type="application/octet-stream")


class DirGcs:
    """gs://bucket/name <-> <root>/bucket/name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, uri: str) -> bytes:
        bucket, name = split_uri(uri)
        return (self.root / bucket / name).read_bytes()

    def write(self, uri: str, data: bytes) -> None:
        bucket, name = split_uri(uri)
        path = self.root / bucket / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict[str, Any]:
        status = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS"}.get(self.code, "UNKNOWN")
        return {"error": {"code": self.code, "message": self.message, "status": status,
                          "errors": [{"reason": self.reason, "message": self.message, "domain": "global"}]}}


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    body: dict[str, Any] | None
    status: int = 0


@dataclass
class FakeBigQuery:
    project: str
    gcs: Gcs | None = None
    warehouse: Path | None = None
    export_rows_per_file: int = 0  # >0: wildcard exports split into files of at most this many rows
    default_page_rows: int = 1000
    fail_job: Any = None  # callable(kind, configuration) -> error message or None, to inject job failures
    requests: list[Recorded] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, pa.Table] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    statements: list[tuple[str, str]] = field(default_factory=list)  # (bigquery sql, duckdb sql) executed
    dry_run_bytes: list[int] = field(default_factory=list)  # what each dry run answered
    modified: dict[tuple[str, str], int] = field(default_factory=dict)  # (dataset, table) -> last modified, ms

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET TimeZone='UTC'")
        self.con.execute("SET enable_progress_bar=false")
        if self.warehouse is not None:
            self.con.execute(f"ATTACH '{self.warehouse}' AS wh (READ_ONLY)")
        self._refresh_catalog()

    # ------------------------------------------------------------------ catalog
    def _refresh_catalog(self) -> None:
        """(dataset, table) -> (catalog, rows, columns), read from DuckDB once and kept in step by the fake."""
        self.catalog: dict[tuple[str, str], tuple[str, int, int]] = {}
        self.warehouse_datasets: set[str] = set()
        if self.warehouse is None:
            return
        rows = self.con.execute(
            "SELECT table_schema, table_name, count(*) FROM information_schema.columns WHERE table_catalog = 'wh' "
            "GROUP BY ALL").fetchall()
        now = int(time.time() * 1000)
        for dataset, table, ncols in rows:
            n = self.con.execute(f'SELECT count(*) FROM "wh"."{dataset}"."{table}"').fetchall()[0][0]
            self.catalog[(dataset, table)] = ("wh", int(n), int(ncols))
            self.modified.setdefault((dataset, table), now)
            self.warehouse_datasets.add(dataset)

    def touch(self, dataset: str, table: str) -> None:
        """A write to the table: its last_modified_time moves on (its rows stay as they are)."""
        with self.lock:
            if not self.table_exists(dataset, table):
                raise KeyError((dataset, table))
            self.modified[(dataset, table)] = max(int(time.time() * 1000), self.modified[(dataset, table)] + 1)

    def _tables_meta(self, dataset: str) -> pa.Table:
        """The rows of `dataset.__TABLES__`, as BigQuery's legacy meta-table has them."""
        keys = sorted(k for k in self.catalog if k[0] == dataset)
        return pa.table({
            "project_id": [self.project] * len(keys), "dataset_id": [d for d, _ in keys],
            "table_id": [t for _, t in keys],
            "creation_time": pa.array([self.modified.get(k, 0) for k in keys], pa.int64()),
            "last_modified_time": pa.array([self.modified.get(k, 0) for k in keys], pa.int64()),
            "row_count": pa.array([self.catalog[k][1] for k in keys], pa.int64()),
            "size_bytes": pa.array([self.catalog[k][1] * self.catalog[k][2] * 8 for k in keys], pa.int64()),
            "type": pa.array([1] * len(keys), pa.int64()),
        })

    def _catalog_of(self, dataset: str) -> str:
        if dataset in self.datasets:
            return "memory"
        if dataset in self.warehouse_datasets:
            return "wh"
        raise ApiError(404, "notFound", f"Not found: Dataset {self.project}:{dataset}")

    def table_exists(self, dataset: str, table: str) -> bool:
        return (dataset, table) in self.catalog

    def table_names(self, dataset: str) -> list[str]:
        self._catalog_of(dataset)
        return sorted(t for d, t in self.catalog if d == dataset)

    def _resolve(self, table: exp.Table, default_dataset: str | None) -> exp.Expression:
        name = table.name
        dataset = table.db or default_dataset
        if not dataset:
            raise ApiError(400, "invalid", f"Table {name!r} must be qualified with a dataset")
        if table.catalog and table.catalog != self.project:
            raise ApiError(404, "notFound", f"Not found: project {table.catalog}")
        catalog = self._catalog_of(dataset)
        alias = table.alias
        if name.upper() == "INFORMATION_SCHEMA.COLUMNS":
            sub = sqlglot.parse_one(
                "SELECT table_name, column_name, ordinal_position, "
                "CASE WHEN data_type IN ('DOUBLE', 'FLOAT') THEN 'FLOAT64' "
                "WHEN data_type IN ('BIGINT', 'INTEGER', 'SMALLINT', 'TINYINT', 'HUGEINT') THEN 'INT64' "
                "WHEN data_type LIKE 'TIMESTAMP%' THEN 'TIMESTAMP' WHEN data_type = 'VARCHAR' THEN 'STRING' "
                "WHEN data_type = 'BOOLEAN' THEN 'BOOL' ELSE data_type END AS data_type "
                f"FROM information_schema.columns WHERE table_catalog = '{catalog}' AND table_schema = '{dataset}'",
                read="duckdb")
            return exp.Subquery(this=sub, alias=exp.TableAlias(this=exp.to_identifier(alias or "columns")))
        if name.upper() == "__TABLES__":
            self.con.register("_fake_tables", self._tables_meta(dataset))  # under the lock every job runs in
            sub = sqlglot.parse_one("SELECT * FROM _fake_tables", read="duckdb")
            return exp.Subquery(this=sub, alias=exp.TableAlias(this=exp.to_identifier(alias or "tables")))
        if not self.table_exists(dataset, name):
            raise ApiError(404, "notFound", f"Not found: Table {self.project}:{dataset}.{name}")
        new = exp.Table(this=exp.to_identifier(name, quoted=True), db=exp.to_identifier(dataset, quoted=True),
                        catalog=exp.to_identifier(catalog, quoted=True))
        if alias:
            new.set("alias", exp.TableAlias(this=exp.to_identifier(alias, quoted=True)))
        return new

    def to_duckdb(self, sql: str, params: list[dict[str, Any]] | None = None,
                  default_dataset: str | None = None) -> tuple[exp.Expression, list[tuple[str, str]]]:
        """BigQuery SQL -> (parsed statement with DuckDB tables, referenced (dataset, table)s)."""
        try:
            tree = sqlglot.parse_one(sql, read="bigquery")
        except sqlglot.errors.ParseError as exc:
            raise ApiError(400, "invalidQuery", f"Syntax error: {exc}") from exc
        values = {p["name"]: p for p in params or []}
        refs: list[tuple[str, str]] = []

        def rewrite(node: exp.Expression) -> exp.Expression:
            if isinstance(node, exp.Parameter):
                name = node.name
                if name not in values:
                    raise ApiError(400, "invalidQuery", f"Query parameter '{name}' not found")
                p = values[name]
                raw, ptype = p["parameterValue"]["value"], p["parameterType"]["type"]
                return exp.Literal.string(raw) if ptype == "STRING" else exp.Literal.number(raw)
            if isinstance(node, exp.Table) and node.name and not isinstance(node.parent, exp.Drop):
                refs.append((node.db or default_dataset or "", node.name))
                return self._resolve(node, default_dataset)
            return node

        return tree.transform(rewrite, copy=True), refs

    def _size_of(self, dataset: str, table: str) -> int:
        if table.upper().startswith("INFORMATION_SCHEMA") or table.upper() == "__TABLES__":
            return 10 << 20  # BigQuery bills metadata queries at 10 MB minimum
        _, rows, cols = self.catalog[(dataset, table)]
        return rows * cols * 8

    # ------------------------------------------------------------------ jobs
    def _job_resource(self, job_id: str, config: dict[str, Any], stats: dict[str, Any],
                      error: str | None, reason: str = "invalidQuery") -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        status: dict[str, Any] = {"state": "DONE"}
        if error:
            status["errorResult"] = {"reason": reason, "message": error, "location": "query"}
            status["errors"] = [status["errorResult"]]
        return {
            "kind": "bigquery#job",
            "id": f"{self.project}:{LOCATION}.{job_id}",
            "jobReference": {"projectId": self.project, "jobId": job_id, "location": LOCATION},
            "configuration": config,
            "status": status,
            "statistics": {"creationTime": now, "startTime": now, "endTime": now, **stats},
            "user_email": "fake@localhost",
        }

    def insert_job(self, body: dict[str, Any]) -> dict[str, Any]:
        config = body.get("configuration") or {}
        ref = body.get("jobReference") or {}
        job_id = ref.get("jobId") or f"job_{len(self.jobs)}"
        dry = bool(config.get("dryRun"))
        with self.lock:
            if not dry and job_id in self.jobs:
                raise ApiError(409, "duplicate", f"Already Exists: Job {self.project}:{LOCATION}.{job_id}")
            kind = next((k for k in ("query", "load", "extract") if k in config), "")
            error, reason, stats = None, "invalidQuery", {}
            try:
                injected = self.fail_job(kind, config) if self.fail_job else None
                if injected:
                    raise ApiError(400, "invalid", injected)
                if kind == "query":
                    stats = self._run_query(job_id, config["query"], dry)
                elif kind == "load":
                    stats = self._run_load(config["load"])
                elif kind == "extract":
                    stats = self._run_extract(config["extract"])
                else:
                    raise ApiError(400, "invalid", "job configuration has no query, load or extract")
            except ApiError as exc:
                if dry or exc.code == 409:
                    raise
                error, reason = exc.message, exc.reason
            except duckdb.Error as exc:
                if dry:
                    raise ApiError(400, "invalidQuery", str(exc)) from exc
                error = str(exc)
            job = self._job_resource(job_id, config, stats, error, reason)
            if not dry:
                self.jobs[job_id] = job
            return job

    def _run_query(self, job_id: str, q: dict[str, Any], dry: bool) -> dict[str, Any]:
        if q.get("useLegacySql", False):
            raise ApiError(400, "invalidQuery", "legacy SQL is not supported by the fake")
        default = (q.get("defaultDataset") or {}).get("datasetId")
        tree, refs = self.to_duckdb(q["query"], q.get("queryParameters"), default)
        billed = sum(self._size_of(d, t) for d, t in dict.fromkeys(refs))
        stats = {"totalBytesProcessed": str(billed),
                 "query": {"totalBytesProcessed": str(billed), "totalBytesBilled": str(billed),
                           "statementType": "EXPORT_DATA" if isinstance(tree, exp.Export) else "SELECT",
                           "cacheHit": False}}
        if dry:
            self.dry_run_bytes.append(billed)
            return stats
        if isinstance(tree, exp.Export):
            options = {}
            for prop in tree.args["options"].expressions:
                if isinstance(prop, exp.FileFormatProperty):
                    options["format"] = prop.this.name.upper()
                else:
                    options[prop.this.name.lower()] = prop.args["value"].this
            if options.get("format") != "PARQUET":
                raise ApiError(400, "invalidQuery", "the fake exports PARQUET only")
            table = self._execute(q["query"], tree.this)
            self._write_files(options["uri"], table)
            return stats
        table = self._execute(q["query"], tree)
        self.results[job_id] = table
        stats["query"]["totalRows"] = str(table.num_rows)
        return stats

    def _execute(self, original: str, tree: exp.Expression) -> pa.Table:
        sql = tree.sql(dialect="duckdb")
        self.statements.append((original, sql))
        return self.con.sql(sql).to_arrow_table()

    def _write_files(self, uri: str, table: pa.Table) -> list[str]:
        if self.gcs is None:
            raise ApiError(400, "invalid", "this fake has no storage for gs:// URIs")
        if uri.count("*") > 1:
            raise ApiError(400, "invalid", "at most one wildcard in a destination URI")
        per = self.export_rows_per_file if "*" in uri and self.export_rows_per_file else max(table.num_rows, 1)
        starts = list(range(0, table.num_rows, per)) or [0]
        names = []
        for i, s in enumerate(starts):
            buf = io.BytesIO()
            pq.write_table(table.slice(s, per), buf, compression="snappy", coerce_timestamps="us")
            name = uri.replace("*", f"{i:012d}")
            self.gcs.write(name, buf.getvalue())
            names.append(name)
        return names

    def _run_load(self, load: dict[str, Any]) -> dict[str, Any]:
        if load.get("sourceFormat") != "PARQUET":
            raise ApiError(400, "invalid", "the fake loads PARQUET only")
        if self.gcs is None:
            raise ApiError(400, "invalid", "this fake has no storage for gs:// URIs")
        dest = load["destinationTable"]
        dataset, table = dest["datasetId"], dest["tableId"]
        if dataset not in self.datasets:
            raise ApiError(404, "notFound", f"Not found: Dataset {self.project}:{dataset}")
        disposition = load.get("writeDisposition", "WRITE_APPEND")
        if disposition == "WRITE_EMPTY" and self.table_exists(dataset, table):
            raise ApiError(409, "duplicate", f"Already Exists: Table {self.project}:{dataset}.{table}")
        raw = [self.gcs.read(uri) for uri in load["sourceUris"]]
        parts = [pq.read_table(io.BytesIO(b)) for b in raw]
        data = pa.concat_tables(parts)
        self.con.register("_load", data)
        try:
            q = f'"memory"."{dataset}"."{table}"'
            if disposition == "WRITE_APPEND" and self.table_exists(dataset, table):
                self.con.execute(f"INSERT INTO {q} SELECT * FROM _load")
                rows = self.catalog[(dataset, table)][1] + data.num_rows
            else:
                self.con.execute(f"CREATE OR REPLACE TABLE {q} AS SELECT * FROM _load")
                rows = data.num_rows
            self.catalog[(dataset, table)] = ("memory", rows, data.num_columns)
            self.modified[(dataset, table)] = int(time.time() * 1000)
        finally:
            self.con.unregister("_load")
        size = sum(len(b) for b in raw)
        return {"load": {"inputFiles": str(len(parts)), "outputRows": str(data.num_rows),
                         "inputFileBytes": str(size), "outputBytes": str(data.nbytes)}}

    def _run_extract(self, extract: dict[str, Any]) -> dict[str, Any]:
        if extract.get("destinationFormat") != "PARQUET":
            raise ApiError(400, "invalid", "the fake extracts PARQUET only")
        src = extract["sourceTable"]
        catalog = self._catalog_of(src["datasetId"])
        if not self.table_exists(src["datasetId"], src["tableId"]):
            raise ApiError(404, "notFound", f"Not found: Table {src['datasetId']}.{src['tableId']}")
        table = self.con.sql(f'SELECT * FROM "{catalog}"."{src["datasetId"]}"."{src["tableId"]}"').to_arrow_table()
        files = []
        for uri in extract["destinationUris"]:
            files += self._write_files(uri, table)
        return {"extract": {"destinationUriFileCounts": [str(len(files))], "inputBytes": str(table.nbytes)}}

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            if job_id not in self.jobs:
                raise ApiError(404, "notFound", f"Not found: Job {self.project}:{job_id}")
            return self.jobs[job_id]

    def query_results(self, job_id: str, params: dict[str, str]) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job["status"].get("errorResult"):
            err = job["status"]["errorResult"]
            raise ApiError(400, err["reason"], err["message"])
        table = self.results.get(job_id)
        out: dict[str, Any] = {"kind": "bigquery#getQueryResultsResponse", "jobReference": job["jobReference"],
                               "jobComplete": True}
        if table is None:  # not a SELECT: no result set
            return out
        out["schema"] = {"fields": [_field(f) for f in table.schema]}
        out["totalRows"] = str(table.num_rows)
        limit = int(params.get("maxResults", self.default_page_rows) or 0)
        if "maxResults" in params and limit == 0:
            return out
        limit = limit or self.default_page_rows
        start = int(params.get("pageToken") or params.get("startIndex") or 0)
        end = min(start + limit, table.num_rows)
        int64_ts = params.get("formatOptions.useInt64Timestamp", "").lower() == "true"
        out["rows"] = _rows(table.slice(start, end - start), int64_ts)
        if end < table.num_rows:
            out["pageToken"] = str(end)
        return out

    # ------------------------------------------------------------------ datasets, tables
    def insert_dataset(self, body: dict[str, Any]) -> dict[str, Any]:
        ds = body["datasetReference"]["datasetId"]
        with self.lock:
            if ds in self.datasets:
                raise ApiError(409, "duplicate", f"Already Exists: Dataset {self.project}:{ds}")
            self.con.execute(f'CREATE SCHEMA IF NOT EXISTS "memory"."{ds}"')
            resource = {**body, "kind": "bigquery#dataset", "id": f"{self.project}:{ds}",
                        "datasetReference": {"projectId": self.project, "datasetId": ds},
                        "location": body.get("location") or LOCATION}
            self.datasets[ds] = resource
            return resource

    def get_dataset(self, ds: str) -> dict[str, Any]:
        if ds not in self.datasets:
            raise ApiError(404, "notFound", f"Not found: Dataset {self.project}:{ds}")
        return self.datasets[ds]

    def get_table(self, ds: str, table: str) -> dict[str, Any]:
        with self.lock:
            if not self.table_exists(ds, table):
                raise ApiError(404, "notFound", f"Not found: Table {self.project}:{ds}.{table}")
            catalog, rows, _ = self.catalog[(ds, table)]
            arrow = self.con.sql(f'SELECT * FROM "{catalog}"."{ds}"."{table}" LIMIT 0').to_arrow_table()
        return {"kind": "bigquery#table", "id": f"{self.project}:{ds}.{table}", "type": "TABLE",
                "tableReference": {"projectId": self.project, "datasetId": ds, "tableId": table},
                "schema": {"fields": [_field(f) for f in arrow.schema]}, "numRows": str(rows)}

    def delete_table(self, ds: str, table: str) -> None:
        with self.lock:
            if ds not in self.datasets or not self.table_exists(ds, table):
                raise ApiError(404, "notFound", f"Not found: Table {self.project}:{ds}.{table}")
            self.con.execute(f'DROP TABLE "memory"."{ds}"."{table}"')
            del self.catalog[(ds, table)]

    # ------------------------------------------------------------------ queries over the record
    def jobs_of(self, kind: str) -> list[dict[str, Any]]:
        """Configurations of the (non-dry-run) jobs inserted, of one kind: query, load, extract."""
        return [r.body["configuration"] for r in self.requests
                if r.method == "POST" and r.path.endswith("/jobs") and r.body
                and kind in r.body.get("configuration", {}) and not r.body["configuration"].get("dryRun")
                and r.status == 200]

    def dry_runs(self) -> list[dict[str, Any]]:
        return [r.body["configuration"] for r in self.requests
                if r.method == "POST" and r.path.endswith("/jobs") and r.body
                and r.body.get("configuration", {}).get("dryRun")]

    def deleted_tables(self) -> list[str]:
        return [r.path.rsplit("/", 1)[-1] for r in self.requests if r.method == "DELETE" and "/tables/" in r.path]


# ---------------------------------------------------------------------- encoding


def _bq_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMP" if t.tz else "DATETIME"
    if pa.types.is_floating(t):
        return "FLOAT"
    if pa.types.is_integer(t):
        return "INTEGER"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "STRING"
    if pa.types.is_decimal(t):
        return "NUMERIC"
    raise ApiError(400, "invalidQuery", f"the fake cannot return {t}")


def _field(f: pa.Field) -> dict[str, Any]:
    return {"name": f.name, "type": _bq_type(f.type), "mode": "NULLABLE"}


def _rows(table: pa.Table, int64_timestamps: bool) -> list[dict[str, Any]]:
    columns = []
    for col in table.columns:
        t = col.type
        if pa.types.is_timestamp(t):
            micros = col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64()).to_pylist()
            vals = [None if v is None else (str(v) if int64_timestamps else repr(v / 1e6)) for v in micros]
        elif pa.types.is_floating(t):
            vals = [None if v is None else repr(float(v)) for v in col.to_pylist()]
        elif pa.types.is_boolean(t):
            vals = [None if v is None else ("true" if v else "false") for v in col.to_pylist()]
        else:
            vals = [None if v is None else str(v) for v in col.to_pylist()]
        columns.append(vals)
    return [{"f": [{"v": c[i]} for c in columns]} for i in range(table.num_rows)]


# ---------------------------------------------------------------------- HTTP


_ROUTES = [
    ("POST", re.compile(r"^/bigquery/v2/projects/([^/]+)/jobs$"), "jobs_insert"),
    ("GET", re.compile(r"^/bigquery/v2/projects/([^/]+)/jobs/([^/]+)$"), "jobs_get"),
    ("GET", re.compile(r"^/bigquery/v2/projects/([^/]+)/queries/([^/]+)$"), "query_results"),
    ("POST", re.compile(r"^/bigquery/v2/projects/([^/]+)/datasets$"), "datasets_insert"),
    ("GET", re.compile(r"^/bigquery/v2/projects/([^/]+)/datasets/([^/]+)$"), "datasets_get"),
    ("GET", re.compile(r"^/bigquery/v2/projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)$"), "tables_get"),
    ("DELETE", re.compile(r"^/bigquery/v2/projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)$"), "tables_delete"),
]


def make_handler(fake: FakeBigQuery) -> type[BaseHTTPRequestHandler]:
    class Handler(KeepAliveHandler):
        def _reply(self, code: int, body: dict[str, Any] | None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            rec = Recorded(method, url.path, params, body)
            with fake.lock:
                fake.requests.append(rec)
            try:
                for m, rx, name in _ROUTES:
                    match = rx.match(url.path)
                    if m == method and match:
                        if match.group(1) != fake.project:
                            raise ApiError(404, "notFound", f"Not found: project {match.group(1)}")
                        code, out = self._dispatch(name, match.groups()[1:], params, body)
                        break
                else:
                    raise ApiError(404, "notFound", f"no route for {method} {url.path}")
            except ApiError as exc:
                code, out = exc.code, exc.body()
            rec.status = code
            self._reply(code, out)

        def _dispatch(self, name: str, groups: tuple[str, ...], params: dict[str, str],
                      body: dict[str, Any] | None) -> tuple[int, dict[str, Any] | None]:
            if name == "jobs_insert":
                return 200, fake.insert_job(body or {})
            if name == "jobs_get":
                return 200, fake.get_job(groups[0])
            if name == "query_results":
                return 200, fake.query_results(groups[0], params)
            if name == "datasets_insert":
                return 200, fake.insert_dataset(body or {})
            if name == "datasets_get":
                return 200, fake.get_dataset(groups[0])
            if name == "tables_get":
                return 200, fake.get_table(groups[0], groups[1])
            if name == "tables_delete":
                fake.delete_table(groups[0], groups[1])
                return 204, None
            raise ApiError(404, "notFound", name)

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


class FakeBigQueryServer:
    """`with FakeBigQueryServer(fake) as endpoint:` serves `fake` on a free loopback port."""

    def __init__(self, fake: FakeBigQuery) -> None:
        self.fake = fake
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client(self):  # type: ignore[no-untyped-def]
        """A google-cloud-bigquery client that can only reach this server."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=self.fake.project, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": self.endpoint})

    def __enter__(self) -> FakeBigQueryServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
