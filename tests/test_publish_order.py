"""Two runs of one pair publish in the order they were started, and the training file and its summary are one unit
(issue 17.1). Real runs registered as the trigger registers them, real checkpoints, merged and published through
fake-gcs-server."""

from __future__ import annotations

import uuid

import pyarrow.parquet as pq
import pytest
from test_faults import COLS, PAIR, TABLES, _parquet, _table, _upload

from bqx import layout, runs
from bqx.catalog import Manifest, TableEntry
from bqx.errors import TerminalError, TransientError
from bqx.gcp import storage
from bqx.merge import publish

from fakes import validate_all


def _registered_run(s, rows: int, force: bool = False) -> Manifest:  # type: ignore[no-untyped-def]
    """A run made the pair's latest as the trigger does (runs.register), then extracted: manifest, checkpoints."""
    run_id = "o" + uuid.uuid4().hex[:12]
    runs.register(s, PAIR, run_id, lambda: f"projects/p/locations/l/jobs/x/executions/{run_id}",
                  {"origin": "test"}, force=force)
    m = Manifest(PAIR, run_id, tuple(
        TableEntry(t, "targets" if t.startswith("targets") else "feature", COLS, layout.checkpoint(PAIR, run_id, t))
        for t in TABLES))
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    for e in m.tables:
        _upload(s, e.checkpoint, _parquet(_table(e, rows=rows)))
    validate_all(s, m)
    return m


def _file_run_id(s) -> str:  # type: ignore[no-untyped-def]
    blob = storage.bucket(s, s.output_bucket).blob(layout.output(PAIR))
    with blob.open("rb") as f:
        return pq.ParquetFile(f).metadata.metadata[b"bqx.run_id"].decode()


def test_item1_an_older_run_that_finishes_later_does_not_replace_the_newer(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    older = _registered_run(s, 300)
    newer = _registered_run(s, 310, force=True)  # `bqx run --force` while the older one still runs
    publish.merge_run(s, newer, "stream")
    with pytest.raises(TerminalError, match=f"run {newer.run_id} was started after it"):
        publish.merge_run(s, older, "stream")  # finishes later
    summary, blob = runs.published_output(s, PAIR)  # type: ignore[misc]
    assert summary["run_id"] == newer.run_id and _file_run_id(s) == newer.run_id
    assert int(blob.generation) == summary["output_generation"]
    # the trigger sees the newer run done, not "still running"
    assert runs.active_run_id(s, PAIR) is None
    assert runs.state(s, PAIR).state == "done"


def test_item1_a_newer_run_publishes_over_an_older_one(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    older = _registered_run(s, 300)
    publish.merge_run(s, older, "stream")
    newer = _registered_run(s, 310)
    publish.merge_run(s, newer, "stream")
    summary, blob = runs.published_output(s, PAIR)  # type: ignore[misc]
    assert summary["run_id"] == newer.run_id == _file_run_id(s) and summary["rows"] == 310
    assert int(blob.generation) == summary["output_generation"]


def test_item1_a_reader_never_gets_the_file_of_another_run_than_the_summary(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    publish.merge_run(s, _registered_run(s, 300), "stream")
    summary, blob = runs.published_output(s, PAIR)  # type: ignore[misc]
    # a publish between its two writes: the file replaced, the summary not yet
    storage.bucket(s, s.output_bucket).blob(layout.output(PAIR)).upload_from_string(b"another run's file")
    with pytest.raises(TransientError, match="being replaced"):
        runs.published_output(s, PAIR)
    assert summary["output_generation"] == int(blob.generation)


def test_item1_a_restored_run_is_read_as_one_unit_too(isolated_output) -> None:  # type: ignore[no-untyped-def]
    """`bqx restore` makes a kept run current again: its summary names the file's new generation, so readers find
    the restored file (the kept summary's generation is the one its first publish wrote, since replaced)."""
    from bqx import versions

    s = isolated_output
    first = _registered_run(s, 300)
    publish.merge_run(s, first, "stream")
    publish.merge_run(s, _registered_run(s, 305), "stream")
    versions.restore(s, PAIR, first.run_id)
    summary, blob = runs.published_output(s, PAIR)  # type: ignore[misc]
    assert summary["run_id"] == first.run_id == _file_run_id(s)
    assert int(blob.generation) == summary["output_generation"]
