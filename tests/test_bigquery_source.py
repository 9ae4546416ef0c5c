"""The extract job's BigQuery source, end to end against a local server answering like the BigQuery REST API:
the checkpoints it produces are identical to the DuckDB source's for the same warehouse."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import extract, storage
from bqx.catalog import Manifest
from bqx.errors import TerminalError
from bqx.source import BigQuerySource, DuckDBSource
from bqx.warehouse import Shape, Warehouse

from fakes import apply_env, create_buckets, fake_gcs_server, gcs_env, local_settings
from fakes.bigquery_api import FakeBigQuery, FakeBigQueryServer

PAIR = "eurusd"
SHAPE = Shape(rows=240, seed=5, table_scale=0.03, column_scale=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("bqsource")
    warehouse = root / "warehouse.duckdb"
    with fake_gcs_server(root / "gcs") as endpoint:
        apply_env(gcs_env(endpoint))
        settings = local_settings(root, endpoint, warehouse=str(warehouse))
        Warehouse(warehouse, settings.dataset).generate(PAIR, SHAPE)
        create_buckets(settings, settings.staging_bucket)
        fake = FakeBigQuery(settings.project, warehouse=warehouse, default_page_rows=100)
        with FakeBigQueryServer(fake) as server:
            yield {"settings": settings, "fake": fake, "server": server, "endpoint": endpoint}


@pytest.fixture(autouse=True)
def _gcs_env(world: dict) -> None:
    apply_env(gcs_env(world["endpoint"]))


def read_checkpoint(settings, name: str) -> pa.Table:  # type: ignore[no-untyped-def]
    data = storage.bucket(settings, settings.staging_bucket).blob(name).download_as_bytes()
    return pq.read_table(io.BytesIO(data))


def test_checkpoints_identical_to_duckdb_source(world: dict) -> None:
    s, fake, server = world["settings"], world["fake"], world["server"]
    duck = DuckDBSource(s.warehouse, s.dataset)
    bq = BigQuerySource(s, client=server.client())
    fake.requests.clear()
    r_duck = extract.run(s, PAIR, "rduck", source=duck)
    r_bq = extract.run(s, PAIR, "rbq", source=bq)
    assert r_bq.written == r_duck.written == len(r_duck.tables) > 10

    m_duck = Manifest.from_json(storage.read_json(s, s.staging_bucket, f"runs/{PAIR}/rduck/manifest.json")[0])
    m_bq = Manifest.from_json(storage.read_json(s, s.staging_bucket, f"runs/{PAIR}/rbq/manifest.json")[0])
    assert [(t.name, t.role, t.columns) for t in m_bq.tables] == [(t.name, t.role, t.columns) for t in m_duck.tables]
    assert m_bq.source.startswith("bigquery:") and m_duck.source.startswith("duckdb:")
    assert any(c.type == "int64" for t in m_bq.tables for c in t.columns)  # not only doubles went through

    for a, b in zip(m_duck.tables, m_bq.tables, strict=True):
        ta, tb = read_checkpoint(s, a.checkpoint), read_checkpoint(s, b.checkpoint)
        assert tb.schema.metadata[b"bqx.run_id"] == b"rbq"
        assert tb.schema.equals(ta.schema, check_metadata=False), a.name
        assert tb.equals(ta), a.name  # values, nulls, order, microsecond UTC keys
        assert tb.num_rows >= SHAPE.rows - 40  # gaps are allowed, empty tables are not what this tests

    # At the HTTP boundary: one parameterised discovery query, then one ordered, quoted read per table,
    # its results paged with int64 timestamps.
    queries = [c["query"] for c in fake.jobs_of("query")]
    discovery = [q for q in queries if "INFORMATION_SCHEMA.COLUMNS" in q["query"]]
    assert len(discovery) == 1
    assert discovery[0]["queryParameters"] == [
        {"name": "pattern", "parameterType": {"type": "STRING"}, "parameterValue": {"value": f"%{PAIR}%"}}]
    assert discovery[0]["parameterMode"] == "NAMED" and discovery[0]["useLegacySql"] is False
    reads = sorted(q["query"] for q in queries if q not in discovery)
    assert reads == sorted(
        f"SELECT * FROM `{s.project}`.`{s.dataset}`.`{t.name}` ORDER BY `interval_time`" for t in m_bq.tables)
    pages = [r for r in fake.requests if "/queries/" in r.path and r.params.get("maxResults") != "0"]
    assert pages and all(r.params.get("formatOptions.useInt64Timestamp", "").lower() == "true" for r in pages)
    assert len(pages) > len(m_bq.tables)  # tables of 240 rows at 100 rows a page: several pages each


def test_estimate_is_a_dry_run_and_row_limit_limits(world: dict) -> None:
    s, fake, server = world["settings"], world["fake"], world["server"]
    bq = BigQuerySource(s, client=server.client())
    table = f"targets_{PAIR}"
    jobs_before = len(fake.jobs)
    fake.requests.clear()
    estimate = bq.estimate_bytes(table)
    assert estimate == SHAPE.rows * 50 * 8  # the fake bills rows x columns x 8 bytes
    assert len(fake.jobs) == jobs_before  # a dry run creates no job
    assert [c["dryRun"] for c in fake.dry_runs()] == [True]
    assert fake.dry_runs()[0]["query"]["useQueryCache"] is False

    limited = pa.Table.from_batches(list(bq.read(table, row_limit=17)))
    full = pa.Table.from_batches(list(DuckDBSource(s.warehouse, s.dataset).read(table, row_limit=17)))
    assert limited.num_rows == 17
    assert limited.equals(full.cast(limited.schema))


def test_identifiers_are_quoted_and_table_names_checked(world: dict) -> None:
    s, server = world["settings"], world["server"]
    bq = BigQuerySource(s, client=server.client())
    assert "`targets_eurusd`" in bq.read_sql("targets_eurusd")
    with pytest.raises(TerminalError):
        bq.read_sql("x`; DROP TABLE y; --")
    with pytest.raises(TerminalError):
        bq.discover("gbpusd")  # the warehouse has no gbpusd tables: no targets, a clear error
