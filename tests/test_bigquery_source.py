"""The extract job's BigQuery source, end to end against a local server answering like the BigQuery REST API:
the checkpoints it produces are identical to the DuckDB source's for the same warehouse; its fingerprints come from
the dataset's __TABLES__, and a table whose fingerprint is unchanged since the published run is copied, not read."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.catalog import Manifest
from bqx.errors import TerminalError
from bqx.extract import run as extract
from bqx.extract.sources import BigQuerySource, DuckDBSource
from bqx.gcp import storage
from bqx.local.warehouse import Shape, Warehouse

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

    # At the HTTP boundary: two parameterised discovery queries (columns; modification times and row counts), then
    # one ordered, quoted read per table, its results paged with int64 timestamps.
    queries = [c["query"] for c in fake.jobs_of("query")]
    discovery = [q for q in queries if "INFORMATION_SCHEMA.COLUMNS" in q["query"] or "__TABLES__" in q["query"]]
    assert len(discovery) == 2
    for q in discovery:
        assert q["queryParameters"] == [
            {"name": "pattern", "parameterType": {"type": "STRING"}, "parameterValue": {"value": f"%{PAIR}%"}}]
        assert q["parameterMode"] == "NAMED" and q["useLegacySql"] is False
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


def test_fingerprints_come_from_tables_metadata_in_one_query(world: dict) -> None:
    s, fake, server = world["settings"], world["fake"], world["server"]
    bq = BigQuerySource(s, client=server.client())
    fake.requests.clear()
    before = {t.name: t for t in bq.discover(PAIR)}
    queries = [c["query"]["query"] for c in fake.jobs_of("query")]
    assert queries == [bq.discover_sql(), bq.tables_sql()]  # two queries, whatever the number of tables
    assert bq.tables_sql() == (f"SELECT table_id, last_modified_time, row_count FROM `{s.project}`.`{s.dataset}`"
                               f".__TABLES__ WHERE table_id LIKE @pattern")
    duck = {t.name: t for t in DuckDBSource(s.warehouse, s.dataset).discover(PAIR)}
    for name, t in before.items():
        modified, rows, digest = t.fingerprint.split("/")
        assert int(modified) == fake.modified[(s.dataset, name)]
        assert rows == duck[name].fingerprint.split("/")[1]  # the same row counts as the warehouse's
        assert len(digest) == 16

    touched = sorted(before)[3]
    fake.touch(s.dataset, touched)
    after = {t.name: t for t in bq.discover(PAIR)}
    assert [n for n in before if before[n].fingerprint != after[n].fingerprint] == [touched]


def test_unchanged_tables_are_copied_from_the_published_run_not_read(world: dict) -> None:
    s, fake, server = world["settings"], world["fake"], world["server"]
    create_buckets(s, s.output_bucket)
    bq = BigQuerySource(s, client=server.client())

    def publish(run_id: str) -> None:  # what the merge leaves behind that matters here: the summary naming the run
        storage.write_json(s, s.output_bucket, layout.summary(PAIR), {"pair": PAIR, "run_id": run_id})

    def reads() -> list[str]:
        return [c["query"]["query"] for c in fake.jobs_of("query") if c["query"]["query"].startswith("SELECT * FROM")]

    first = extract.run(s, PAIR, "rfp1", source=bq)
    assert first.reused == 0
    publish("rfp1")
    touched = sorted(t.table for t in first.tables)[5]
    fake.touch(s.dataset, touched)
    fake.requests.clear()
    second = extract.run(s, PAIR, "rfp2", source=bq)
    assert reads() == [bq.read_sql(touched)]  # the warehouse is read for the touched table only
    assert {t.table for t in second.tables if not t.reused} == {touched}
    assert second.reused == len(second.tables) - 1 and all(t.reused_from == "rfp1" for t in second.tables
                                                            if t.reused)
    m2 = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(PAIR, "rfp2"))[0])
    assert {t.name for t in m2.tables if not t.reused_from} == {touched}
    assert all(t.fingerprint for t in m2.tables)
    bucket = storage.bucket(s, s.staging_bucket)
    for t in m2.tables:
        assert read_checkpoint(s, t.checkpoint).equals(read_checkpoint(s, layout.checkpoint(PAIR, "rfp1", t.name)))
        if t.reused_from:  # the copy carries metadata of its own: not the source's validation marker
            assert bucket.get_blob(t.checkpoint).metadata == {"run_id": "rfp2", "table": t.name,
                                                              "reused_from": "rfp1"}

    # A checkpoint to reuse that is gone by the time it is copied: the table is extracted instead.
    m_gone = Manifest("eurusd", "rfp3", tuple(
        t.__class__(t.name, t.role, t.columns, layout.checkpoint(PAIR, "rfp3", t.name), t.fingerprint, "rnothere")
        for t in m2.tables[:1]))
    fake.requests.clear()
    result = extract.copy_checkpoint(s, bq, m_gone, m_gone.tables[0])
    assert not result.reused and result.rows > 0 and reads() == [bq.read_sql(m_gone.tables[0].name)]

    # Another row limit, or a manifest without fingerprints (written before them), reuses nothing.
    publish("rfp2")
    limited = extract.plan_reuse(s, extract.build_manifest(PAIR, "rfp4", bq.discover(PAIR), bq.name, 17))
    assert not any(t.reused_from for t in limited.tables)
    legacy = Manifest.from_json({**m2.to_json(), "tables": [
        {k: v for k, v in t.items() if k not in ("fingerprint", "reused_from")} for t in m2.to_json()["tables"]]})
    assert not any(t.fingerprint or t.reused_from for t in legacy.tables)
