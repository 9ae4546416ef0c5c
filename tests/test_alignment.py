"""The aligned extract (issue 19) and the extract's part of issue 17 (items 10 and 11), against DuckDB warehouses
built here and fake-gcs-server: every checkpoint is its table LEFT JOINed onto the targets' keys, on the manifest's
grid (row count, row groups, key digest); the validator holds an aligned run's checkpoints to that grid; a row limit
limits every table by the targets' keys; one snapshot time for the whole run; column names are checked when the
manifest is built; tables of an unknown family are listed, not dropped without a word."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.catalog import KEY, IgnoredTable, Manifest
from bqx.completion.inspect import inspect
from bqx.errors import TerminalError
from bqx.extract import run as extract
from bqx.extract.sources import DuckDBSource
from bqx.gcp import storage
from bqx.local.warehouse import Warehouse
from bqx.parquet.conventions import CHECKPOINT_ROW_GROUP, WRITER_OPTIONS

MINUTE = 60_000_000
T0 = "TIMESTAMPTZ '2024-01-01 00:00:00+00'"


def warehouse(path: Path, dataset: str, tables: dict[str, str]) -> Path:
    """A DuckDB warehouse of `tables` (name -> SELECT over range(i)), versioned like the synthetic one."""
    con = duckdb.connect(str(path))
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{dataset}"')
    for name, select in tables.items():
        con.execute(f'CREATE OR REPLACE TABLE "{dataset}"."{name}" AS {select}')
    con.close()
    return path


def _minutes(i: str) -> str:
    return f"{T0} + INTERVAL ({i}) MINUTE AS interval_time"


def _read(s, name: str) -> pa.Table:  # type: ignore[no-untyped-def]
    return pq.read_table(io.BytesIO(storage.bucket(s, s.staging_bucket).blob(name).download_as_bytes()))


def _manifest(s, pair: str, run_id: str) -> Manifest:  # type: ignore[no-untyped-def]
    return Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(pair, run_id))[0])


ROWS = CHECKPOINT_ROW_GROUP + 4_464  # two row groups


@pytest.fixture(scope="module")
def long_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Targets of ROWS minutes; a feature that starts 500 minutes earlier, lacks every third minute and ends early;
    one that starts later; one with no rows."""
    path = tmp_path_factory.mktemp("aligned") / "w.duckdb"
    return warehouse(path, "bqx_ml_v3_features", {
        "targets_eurusd": f"SELECT {_minutes('i')}, i * 1.0 AS target_bqx45_h15 FROM range({ROWS}) t(i)",
        "mom_eurusd_000": f"SELECT {_minutes('i - 500')}, i * 0.5 AS f000, i % 5 AS f001 FROM range({ROWS}) t(i) "
                          "WHERE i % 3 <> 0",
        "vol_eurusd_000": f"SELECT {_minutes('i + 1000')}, i * 2.0 AS f000 FROM range({ROWS}) t(i)",
        "agg_eurusd_000": f"SELECT {_minutes('i')}, 1.0 AS f000 FROM range(0) t(i)",
    })


def test_every_checkpoint_is_its_table_left_joined_onto_the_targets_grid(isolated, long_warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    run_id = "a" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id, source=DuckDBSource(str(long_warehouse), s.dataset))
    m = _manifest(s, "eurusd", run_id)
    keys = (np.arange(ROWS, dtype=np.int64) * MINUTE + 1_704_067_200_000_000)
    assert m.grid is not None
    assert (m.grid.rows, m.grid.row_groups) == (ROWS, (CHECKPOINT_ROW_GROUP, ROWS - CHECKPOINT_ROW_GROUP))
    assert m.grid.keys_sha256 == hashlib.sha256(keys.astype("<i8").tobytes()).hexdigest()
    assert json.loads(json.dumps(m.to_json()))["grid"] == {"rows": ROWS, "row_groups": list(m.grid.row_groups),
                                                          "keys_sha256": m.grid.keys_sha256}
    con = duckdb.connect(str(long_warehouse), read_only=True)
    bucket = storage.bucket(s, s.staging_bucket)
    for entry in m.tables:
        blob = bucket.get_blob(entry.checkpoint)
        assert blob.metadata["bqx_grid"] == m.grid.keys_sha256
        meta = pq.ParquetFile(io.BytesIO(blob.download_as_bytes())).metadata
        assert meta.metadata[b"bqx.grid"] == m.grid.keys_sha256.encode()
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == list(m.grid.row_groups)
        t = _read(s, entry.checkpoint)
        assert t.column(KEY).cast(pa.int64()).to_numpy().tolist() == keys.tolist(), entry.name
        expected = con.sql(f'SELECT k.interval_time, f.* EXCLUDE (interval_time) FROM "{s.dataset}".targets_eurusd '
                           f'k LEFT JOIN "{s.dataset}"."{entry.name}" f USING (interval_time) ORDER BY 1')
        expected = expected.to_arrow_table()
        assert t.equals(expected.cast(t.schema)), entry.name
        verdict = inspect(bucket.blob(entry.checkpoint), blob.size, entry, m.grid)
        assert verdict.ok, verdict.reason
    mom = _read(s, layout.checkpoint("eurusd", run_id, "mom_eurusd_000"))
    assert 0 < mom.column("f000").null_count < ROWS  # the feature's own gaps and end, nothing else
    assert _read(s, layout.checkpoint("eurusd", run_id, "agg_eurusd_000")).column("f000").null_count == ROWS


def test_the_validator_refuses_a_checkpoint_off_the_grid(isolated, long_warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    run_id = "a" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id, source=DuckDBSource(str(long_warehouse), s.dataset))
    m = _manifest(s, "eurusd", run_id)
    entry = next(t for t in m.tables if t.name == "vol_eurusd_000")
    good = _read(s, entry.checkpoint)
    bucket = storage.bucket(s, s.staging_bucket)

    def verdict(table: pa.Table, row_group: int, grid_meta: bool = True):  # type: ignore[no-untyped-def]
        meta = {**(table.schema.metadata or {})}
        if not grid_meta:
            meta.pop(b"bqx.grid")
        sink = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), sink, row_group_size=row_group, **WRITER_OPTIONS)
        blob = bucket.blob(f"scratch/{uuid.uuid4().hex}.parquet")
        blob.upload_from_string(sink.getvalue())
        return inspect(blob, len(sink.getvalue()), entry, m.grid)

    assert verdict(good, CHECKPOINT_ROW_GROUP).ok
    off = verdict(good, 50_000)  # the same rows, cut elsewhere
    assert not off.ok and "row groups of [50000, 20000] rows" in off.reason
    unnamed = verdict(good, CHECKPOINT_ROW_GROUP, grid_meta=False)
    assert not unnamed.ok and "not aligned to the run's grid" in unnamed.reason
    assert inspect(bucket.blob(entry.checkpoint), bucket.get_blob(entry.checkpoint).size, entry, None).ok


class OnlyRead:
    """A source that can only list tables and read them whole (no key read, no join): aligned in Python."""

    def __init__(self, inner: DuckDBSource) -> None:
        self.inner, self.name = inner, inner.name

    def discover(self, pair: str):  # type: ignore[no-untyped-def]
        return self.inner.discover(pair)

    def read(self, table: str, row_limit: int = 0, snapshot_at: float = 0.0) -> Iterator[pa.RecordBatch]:
        for b in self.inner.read(table, row_limit, snapshot_at):
            yield from pa.Table.from_batches([b]).to_batches(max_chunksize=3_001)  # odd batch boundaries


def test_alignment_in_python_equals_the_join_in_the_query(isolated, long_warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    native, python = "n" + uuid.uuid4().hex[:10], "p" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", native, source=DuckDBSource(str(long_warehouse), s.dataset))
    extract.run(s, "eurusd", python, source=OnlyRead(DuckDBSource(str(long_warehouse), s.dataset)))
    a, b = _manifest(s, "eurusd", native), _manifest(s, "eurusd", python)
    assert a.grid == b.grid
    for x, y in zip(a.tables, b.tables, strict=True):
        assert _read(s, x.checkpoint).equals(_read(s, y.checkpoint)), x.name


def test_duplicate_keys_outside_the_targets_range_still_fail_in_python(isolated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from bqx.errors import DuplicateKeys

    s = isolated
    path = warehouse(tmp_path / "d.duckdb", s.dataset, {
        "targets_eurusd": f"SELECT {_minutes('i')}, i * 1.0 AS target_bqx45_h15 FROM range(100) t(i)",
        "mom_eurusd_000": f"SELECT {_minutes('i // 2 - 100')}, i * 1.0 AS f000 FROM range(20) t(i)",
    })
    with pytest.raises(DuplicateKeys, match="mom_eurusd_000"):
        extract.run(s, "eurusd", "d" + uuid.uuid4().hex[:10], source=OnlyRead(DuckDBSource(str(path), s.dataset)))


# ------------------------------------------------------------------------------------------------ issue 17, item 10
def test_item10_row_limit_limits_every_table_by_the_targets_keys(isolated, long_warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    """A feature that starts 500 minutes before the targets: its own first 100 rows share no key with the targets'
    first 100. Limited by the targets' keys, its joined values are there (every third minute is its own gap)."""
    s = replace(isolated, row_limit=100)
    run_id = "l" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id, source=DuckDBSource(str(long_warehouse), s.dataset))
    m = _manifest(s, "eurusd", run_id)
    assert m.row_limit == 100 and m.grid is not None and m.grid.rows == 100
    targets = _read(s, m.targets.checkpoint)
    mom = _read(s, layout.checkpoint("eurusd", run_id, "mom_eurusd_000"))
    assert mom.column(KEY).equals(targets.column(KEY)) and mom.num_rows == 100
    assert mom.column("f000").null_count == 33  # i % 3 == 0 for i = 500..599: non-null everywhere else
    assert mom.column("f000").to_pylist()[:3] == [500 * 0.5, None, 502 * 0.5]


def test_item10_one_snapshot_for_the_run_and_a_table_written_after_it_fails(isolated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from bqx.local.warehouse import Shape

    s = isolated
    path = tmp_path / "w.duckdb"
    w = Warehouse(path, s.dataset)
    w.generate("eurusd", Shape(rows=120, seed=2, table_scale=0.01, column_scale=0.1))
    run_id = "s" + uuid.uuid4().hex[:10]
    source = DuckDBSource(str(path), s.dataset)
    manifest = extract.ensure_manifest(s, extract.plan(s, source, "eurusd", run_id))
    assert manifest.snapshot_at > 0 and _manifest(s, "eurusd", run_id).snapshot_at == manifest.snapshot_at
    source._con.close()
    touched = manifest.features[0].name
    w.touch("eurusd", [touched])  # the table is written after the run's snapshot
    with pytest.raises(TerminalError, match=f"{touched}.*changed after this run's snapshot"):
        extract.run(s, "eurusd", run_id, source=DuckDBSource(str(path), s.dataset))
    assert not storage.exists(s, s.staging_bucket, layout.checkpoint("eurusd", run_id, touched))


# ------------------------------------------------------------------------------------------------ issue 17, item 11
def test_item11_colliding_column_names_fail_when_the_manifest_is_built(isolated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    path = warehouse(tmp_path / "c.duckdb", s.dataset, {
        "targets_eurusd": f"SELECT {_minutes('i')}, i * 1.0 AS target_bqx45_h15 FROM range(10) t(i)",
        "mom_eurusd_000": f"SELECT {_minutes('i')}, i * 1.0 AS x_y FROM range(10) t(i)",  # -> mom_000_x_y
        "mom_eurusd_000_x": f"SELECT {_minutes('i')}, i * 1.0 AS y FROM range(10) t(i)",  # -> mom_000_x_y
    })
    run_id = "c" + uuid.uuid4().hex[:10]
    with pytest.raises(TerminalError) as err:
        extract.run(s, "eurusd", run_id, source=DuckDBSource(str(path), s.dataset))
    message = str(err.value)
    assert "'mom_000_x_y'" in message and "'mom_eurusd_000'" in message and "'mom_eurusd_000_x'" in message
    assert "'x_y'" in message and "'y'" in message
    assert not storage.exists(s, s.staging_bucket, layout.manifest("eurusd", run_id))  # nothing read, nothing written


def test_item11_tables_of_an_unknown_family_are_logged_and_listed(isolated, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    path = warehouse(tmp_path / "u.duckdb", s.dataset, {
        "targets_eurusd": f"SELECT {_minutes('i')}, i * 1.0 AS target_bqx45_h15 FROM range(10) t(i)",
        "mom_eurusd_000": f"SELECT {_minutes('i')}, i * 1.0 AS f000 FROM range(10) t(i)",
        "zzz_eurusd_000": f"SELECT {_minutes('i')}, i * 1.0 AS f000 FROM range(10) t(i)",
        "mom_gbpusd_000": f"SELECT {_minutes('i')}, i * 1.0 AS f000 FROM range(10) t(i)",  # another pair's: silent
    })
    run_id = "u" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id, source=DuckDBSource(str(path), s.dataset))
    m = _manifest(s, "eurusd", run_id)
    assert [t.name for t in m.tables] == ["targets_eurusd", "mom_eurusd_000"]
    assert m.ignored_tables == (IgnoredTable("zzz_eurusd_000", "unknown family 'zzz'"),)
    logged = [(r.getMessage(), r.levelname, r.fields) for r in caplog.records if r.getMessage() == "table ignored"]
    assert [(m, level, f["table"], f["reason"], f["run_id"]) for m, level, f in logged] == [
        ("table ignored", "WARNING", "zzz_eurusd_000", "unknown family 'zzz'", run_id)]
