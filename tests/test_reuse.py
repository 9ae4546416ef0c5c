"""An unchanged pair is not paid for twice (issue 16), through the session stack with real events: after a run,
`bqx run` on an unchanged warehouse says the pair is up to date and starts nothing; after `bqx warehouse touch` of
three tables, the next run extracts those three, copies the other checkpoints from the published run, and publishes
the same training file a full extract did.

A pair no other test runs (chfjpy), generated here: the order of test modules on the session stack does not matter.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_end_to_end import bqx, reference_join

from bqx import layout
from bqx.catalog import Manifest
from bqx.completion import validate
from bqx.errors import TerminalError
from bqx.extract.sources import DuckDBSource
from bqx.gcp import storage
from bqx.gcp.clients import storage_client
from bqx.local.warehouse import VERSIONS_TABLE, Warehouse

from conftest import SMALL, LocalStack

PAIR = "chfjpy"


def training_table(s) -> pa.Table:  # type: ignore[no-untyped-def]
    data = storage.bucket(s, s.output_bucket).blob(layout.output(PAIR)).download_as_bytes()
    return pq.read_table(io.BytesIO(data))


def manifest_of(s, run_id: str) -> Manifest:  # type: ignore[no-untyped-def]
    return Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(PAIR, run_id))[0])


def started(s, job: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """Executions of `job` the local Run API started for PAIR (its journal: $BQX_HOME/run-api/executions.jsonl)."""
    journal = s.home / "run-api" / "executions.jsonl"
    lines = journal.read_text().splitlines() if journal.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == "started" and e["job"] == job and PAIR in e["args"]]


def extract_reports(s, run_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    names = storage.list_names(s, s.staging_bucket, layout.extract_reports_prefix(PAIR, run_id))
    return [storage.read_json(s, s.staging_bucket, n)[0] for n in sorted(names)]


@pytest.fixture(scope="module")
def first_run(local_stack: LocalStack) -> dict:
    """A full run of a freshly generated pair: its summary and its training file's content."""
    s = local_stack.settings
    deadline = time.monotonic() + 60
    while True:  # a job of an earlier module may still hold the file open for reading
        try:
            Warehouse(Path(s.warehouse), s.dataset).generate(PAIR, SMALL)
            break
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    done = bqx(local_stack, "run", PAIR, "--json", "--timeout", "240")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["reused"] == {"tables": 0, "extracted": summary["checkpoints"], "from": []}
    return {"summary": summary, "table": training_table(s)}


def test_duckdb_fingerprints_change_with_touch_and_regeneration_only(tmp_path: Path) -> None:
    path, dataset = tmp_path / "w.duckdb", "ds"
    w = Warehouse(path, dataset)
    w.generate(PAIR, SMALL)

    def fingerprints() -> dict[str, str]:
        source = DuckDBSource(str(path), dataset)
        try:
            return {t.name: t.fingerprint for t in source.discover(PAIR)}
        finally:
            source._con.close()  # the warehouse is written next, by this process

    first = fingerprints()
    assert all(first.values()) and len(set(first.values())) > 1  # schema digests differ between tables
    con = duckdb.connect(str(path), read_only=True)
    for name, fp in first.items():
        assert int(fp.split("/")[1]) == con.execute(f'SELECT count(*) FROM "{dataset}"."{name}"').fetchone()[0]
    con.close()
    assert first == fingerprints()  # nothing changed: the same fingerprints

    touched = sorted(first)[1:3]
    w.touch(PAIR, touched)
    second = fingerprints()
    assert sorted(n for n in first if first[n] != second[n]) == touched
    assert all(first[n].split("/")[1:] == second[n].split("/")[1:] for n in touched)  # same rows and schema

    with pytest.raises(TerminalError, match="targets_eurusd"):
        w.touch(PAIR, [touched[0], "targets_eurusd"])  # another pair's table: nothing touched
    assert fingerprints() == second

    w.generate(PAIR, SMALL)  # a rewrite of every table, even with the same rows
    third = fingerprints()
    assert all(third[n] != second[n] for n in first)

    con = duckdb.connect(str(path))
    con.execute(f"DROP TABLE {VERSIONS_TABLE}")  # a file written before versions were kept
    con.close()
    assert not any(fingerprints().values())


def test_an_unchanged_pair_is_up_to_date_and_starts_nothing(local_stack: LocalStack, first_run: dict) -> None:
    s = local_stack.settings
    published = storage.read_json(s, s.output_bucket, layout.summary(PAIR))[0]
    request = storage.bucket(s, s.staging_bucket).get_blob(layout.request(PAIR))
    extracts, merges = len(started(s, s.extract_job)), len(started(s, s.merge_job))

    done = bqx(local_stack, "run", PAIR, "--json", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{PAIR} is up to date" in done.stderr and published["run_id"] in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == published  # the existing summary, as a run prints it
    assert len(started(s, s.extract_job)) == extracts and len(started(s, s.merge_job)) == merges
    assert storage.bucket(s, s.staging_bucket).get_blob(layout.request(PAIR)).generation == request.generation

    text = bqx(local_stack, "run", PAIR, timeout=120)  # the text form says the same
    assert text.returncode == 0 and "is up to date" in text.stderr and published["run_id"] in text.stdout


def test_touched_tables_alone_are_extracted_and_the_file_is_the_same(local_stack: LocalStack, first_run: dict,
                                                                     tmp_path: Path) -> None:
    s = local_stack.settings
    before = storage.read_json(s, s.output_bucket, layout.summary(PAIR))[0]
    old = manifest_of(s, before["run_id"])
    features = [t.name for t in old.features]
    touched = sorted({features[0], features[len(features) // 2], features[-1]})

    touch = bqx(local_stack, "warehouse", "touch", PAIR, *touched, timeout=60)
    assert touch.returncode == 0, touch.stderr
    refused = bqx(local_stack, "warehouse", "touch", PAIR, "targets_eurusd", timeout=60)
    assert refused.returncode != 0 and "targets_eurusd" in refused.stderr  # another pair's table: nothing touched

    extracts = len(started(s, s.extract_job))
    done = bqx(local_stack, "run", PAIR, "--json", "--timeout", "240")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    run_id = summary["run_id"]
    assert run_id != before["run_id"] and len(started(s, s.extract_job)) == extracts + 1

    # The plan (manifest) and what the extract did (its reports): the three touched tables read, the others copied.
    new = manifest_of(s, run_id)
    assert sorted(t.name for t in new.tables if not t.reused_from) == touched
    assert {t.reused_from for t in new.tables if t.reused_from} == {before["run_id"]}
    results = [t for r in extract_reports(s, run_id) for t in r["tables"] if not t["skipped"]]
    assert sorted(t["table"] for t in results if not t["reused"]) == touched
    assert sum(t["reused"] for t in results) == len(new.tables) - 3
    assert summary["reused"] == {"tables": len(new.tables) - 3, "extracted": 3, "from": [before["run_id"]]}
    # The merge job took every footer from the extract's index: copies carry the first run's kept footers.
    assert summary["method"] == "compose" and summary["stats"]["footers_indexed"] == len(new.tables)

    # Every checkpoint of the run, copies included, was validated by the completion function before the merge.
    blobs = list(storage_client(s).list_blobs(s.staging_bucket, prefix=layout.checkpoints_prefix(PAIR, run_id)))
    assert len(blobs) == len(new.tables) and all(validate.is_marked(b) for b in blobs)

    # The same training file as the full extract, and as the LEFT JOIN computed in DuckDB.
    got = training_table(s)
    assert got.equals(first_run["table"])
    expected, _ = reference_join(s.warehouse, s.dataset, PAIR)
    assert got.equals(expected.cast(got.schema))

    # BigQuery bytes for the extracted tables only: each whole table read (its own rows, which an aligned checkpoint
    # does not keep: it holds the targets' rows), 8 bytes a cell.
    cols = {t.name: len(t.columns) for t in new.tables}
    con = duckdb.connect(str(s.warehouse), read_only=True)
    try:
        rows = {t: con.execute(f'SELECT count(*) FROM "{s.dataset}"."{t}"').fetchone()[0] for t in touched}
    finally:
        con.close()
    assert summary["cost"]["bigquery_bytes"] == sum(rows[t] * cols[t] * 8 for t in touched)
    assert 0 < summary["cost"]["bigquery_bytes"] < first_run["summary"]["cost"]["bigquery_bytes"]

    rep = bqx(local_stack, "report", PAIR, "--out", str(tmp_path))
    assert rep.returncode == 0, rep.stderr
    page = Path(rep.stdout.split()[0]).read_text()
    assert f"{len(new.tables) - 3} of {len(new.tables)} checkpoints reused" in page
    assert page.count('class="bar reused"') == len(new.tables) - 3
    assert all(f'class="bar table" data-table="{t}"' in page for t in touched)

    again = bqx(local_stack, "run", PAIR, timeout=120)  # and now the pair is up to date with the new run
    assert again.returncode == 0 and "is up to date" in again.stderr and run_id in again.stderr
