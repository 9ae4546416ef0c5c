"""The extract job's BigQuery source, end to end against a local server answering like the BigQuery REST API:
the checkpoints it produces are identical to the DuckDB source's for the same warehouse; its fingerprints come from
the dataset's __TABLES__, and a table whose fingerprint is unchanged since the published run is copied, not read."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.catalog import KEY, Manifest
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
    # Every read is as of the run's snapshot (the manifest's), and every feature is LEFT JOINed onto the targets' keys.
    reads = sorted(q["query"] for q in queries if q not in discovery)
    ds, k = f"`{s.project}`.`{s.dataset}`", "`interval_time`"
    as_of = f" FOR SYSTEM_TIME AS OF TIMESTAMP_MICROS({round(m_bq.snapshot_at * 1e6)})"
    targets = f"{ds}.`{m_bq.targets.name}`{as_of}"
    assert m_bq.snapshot_at > 0 and m_bq.grid is not None
    assert reads == sorted([f"SELECT {k} FROM {targets} ORDER BY {k}",  # the grid, when the manifest was built
                            f"SELECT * FROM {targets} ORDER BY {k}",
                            *(f"SELECT t.* REPLACE (k.{k} AS {k}) FROM (SELECT {k} FROM {targets} ORDER BY {k}) AS k "
                              f"LEFT JOIN {ds}.`{t.name}` AS t{as_of} ON t.{k} = k.{k} ORDER BY k.{k}"
                              for t in m_bq.features)])
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

    def reads() -> list[str]:  # the queries that read a table's rows (not discovery, not the grid's key read)
        return [c["query"]["query"] for c in fake.jobs_of("query")
                if c["query"]["query"].startswith(("SELECT * FROM", "SELECT t.*"))]

    first = extract.run(s, PAIR, "rfp1", source=bq)
    assert first.reused == 0
    publish("rfp1")
    touched = sorted(t.table for t in first.tables)[5]
    fake.touch(s.dataset, touched)
    fake.requests.clear()
    second = extract.run(s, PAIR, "rfp2", source=bq)
    m2 = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(PAIR, "rfp2"))[0])
    # the warehouse is read for the touched table only
    assert reads() == [bq.aligned_sql(touched, m2.targets.name, 0, m2.snapshot_at)]
    assert {t.table for t in second.tables if not t.reused} == {touched}
    assert second.reused == len(second.tables) - 1 and all(t.reused_from == "rfp1" for t in second.tables
                                                            if t.reused)
    assert {t.name for t in m2.tables if not t.reused_from} == {touched}
    assert all(t.fingerprint for t in m2.tables)
    bucket = storage.bucket(s, s.staging_bucket)
    for t in m2.tables:
        assert read_checkpoint(s, t.checkpoint).equals(read_checkpoint(s, layout.checkpoint(PAIR, "rfp1", t.name)))
        if t.reused_from:  # the copy carries metadata of its own: not the source's validation marker
            assert bucket.get_blob(t.checkpoint).metadata == {"run_id": "rfp2", "table": t.name,
                                                              "reused_from": "rfp1", "bqx_grid": m2.grid.keys_sha256}

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

    # Aligned checkpoints are reused only onto the same grid: the published run's digest must equal the new one.
    same = extract.plan_reuse(s, extract.build_manifest(PAIR, "rfp5", bq.discover(PAIR), bq.name, 0, m2.grid))
    assert all(t.reused_from == "rfp2" for t in same.tables)
    other = dataclasses.replace(m2.grid, keys_sha256="0" * 64)
    moved = extract.plan_reuse(s, extract.build_manifest(PAIR, "rfp6", bq.discover(PAIR), bq.name, 0, other))
    assert not any(t.reused_from for t in moved.tables)
    unaligned = extract.plan_reuse(s, extract.build_manifest(PAIR, "rfp7", bq.discover(PAIR), bq.name, 0, None))
    assert not any(t.reused_from for t in unaligned.tables)  # aligned checkpoints are not an unaligned run's


def test_item10_every_bigquery_read_is_as_of_the_manifest_snapshot_and_limited_by_the_targets(world: dict) -> None:
    """With a row limit: one snapshot time in the manifest, in every query that reads a table (the grid's key read,
    the targets', each feature's join), and each feature limited to the targets' first keys, not its own first rows
    (a table that starts earlier than the targets shares none of its first rows' keys with them)."""
    s, fake, server = world["settings"], world["fake"], world["server"]
    bq = BigQuerySource(s, client=server.client())
    limited = dataclasses.replace(s, row_limit=20)
    fake.requests.clear()
    extract.run(limited, PAIR, "ritem10", source=bq)
    m = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(PAIR, "ritem10"))[0])
    assert m.row_limit == 20 and m.grid is not None and m.grid.rows == 20 and m.snapshot_at > 0
    as_of = f"FOR SYSTEM_TIME AS OF TIMESTAMP_MICROS({round(m.snapshot_at * 1e6)})"
    reads = [c["query"]["query"] for c in fake.jobs_of("query")
             if "INFORMATION_SCHEMA" not in c["query"]["query"] and "__TABLES__" not in c["query"]["query"]]
    assert len(reads) == len(m.tables) + 1
    for q in reads:  # every table reference of every read carries the snapshot
        assert q.count(" FOR SYSTEM_TIME AS OF ") == q.count(f"`{s.dataset}`.") and as_of in q, q
    targets = read_checkpoint(s, m.targets.checkpoint)
    early = 0
    for t in m.features:
        cp = read_checkpoint(s, t.checkpoint)
        own = pa.Table.from_batches(list(DuckDBSource(s.warehouse, s.dataset).read(t.name, row_limit=20)))
        assert cp.column(KEY).equals(targets.column(KEY)), t.name
        if own.column(KEY)[0].as_py() < targets.column(KEY)[0].as_py():  # starts earlier than the targets
            early += 1
            value = cp.column(cp.schema.names[1])
            assert value.null_count < cp.num_rows, t.name  # joined values, not an all-null column
    assert early > 0  # the shape has tables that start earlier
