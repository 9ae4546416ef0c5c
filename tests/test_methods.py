"""Merge methods `polars` and `bigquery` through bqx.merge.publish.write_output (and publish.merge_run): the same
content as the local streaming merge; an unknown method is a clear error before any work starts."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.config import Settings
from bqx.errors import ConfigError
from bqx.gcp import storage
from bqx.local.warehouse import Shape
from bqx.merge import bigquery, polars, publish
from bqx.merge.plan import MergeJob
from bqx.merge.stitch import Stitcher

from fakes import apply_env, gcs_env, merge_world
from fakes.bigquery_api import FakeBigQuery, FakeBigQueryServer, StorageGcs

PAIR = "eurusd"
SHAPE = Shape(rows=1500, seed=9, table_scale=0.03, column_scale=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with merge_world(tmp_path_factory.mktemp("methods"), SHAPE, PAIR, run_id="rmeth", memory_budget=1 << 20) as w:
        yield w


@pytest.fixture(autouse=True)
def _gcs_env(world: dict) -> None:
    apply_env(gcs_env(world["endpoint"]))


def temp_blob(settings: Settings, run_id: str = "rmeth"):  # type: ignore[no-untyped-def]
    return storage.bucket(settings, settings.output_bucket).blob(layout.output_temp(PAIR, run_id))


def read_blob(blob) -> pq.ParquetFile:  # type: ignore[no-untyped-def]
    return pq.ParquetFile(io.BytesIO(blob.download_as_bytes()))


def test_polars_method_matches_local_merge(world: dict) -> None:
    s, manifest, ref = world["settings"], world["manifest"], world["reference"]
    blob = temp_blob(s)
    stats = publish.write_output("polars", MergeJob(s, manifest, s.memory_budget, {"bqx.method": "polars"}), blob)
    data = blob.download_as_bytes()
    f = pq.ParquetFile(io.BytesIO(data))
    got = f.read()
    assert got.column_names == ref.column_names
    assert got.schema.equals(ref.schema, check_metadata=False)
    assert got.equals(ref)
    assert f.metadata.num_row_groups == 2 == stats.row_groups  # 1,500 rows in a 1 MiB budget: two slices
    assert f.metadata.metadata[b"bqx.method"] == b"polars"
    assert (stats.rows, stats.columns, stats.bytes) == (ref.num_rows, ref.num_columns, len(data))


def test_polars_memory_is_bounded_by_row_slices_and_column_groups(world: dict, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s, manifest, ref = world["settings"], world["manifest"], world["reference"]
    shapes: list[tuple[int, int]] = []
    original = Stitcher.add

    def spy(self: Stitcher, group: int, table) -> None:  # type: ignore[no-untyped-def]
        shapes.append((table.num_rows, table.num_columns))
        original(self, group, table)

    monkeypatch.setattr(Stitcher, "add", spy)
    sink = io.BytesIO()
    polars.polars_merge(s, manifest, sink, max_group_columns=40)
    assert pq.read_table(io.BytesIO(sink.getvalue())).equals(ref)
    widest_table = max(len(t.value_columns) for t in manifest.features)
    # Each collect holds one row slice of one column group (a group grows past 40 only by one table).
    assert max(r for r, _ in shapes) <= 750
    assert max(c for _, c in shapes[1:]) < 40 + widest_table
    assert len(shapes) > 2 * (1 + ref.num_columns // (40 + widest_table))


def test_bigquery_method_via_methods_run(world: dict) -> None:
    s, manifest, ref = world["settings"], world["manifest"], world["reference"]
    fake = FakeBigQuery(s.project, gcs=StorageGcs(world["endpoint"], s.project), export_rows_per_file=500)
    with FakeBigQueryServer(fake) as server:
        blob = temp_blob(s)
        bq = replace(s, bigquery_api_endpoint=server.endpoint)  # the client bqx.gcp.clients makes, pointed at it
        stats = publish.write_output("bigquery", MergeJob(bq, manifest, bq.memory_budget, {"bqx.method": "bigquery"}),
                                     blob)
    assert read_blob(blob).read().equals(ref)
    assert stats.stages == 1 and stats.estimated_cost_usd > 0  # default limits: this small pair fits one stage
    assert len(fake.jobs_of("load")) == len(manifest.tables) and len(fake.jobs_of("query")) == 1
    assert fake.table_names(s.temp_dataset) == []


@pytest.mark.parametrize("method", ["polars", "bigquery"])
def test_merge_run_publishes_with_each_method(world: dict, method: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s, manifest, ref = world["settings"], world["manifest"], world["reference"]
    fake = FakeBigQuery(s.project, gcs=StorageGcs(world["endpoint"], s.project))
    with FakeBigQueryServer(fake) as server:
        summary = publish.merge_run(replace(s, bigquery_api_endpoint=server.endpoint), manifest, method, "exec-1")
    out = storage.bucket(s, s.output_bucket).blob(layout.output(PAIR))
    f = read_blob(out)
    assert f.read().equals(ref)
    assert f.metadata.metadata[b"bqx.method"] == method.encode()
    assert summary["method"] == method and summary["rows"] == ref.num_rows
    if method == "bigquery":
        assert summary["stats"]["estimated_cost_usd"] > 0 and summary["stats"]["bytes_processed"] > 0
    else:
        assert fake.requests == []  # polars never talks to BigQuery


class Untouchable:
    def open(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the method was checked")


def test_unknown_method_is_a_clear_error_before_any_work(world: dict) -> None:
    s, manifest = world["settings"], world["manifest"]
    with pytest.raises(ConfigError, match="unknown merge method 'spark'.*auto, stream, compose, polars, bigquery"):
        publish.write_output("spark", MergeJob(s, manifest, s.memory_budget), Untouchable())
    with pytest.raises(ConfigError, match="unknown merge method 'spark'"):  # before it reads anything
        publish.merge_run(replace(s, staging_bucket="no-such-bucket"), manifest, "spark")
    assert publish.method("bigquery") is bigquery.run


def test_merge_method_env_selects_and_validates(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MERGE_METHOD", "polars")
    assert Settings.from_env().merge_method == "polars"
    monkeypatch.setenv("MERGE_METHOD", "bigquery")
    assert Settings.from_env().merge_method == "bigquery"
    monkeypatch.setenv("MERGE_METHOD", "pandas")
    with pytest.raises(ConfigError, match="unknown merge method"):
        Settings.from_env()
