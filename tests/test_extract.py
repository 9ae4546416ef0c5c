"""The extract job against the DuckDB warehouse and fake-gcs-server: manifest first, one checkpoint per table,
resumable, sharded, keys checked; and the job entrypoint's exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import footer_index, layout
from bqx.catalog import KEY, Manifest
from bqx.errors import DuplicateKeys
from bqx.extract import run as extract
from bqx.extract.sources import DuckDBSource
from bqx.gcp import storage
from bqx.local.warehouse import BLOCK_CELLS, Progress, Shape, Warehouse

from conftest import REPO


def _read(settings, name: str) -> pa.Table:  # type: ignore[no-untyped-def]
    data = storage.bucket(settings, settings.staging_bucket).blob(name).download_as_bytes()
    return pq.read_table(pa.BufferReader(data))


def test_extract_writes_manifest_and_every_checkpoint_then_resumes(isolated, request) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    run_id = "t" + uuid.uuid4().hex[:10]
    report = extract.run(s, "eurusd", run_id)
    found = storage.read_json(s, s.staging_bucket, layout.manifest("eurusd", run_id))
    assert found is not None
    manifest = Manifest.from_json(found[0])
    names = storage.list_names(s, s.staging_bucket, layout.checkpoints_prefix("eurusd", run_id))
    assert set(names) == manifest.expected_objects() and report.written == len(manifest.tables)
    con = duckdb.connect(s.warehouse, read_only=True)
    request.addfinalizer(con.close)  # the session's warehouse: a connection left open blocks later writers
    con.execute("SET TimeZone='UTC'")
    targets = con.execute(f'SELECT count(*) FROM "{s.dataset}"."{manifest.targets.name}"').fetchall()[0][0]
    assert manifest.grid is not None and manifest.grid.rows == targets and manifest.snapshot_at > 0
    for entry in manifest.tables[:6]:
        t = _read(s, entry.checkpoint)
        assert t.schema.field(KEY).type == pa.timestamp("us", tz="UTC")
        keys = t.column(KEY).cast(pa.int64()).to_pylist()
        assert keys == sorted(set(keys))
        # aligned: the table LEFT JOINed onto the targets' keys, exactly the targets' rows
        expected = con.sql(f'SELECT t.* REPLACE (k.interval_time AS interval_time) FROM "{s.dataset}".'
                           f'"{manifest.targets.name}" k LEFT JOIN "{s.dataset}"."{entry.name}" t '
                           'USING (interval_time) ORDER BY k.interval_time').to_arrow_table()
        assert t.num_rows == targets and t.equals(expected.cast(t.schema))
        assert [c.name for c in entry.columns] == t.schema.names
    # Every checkpoint's footer kept in the task's footer index, matching the object as listed, byte for byte.
    kept, _ = footer_index.load(s, "eurusd", run_id)
    assert len(kept) == len(manifest.tables)
    blobs = {b.name: b for b in storage.list_blobs(s, s.staging_bucket, layout.checkpoints_prefix("eurusd", run_id))}
    assert all(kept.find(n, int(b.size), b.crc32c) is not None for n, b in blobs.items())
    for entry in manifest.tables[:3]:
        data = storage.bucket(s, s.staging_bucket).blob(entry.checkpoint).download_as_bytes()
        b = blobs[entry.checkpoint]
        assert data.endswith(kept.find(entry.checkpoint, int(b.size), b.crc32c).tail)
    indexes = storage.list_names(s, s.staging_bucket, layout.extract_footers_prefix("eurusd", run_id))
    again = extract.run(s, "eurusd", run_id)
    assert again.written == 0 and len(again.tables) == len(manifest.tables)
    # a rerun that wrote nothing saves no index of its own
    assert storage.list_names(s, s.staging_bucket, layout.extract_footers_prefix("eurusd", run_id)) == indexes


def test_tasks_shard_the_tables_without_overlap(isolated) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    run_id = "t" + uuid.uuid4().hex[:10]
    a = extract.run(s, "eurusd", run_id, task_index=0, task_count=2)
    b = extract.run(s, "eurusd", run_id, task_index=1, task_count=2)
    ta, tb = {t.table for t in a.tables}, {t.table for t in b.tables}
    assert ta and tb and not ta & tb
    manifest = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest("eurusd", run_id))[0])
    assert ta | tb == {t.name for t in manifest.tables}


def duplicate_keys_warehouse(dataset: str, path: Path) -> Path:
    """A DuckDB warehouse whose mom_eurusd_000 has every key twice."""
    con = duckdb.connect(str(path))
    con.execute(f'CREATE SCHEMA "{dataset}"')
    con.execute(f'CREATE TABLE "{dataset}".targets_eurusd AS SELECT TIMESTAMPTZ \'2024-01-01 00:00:00+00\' + '
                f'INTERVAL (i) MINUTE AS interval_time, i * 1.0 AS target_bqx45_h15 FROM range(100) t(i)')
    con.execute(f'CREATE TABLE "{dataset}".mom_eurusd_000 AS SELECT TIMESTAMPTZ \'2024-01-01 00:00:00+00\' + '
                f'INTERVAL (i // 2) MINUTE AS interval_time, i * 1.0 AS f000 FROM range(100) t(i)')
    con.close()
    return path


def test_duplicate_keys_fail_the_table_by_name_and_leave_no_checkpoint(isolated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    path = duplicate_keys_warehouse(s.dataset, tmp_path / "dups.duckdb")
    run_id = "t" + uuid.uuid4().hex[:10]
    with pytest.raises(DuplicateKeys, match="mom_eurusd_000"):
        extract.run(s, "eurusd", run_id, source=DuckDBSource(str(path), s.dataset))
    assert not storage.exists(s, s.staging_bucket, layout.checkpoint("eurusd", run_id, "mom_eurusd_000"))


def _job(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "jobs" / script / "main.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_job_exit_codes(isolated) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "BQX_LOG_FORMAT": "json"}
    bad_pair = _job("extract", "notapair", env=env)
    assert bad_pair.returncode == 2  # terminal: logged, and the execution shows as failed
    line = json.loads(bad_pair.stdout.strip().splitlines()[-1])
    assert line["severity"] == "ERROR" and "unknown pair" in line["message"]
    missing = _job("extract", "eurusd", env={**env, "BQX_WAREHOUSE": "/nonexistent/warehouse.duckdb",
                                             "BQX_RUN_ID": "t" + uuid.uuid4().hex[:10]})
    assert missing.returncode == 1  # may pass later: Cloud Run retries the task
    ok_run = "t" + uuid.uuid4().hex[:10]
    ok = _job("extract", "eurusd", env={**env, "BQX_RUN_ID": ok_run})
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert storage.exists(isolated, isolated.staging_bucket, layout.manifest("eurusd", ok_run))


def test_a_checkpoint_is_created_once(isolated) -> None:  # type: ignore[no-untyped-def]
    """A duplicated task writing a table that is already there keeps the existing (maybe validated) object."""
    s = isolated
    run_id = "t" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id)
    manifest = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest("eurusd", run_id))[0])
    entry = manifest.tables[1]
    before = storage.bucket(s, s.staging_bucket).get_blob(entry.checkpoint)
    source = DuckDBSource(s.warehouse, s.dataset)
    result = extract.write_checkpoint(s, source, manifest, entry)
    after = storage.bucket(s, s.staging_bucket).get_blob(entry.checkpoint)
    assert result.skipped and after.generation == before.generation and after.md5_hash == before.md5_hash


# The synthetic warehouse's tables at this shape, digested before the generator streamed (one transaction, whole
# tables in memory): a streamed generation, in blocks of any size, must give exactly the same rows.
GENERATED = Shape(rows=300, seed=3, table_scale=0.02, column_scale=0.2)
GENERATED_DIGEST = "dee8cd6d0e67384b"


def _warehouse_digest(path: Path, dataset: str) -> tuple[int, str]:
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone='UTC'")
    out = {}
    names = con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY 1",
                        [dataset]).fetchall()
    for (t,) in names:
        tab = con.sql(f'SELECT * FROM "{dataset}"."{t}" ORDER BY interval_time').to_arrow_table()
        text = repr((tab.schema.names, [str(x) for x in tab.schema.types], tab.to_pydict()))
        out[t] = hashlib.sha256(text.encode()).hexdigest()[:16]
    con.close()
    return len(out), hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("block_cells", [BLOCK_CELLS, 1])  # 1: blocks of 64 rows, every table in several
def test_generator_streams_the_same_tables_for_the_same_seed(tmp_path: Path, block_cells: int) -> None:
    seen: list[Progress] = []
    path = tmp_path / "w.duckdb"
    n = Warehouse(path, "ds").generate("eurusd", GENERATED, progress=lambda p: seen.append(replace(p)),
                                       block_cells=block_cells)
    assert _warehouse_digest(path, "ds") == (n, GENERATED_DIGEST)
    assert [p.tables for p in seen] == list(range(1, n + 1)) and all(p.total == n for p in seen)
    assert seen[-1].rows > n * GENERATED.rows * 0.9  # rows counted as they stream
    assert Warehouse(path, "ds").pairs() == {"eurusd": GENERATED.describe()}


def test_an_interrupted_generation_leaves_the_pair_not_generated(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    w = Warehouse(path, "ds")
    w.generate("eurusd", GENERATED)

    def stop(p: Progress) -> None:
        if p.tables == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        w.generate("eurusd", replace(GENERATED, rows=200), progress=stop)
    assert w.pairs() == {}  # `bqx run` generates it again rather than extracting a half-written pair
