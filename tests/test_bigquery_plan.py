"""The `bigquery` merge method: a staged plan inside BigQuery's limits, checked three ways.

- on meaning: every statement is parsed with sqlglot (BigQuery), transpiled to DuckDB and run over the same
  checkpoints; each stage equals its slice of the local merge's output, and the stitched file equals it all;
- at the HTTP boundary: google-cloud-bigquery's load, query (EXPORT DATA), dry-run and delete calls, their
  configurations and deterministic job ids, recorded by a local server that answers like BigQuery;
- on the real shape: 667 tables, ~17,000 columns, planned within the column, table and join limits.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot

from bqx import layout
from bqx.catalog import KEY, TARGET_COLUMNS, Column, Manifest, TableEntry, targets_table
from bqx.errors import BadCheckpoint, TerminalError
from bqx.gcp import storage
from bqx.local.warehouse import Shape, table_specs
from bqx.merge import bigquery as bigquery_plan
from bqx.merge.bigquery import Limits, build_plan

from fakes import apply_env, gcs_env, merge_world
from fakes.bigquery_api import FakeBigQuery, FakeBigQueryServer, StorageGcs

PAIR = "eurusd"
SHAPE = Shape(rows=1500, seed=3, table_scale=0.03, column_scale=0.3)
LIMITS = Limits(max_joins=4, max_columns=90)  # small, so the test world needs several stages


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    # A small budget: the stitch cuts the 1,500 rows into two row groups.
    with merge_world(tmp_path_factory.mktemp("bqplan"), SHAPE, PAIR, memory_budget=1 << 20) as w:
        yield w


@pytest.fixture(autouse=True)
def _gcs_env(world: dict) -> None:
    apply_env(gcs_env(world["endpoint"]))


@pytest.fixture
def bq(world: dict) -> Iterator[tuple[FakeBigQuery, FakeBigQueryServer]]:
    s = world["settings"]
    fake = FakeBigQuery(s.project, gcs=StorageGcs(world["endpoint"], s.project), export_rows_per_file=400)
    with FakeBigQueryServer(fake) as server:
        yield fake, server


def run_plan(world: dict, server: FakeBigQueryServer, limits: Limits = LIMITS) -> tuple[pa.Table, object]:
    sink = io.BytesIO()
    stats = bigquery_plan.merge(world["settings"], world["manifest"], sink, server.client(), {"bqx.method": "bigquery"},
                              limits=limits)
    assert stats.bytes == len(sink.getvalue())
    return pq.read_table(io.BytesIO(sink.getvalue())), stats


def assert_same_output(got: pa.Table, reference: pa.Table) -> None:
    assert got.column_names == reference.column_names
    assert got.schema.equals(reference.schema, check_metadata=False)
    assert got.num_rows == reference.num_rows
    assert got.equals(reference)  # values, nulls, types, row order


def test_every_statement_transpiles_and_each_stage_equals_its_slice(world: dict) -> None:
    s, manifest, ref = world["settings"], world["manifest"], world["reference"]
    plan = build_plan(s, manifest, s.project, LIMITS)
    assert len(plan.stages) >= 4 and len(plan.statements()) == 2 * len(plan.stages)
    # An in-process fake: load the checkpoints into DuckDB tables the way a load job does.
    fake = FakeBigQuery(s.project, gcs=StorageGcs(world["endpoint"], s.project))
    fake.insert_dataset({"datasetReference": {"datasetId": s.temp_dataset}})
    for ld in plan.loads:
        job = fake.insert_job({"configuration": {"load": {
            "sourceUris": [ld.source_uri], "sourceFormat": "PARQUET", "writeDisposition": "WRITE_TRUNCATE",
            "destinationTable": {"projectId": s.project, "datasetId": s.temp_dataset, "tableId": ld.temp_table}}}})
        assert "errorResult" not in job["status"], job["status"]
    seen = []
    for st in plan.stages:
        for sql in (st.select_sql, st.export_sql):
            tree = sqlglot.parse_one(sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
            assert tree.find(sqlglot.exp.Order) is not None  # every stage is ordered by interval_time
        duck, refs = fake.to_duckdb(st.select_sql)
        assert len(refs) == st.tables and st.joins <= LIMITS.max_joins
        got = fake.con.sql(duck.sql(dialect="duckdb")).to_arrow_table()
        want = ref.select(list(st.columns))
        assert got.column_names == list(st.columns) and len(st.columns) <= LIMITS.max_columns
        assert got.cast(want.schema).equals(want), f"stage {st.index}"
        seen += list(st.columns[1:])
    assert [KEY, *seen] == ref.column_names  # the stages partition the output's columns, in order


def test_bigquery_method_end_to_end_matches_local_merge(world: dict, bq) -> None:  # type: ignore[no-untyped-def]
    fake, server = bq
    s, manifest = world["settings"], world["manifest"]
    plan = build_plan(s, manifest, s.project, LIMITS)
    got, stats = run_plan(world, server)
    assert_same_output(got, world["reference"])
    assert stats.rows == world["reference"].num_rows and stats.stages == len(plan.stages) >= 4
    assert stats.row_groups == 2 and stats.stages_reused == 0
    assert stats.bytes_processed > 0 and stats.estimated_cost_usd > 0
    assert stats.bytes_processed == sum(fake.dry_run_bytes)  # the sum of every stage's dry run
    assert len(fake.dry_run_bytes) == len(plan.stages)

    # The temp dataset: created with a default table expiration as a backstop.
    ds_calls = [r for r in fake.requests if r.method == "POST" and r.path.endswith("/datasets")]
    assert ds_calls and ds_calls[0].body["defaultTableExpirationMs"] == str(bigquery_plan.TEMP_TABLE_TTL_MS)
    assert ds_calls[0].body["datasetReference"] == {"projectId": s.project, "datasetId": s.temp_dataset}

    # Load jobs: one per checkpoint, Parquet from its gs:// URI into its own temp table, deterministic id.
    loads = [r.body for r in fake.requests if r.method == "POST" and r.path.endswith("/jobs")
             and "load" in r.body["configuration"]]
    assert sorted(b["configuration"]["load"]["sourceUris"][0] for b in loads) == sorted(
        f"gs://{s.staging_bucket}/{t.checkpoint}" for t in manifest.tables)
    for b in loads:
        cfg = b["configuration"]["load"]
        assert cfg["sourceFormat"] == "PARQUET" and cfg["writeDisposition"] == "WRITE_TRUNCATE"
        assert cfg["destinationTable"]["datasetId"] == s.temp_dataset
        table = cfg["sourceUris"][0].rsplit("/", 1)[1].removesuffix(".parquet")
        assert cfg["destinationTable"]["tableId"] == layout.bigquery_temp_table(PAIR, manifest.run_id, table)
        assert b["jobReference"]["jobId"].startswith(f"bqx_{PAIR}_{manifest.run_id}_load_{table}_")
        assert b["jobReference"]["jobId"].endswith("_a0")

    # Query jobs: exactly one EXPORT DATA per stage, with the plan's SQL and job id; a dry run of each SELECT.
    queries = {r.body["jobReference"]["jobId"]: r.body["configuration"]["query"] for r in fake.requests
               if r.method == "POST" and r.path.endswith("/jobs") and "query" in r.body["configuration"]
               and not r.body["configuration"].get("dryRun")}
    assert queries == {plan.job_id(f"stage{st.index:03d}", st.key, 0): {"query": st.export_sql,
                                                                         "useLegacySql": False}
                       for st in plan.stages}
    assert sorted(d["query"]["query"] for d in fake.dry_runs()) == sorted(st.select_sql for st in plan.stages)
    assert all(st.export_sql.startswith("EXPORT DATA OPTIONS (uri = 'gs://") and "part-*.parquet" in st.export_sql
               for st in plan.stages)
    assert len(fake.statements) == len(plan.stages)  # each export ran, transpiled, on DuckDB

    # Cleanup: every temp table deleted, none left; the exports deleted after the stitch.
    assert sorted(fake.deleted_tables()) == sorted(ld.temp_table for ld in plan.loads)
    assert fake.table_names(s.temp_dataset) == []
    assert storage.list_names(s, s.staging_bucket, layout.bigquery_exports(PAIR, manifest.run_id)) == {}


def test_failure_deletes_temp_tables_and_retry_resumes_without_paying_twice(world: dict, bq) -> None:  # type: ignore[no-untyped-def]
    fake, server = bq
    s, manifest = world["settings"], world["manifest"]
    plan = build_plan(s, manifest, s.project, LIMITS)
    doomed = plan.stages[1]
    fake.fail_job = lambda kind, cfg: ("Resources exceeded during query execution" if kind == "query"
                                       and doomed.export_prefix in cfg["query"]["query"] else None)
    with pytest.raises(TerminalError, match="stage001"):
        run_plan(world, server)
    assert sorted(fake.deleted_tables()) == sorted(ld.temp_table for ld in plan.loads)
    assert fake.table_names(s.temp_dataset) == []
    exported = storage.list_names(s, s.staging_bucket, layout.bigquery_exports(PAIR, manifest.run_id))
    assert exported and all(doomed.export_prefix not in n for n in exported)  # finished stages kept for a retry

    fake.fail_job = None
    fake.requests.clear()
    got, stats = run_plan(world, server)
    assert_same_output(got, world["reference"])
    assert stats.stages_reused == len(plan.stages) - 1
    inserted = [r for r in fake.requests if r.method == "POST" and r.path.endswith("/jobs")
                and "query" in r.body["configuration"] and not r.body["configuration"].get("dryRun")]
    # The failed stage's first id answers 409 duplicate (a failed job): the retry runs as attempt 1.
    assert [(r.body["jobReference"]["jobId"], r.status) for r in inserted] == [
        (plan.job_id("stage001", doomed.key, 0), 409), (plan.job_id("stage001", doomed.key, 1), 200)]
    loaded = {r.body["configuration"]["load"]["destinationTable"]["tableId"] for r in fake.requests
              if r.method == "POST" and r.path.endswith("/jobs") and "load" in r.body["configuration"]}
    assert loaded == {layout.bigquery_temp_table(PAIR, manifest.run_id, n)
                      for n in (targets_table(PAIR), *(f.name for f in doomed.features))}
    assert [d["query"]["query"] for d in fake.dry_runs()] == [doomed.select_sql]  # only what will be billed
    assert fake.table_names(s.temp_dataset) == []


def test_crash_during_stitch_then_retry_reuses_every_stage(world: dict, bq, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake, server = bq
    s, manifest = world["settings"], world["manifest"]
    plan = build_plan(s, manifest, s.project, LIMITS)

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("merge job killed while stitching")

    with monkeypatch.context() as m:
        m.setattr(bigquery_plan, "stitch", killed)
        with pytest.raises(RuntimeError):
            run_plan(world, server)
    assert fake.table_names(s.temp_dataset) == []  # temp tables went before the stitch began
    fake.requests.clear()
    got, stats = run_plan(world, server)
    assert_same_output(got, world["reference"])
    assert stats.stages_reused == len(plan.stages) and stats.loads == 0 and stats.bytes_processed == 0
    posted = [r for r in fake.requests if r.method == "POST"]
    assert posted == []  # no load, no dry run, no query: nothing paid twice
    assert {r.path.rsplit("/", 1)[1] for r in fake.requests if "/jobs/" in r.path} == {
        plan.job_id(f"stage{st.index:03d}", st.key, 0) for st in plan.stages}


def test_rerun_after_cleanup_reattaches_then_runs_the_next_attempt(world: dict, bq) -> None:  # type: ignore[no-untyped-def]
    fake, server = bq
    s, manifest = world["settings"], world["manifest"]
    plan = build_plan(s, manifest, s.project, LIMITS)
    run_plan(world, server)
    fake.requests.clear()
    # The same run merged again (e.g. publishing failed after the exports were cleaned up): every stage's
    # first job id answers 409 with a DONE job whose files are gone, so attempt 1 runs.
    got, stats = run_plan(world, server)
    assert_same_output(got, world["reference"])
    assert stats.stages_reused == 0
    inserted = sorted((r.body["jobReference"]["jobId"], r.status) for r in fake.requests
                      if r.method == "POST" and r.path.endswith("/jobs") and "query" in r.body["configuration"]
                      and not r.body["configuration"].get("dryRun"))
    assert inserted == sorted([(plan.job_id(f"stage{st.index:03d}", st.key, a), 409 if a == 0 else 200)
                               for st in plan.stages for a in (0, 1)])


def test_stitch_refuses_exports_whose_keys_differ(world: dict, bq) -> None:  # type: ignore[no-untyped-def]
    fake, server = bq
    s, manifest = world["settings"], world["manifest"]
    original = fake._write_files

    def corrupt(uri: str, table: pa.Table) -> list[str]:  # a stage exported out of order
        if "stage-002-" in uri:
            table = table.take(pa.array(list(range(1, table.num_rows)) + [0]))
        return original(uri, table)

    fake._write_files = corrupt  # type: ignore[method-assign]
    with pytest.raises(BadCheckpoint, match="keys differ"):
        run_plan(world, server)
    assert fake.table_names(s.temp_dataset) == []
    bigquery_plan.delete_exports(s, build_plan(s, manifest, s.project, LIMITS))


# ---------------------------------------------------------------------------------------------- the real shape


def real_manifest(pair: str = PAIR, run_id: str = "rreal") -> Manifest:
    """The real warehouse's shape: 667 feature tables, ~17,000 feature columns, 49 targets."""
    targets = TableEntry(targets_table(pair), "targets",
                         (Column(KEY, "timestamp[us, tz=UTC]"), *(Column(c, "double") for c in TARGET_COLUMNS)),
                         layout.checkpoint(pair, run_id, targets_table(pair)))
    features = tuple(
        TableEntry(sp.name, "feature",
                   (Column(KEY, "timestamp[us, tz=UTC]"), *(Column(f"f{j:03d}", "double") for j in range(sp.columns))),
                   layout.checkpoint(pair, run_id, sp.name))
        for sp in table_specs(pair, Shape())
    )
    return Manifest(pair, run_id, (targets, *features))


def test_real_shape_plan_respects_bigquery_limits(world: dict) -> None:
    s = world["settings"]
    manifest = real_manifest()
    assert len(manifest.features) == 667
    plan = build_plan(s, manifest, s.project)
    summary = bigquery_plan.plan_summary(plan)
    total = 1 + sum(len(t.value_columns) for t in manifest.tables)
    assert total > bigquery_plan.MAX_TABLE_COLUMNS  # one table could never hold it
    assert summary["columns"] == total and summary["loads"] == 668
    assert summary["max_stage_columns"] <= bigquery_plan.STAGE_MAX_COLUMNS < bigquery_plan.MAX_TABLE_COLUMNS
    assert summary["max_stage_joins"] <= bigquery_plan.STAGE_MAX_JOINS
    assert summary["max_stage_tables"] <= bigquery_plan.MAX_TABLES_PER_QUERY
    assert summary["max_sql_chars"] <= bigquery_plan.STAGE_MAX_SQL_CHARS
    assert summary["stages"] == -(-667 // bigquery_plan.STAGE_MAX_JOINS)  # 14: joins, not columns, bind
    assert sum(st.joins for st in plan.stages) == 667
    assert sum(len(st.columns) - 1 for st in plan.stages) == total - 1
    assert len({st.export_prefix for st in plan.stages}) == len(plan.stages)
    tree = sqlglot.parse_one(plan.stages[-1].export_sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
    assert len(list(tree.find_all(sqlglot.exp.Join))) == plan.stages[-1].joins
    # Job ids are deterministic: the same run plans the same ids; another run, others.
    again = build_plan(s, real_manifest(), s.project)
    assert [st.key for st in again.stages] == [st.key for st in plan.stages]
    other = build_plan(s, real_manifest(run_id="rother"), s.project)
    assert plan.job_id("stage000", plan.stages[0].key, 0) != other.job_id("stage000", other.stages[0].key, 0)


def test_limits_are_validated_and_a_too_wide_table_is_refused(world: dict) -> None:
    with pytest.raises(TerminalError):
        Limits(max_joins=1000)
    with pytest.raises(TerminalError):
        Limits(max_columns=10_001)
    manifest = real_manifest()
    with pytest.raises(TerminalError, match="over the stage limit"):
        build_plan(world["settings"], manifest, "p", Limits(max_columns=100))  # a table has 232 columns
