"""The whole pipeline through the emulators with real events: `bqx run` drops a request object, the trigger
function starts the extract job, checkpoint finalize events wake the completion function, which starts the
merge job; the training file is checked against a LEFT JOIN computed directly in DuckDB."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.catalog import KEY, TARGET_COLUMNS, belongs_to, targets_table
from bqx.extract.sources import quote_duckdb as q
from bqx.gcp import storage

from conftest import LocalStack


def bqx(local_stack: LocalStack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **local_stack.env}
    return subprocess.run([sys.executable, "-m", "bqx.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def reference_join(warehouse: str, dataset: str, pair: str) -> object:
    con = duckdb.connect(warehouse, read_only=True)
    con.execute("SET TimeZone='UTC'")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ? AND table_name LIKE ? "
        "ORDER BY table_name", [dataset, f"%{pair}%"]).fetchall() if belongs_to(pair, r[0])]
    features = [t for t in tables if t != targets_table(pair)]
    select, joins = ["t.*"], []
    for i, t in enumerate(features):
        cols = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
            "ORDER BY ordinal_position", [dataset, t]).fetchall() if r[0] != KEY]
        prefix = layout.prefix_of(pair, t)
        select += [f"j{i}.{q(c)} AS {q(prefix + '_' + c)}" for c in cols]
        joins.append(f"LEFT JOIN {q(dataset)}.{q(t)} j{i} USING ({KEY})")
    sql = (f"SELECT {', '.join(select)} FROM {q(dataset)}.{q(targets_table(pair))} t {' '.join(joins)} "
           f"ORDER BY {KEY}")
    return con.sql(sql).to_arrow_table(), len(features) + 1


@pytest.fixture(scope="module")
def completed_run(local_stack: LocalStack) -> dict:
    done = bqx(local_stack, "run", "eurusd", "--json", "--timeout", "240")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_run_eurusd_end_to_end(local_stack: LocalStack, completed_run: dict, tmp_path: Path) -> None:
    s = local_stack.settings
    summary = completed_run
    for key in ("pair", "run_id", "checkpoints", "rows", "columns", "output", "crc32c", "md5", "seconds"):
        assert key in summary
    expected, n_tables = reference_join(s.warehouse, s.dataset, "eurusd")
    assert summary["checkpoints"] == n_tables
    assert summary["rows"] == expected.num_rows == 300
    assert summary["columns"] == expected.num_columns
    assert expected.schema.names[1 : 1 + len(TARGET_COLUMNS)] == list(TARGET_COLUMNS)

    out = tmp_path / "training.parquet"
    storage.bucket(local_stack.settings, s.output_bucket).blob(layout.output("eurusd")).download_to_filename(out)
    data = out.read_bytes()
    assert summary["bytes"] == len(data)
    assert summary["md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()  # GCS's checksum of our bytes
    got = pq.read_table(out)
    assert got.schema.field(KEY).type.unit == "us" and got.schema.field(KEY).type.tz == "UTC"
    assert got.schema.names == expected.schema.names
    assert got.equals(expected.cast(got.schema))
    assert pq.read_table(out).column(KEY).to_pylist() == sorted(set(got.column(KEY).to_pylist()))

    # the merge was started by the completion function, exactly once, not by the CLI
    completion_log = (s.home / "stack" / "completion.log").read_text()
    assert "merge job started" in completion_log and summary["run_id"] in completion_log
    journal = [json.loads(line) for line in (s.home / "run-api" / "executions.jsonl").read_text().splitlines()]
    merges = [e for e in journal if e["event"] == "started" and e["job"] == s.merge_job
              and e["env"].get("BQX_RUN_ID") == summary["run_id"]]
    assert len(merges) == 1


def test_status_and_report_of_the_run(local_stack: LocalStack, completed_run: dict, tmp_path: Path) -> None:
    status = bqx(local_stack, "status", "eurusd", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)[0]
    assert st["state"] == "done" and st["run_id"] == completed_run["run_id"]
    assert st["present"] == st["expected"] == completed_run["checkpoints"]
    assert sum(p for p, _ in st["families"].values()) == st["expected"]
    assert st["summary"]["crc32c"] == completed_run["crc32c"]
    assert completed_run["cost"]["total_usd"] > 0 and completed_run["cost"]["bigquery_bytes"] > 0

    rep = bqx(local_stack, "report", "eurusd", "--out", str(tmp_path))
    assert rep.returncode == 0, rep.stderr
    html_path, png_path = (Path(p) for p in rep.stdout.split())
    page = html_path.read_text()
    manifest_tables = [t["name"] for t in json.loads(
        storage.bucket(local_stack.settings, local_stack.settings.staging_bucket)
        .blob(layout.manifest("eurusd", completed_run["run_id"])).download_as_bytes())["tables"]]
    for table in manifest_tables:  # a timeline bar for every table
        assert f'data-table="{table}"' in page
    assert 'class="bar merge"' in page and 'class="bar handoff"' in page
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000


def test_unknown_pair_is_refused_and_starts_nothing(local_stack: LocalStack) -> None:
    s = local_stack.settings
    before = (s.home / "run-api" / "executions.jsonl")
    n_before = len(before.read_text().splitlines()) if before.exists() else 0
    done = bqx(local_stack, "run", "notapair", timeout=60)
    assert done.returncode != 0
    assert "unknown pair 'notapair'" in done.stderr and "eurusd" in done.stderr and "usdjpy" in done.stderr
    assert not storage.exists(s, s.staging_bucket, "requests/notapair.json")
    n_after = len(before.read_text().splitlines()) if before.exists() else 0
    assert n_after == n_before


def test_the_merge_reported_its_progress(local_stack: LocalStack, completed_run: dict) -> None:
    s = local_stack.settings
    found = storage.read_json(s, s.staging_bucket, layout.merge_progress("eurusd", completed_run["run_id"]))
    assert found is not None
    progress = found[0]
    assert progress["phase"] == "publishing"
    assert progress["tables_written"] == progress["tables"] == completed_run["checkpoints"] - 1


def test_the_merge_logs_no_connection_pool_warnings(local_stack: LocalStack, completed_run: dict) -> None:
    logs = sorted((local_stack.settings.home / "run-api" / "logs").glob("bqx-ml-merge-*.log"))
    assert logs, "no merge job log"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "training file published" in text
    assert "Connection pool is full" not in text  # the client's pool is sized to the merge's threads


def test_report_goes_to_the_state_directory_and_status_lists_the_same_pairs(local_stack: LocalStack,
                                                                             completed_run: dict,
                                                                             tmp_path: Path) -> None:
    rep = subprocess.run([sys.executable, "-m", "bqx.cli", "report", "eurusd"], env={**os.environ, **local_stack.env},
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert rep.returncode == 0, rep.stderr
    written = [Path(p) for p in rep.stdout.split()]
    assert written and all(p.parent == local_stack.settings.home / "reports" and p.exists() for p in written)
    assert list(tmp_path.iterdir()) == []  # nothing left in the current directory
    text = bqx(local_stack, "status")
    as_json = bqx(local_stack, "status", "--json")
    listed = {line.split()[0] for line in text.stdout.splitlines() if line.strip()}
    assert listed == {r["pair"] for r in json.loads(as_json.stdout)} and "eurusd" in listed


def test_dry_run_is_calibrated_by_the_measured_run(local_stack: LocalStack, completed_run: dict) -> None:
    est = bqx(local_stack, "run", "eurusd", "--dry-run", "--json")
    assert est.returncode == 0, est.stderr
    got = json.loads(est.stdout.strip().splitlines()[-1])
    measured = completed_run["cost"]
    assert got["calibrated_from"] and completed_run["run_id"] in got["calibrated_from"]
    assert got["bytes_scanned"] == measured["bigquery_bytes"]  # the same warehouse: the same scan
    assert abs(got["extract_seconds"] - measured["extract_seconds"]) <= 0.01 * measured["extract_seconds"] + 0.01
    assert abs(got["merge_seconds"] - measured["merge_seconds"]) <= 0.01 * measured["merge_seconds"] + 0.01
