"""A run never replaces a good training file with a worse one unless asked (issue 17.3): an empty targets table is a
terminal error; losing more than BQX_MAX_ROW_DROP of the rows, or any columns, is refused with by how much, unless
the request (or `bqx merge --accept-drift`) accepts it. Real checkpoints, merged and published through fake-gcs."""

from __future__ import annotations

import json
import uuid

import pytest
from test_faults import COLS, PAIR, TABLES, _parquet, _table, _upload

from bqx import layout, runs, trigger
from bqx.catalog import Manifest, TableEntry
from bqx.errors import TerminalError
from bqx.gcp import storage
from bqx.merge import publish

from fakes import validate_all


def _run(s, rows: int, tables: tuple[str, ...] = TABLES, accept_drift: bool = False) -> Manifest:  # type: ignore[no-untyped-def]
    run_id = "d" + uuid.uuid4().hex[:12]
    m = Manifest(PAIR, run_id, tuple(
        TableEntry(t, "targets" if t.startswith("targets") else "feature", COLS, layout.checkpoint(PAIR, run_id, t))
        for t in tables))
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    storage.write_json(s, s.staging_bucket, layout.claim(PAIR, run_id, "extract"),
                       {"pair": PAIR, "run_id": run_id, **({"accept_drift": True} if accept_drift else {})})
    for e in m.tables:
        _upload(s, e.checkpoint, _parquet(_table(e, rows=rows)))
    validate_all(s, m)  # as the completion function does; only validated checkpoints are published
    return m


def _published(s) -> dict:  # type: ignore[no-untyped-def]
    return storage.read_json(s, s.output_bucket, layout.summary(PAIR))[0]  # type: ignore[index]


def test_empty_targets_fail_the_run_and_keep_the_published_file(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    good = _run(s, 300)
    publish.merge_run(s, good, "stream")
    empty = _run(s, 0)
    with pytest.raises(TerminalError, match="0 rows"):
        publish.merge_run(s, empty, "stream")
    assert _published(s)["run_id"] == good.run_id and _published(s)["rows"] == 300


def test_a_run_that_lost_rows_is_refused_unless_accepted(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    good = _run(s, 300)
    publish.merge_run(s, good, "stream")
    publish.merge_run(s, _run(s, 280), "stream")  # 6.7% fewer: within BQX_MAX_ROW_DROP (10%)
    short = _run(s, 150)
    with pytest.raises(TerminalError) as refused:
        publish.merge_run(s, short, "stream")
    message = str(refused.value)
    assert "46.4%" in message and "280 -> 150" in message and "--accept-drift" in message
    assert _published(s)["rows"] == 280
    publish.merge_run(s, short, "stream", accept_drift=True)  # `bqx merge ... --accept-drift`
    assert _published(s)["run_id"] == short.run_id and _published(s)["rows"] == 150
    requested = _run(s, 20, accept_drift=True)  # a request with "accept_drift": true, kept in the run's claim
    publish.merge_run(s, requested, "stream")
    assert _published(s)["rows"] == 20


def test_a_run_that_lost_columns_is_refused(isolated_output) -> None:  # type: ignore[no-untyped-def]
    s = isolated_output
    publish.merge_run(s, _run(s, 300), "stream")
    fewer = _run(s, 300, TABLES[:-1])
    with pytest.raises(TerminalError, match="columns fewer"):
        publish.merge_run(s, fewer, "stream")


def test_the_request_carries_accept_drift_to_the_run(isolated_output, run_api) -> None:  # type: ignore[no-untyped-def]
    from conftest import pubsub_event

    s = isolated_output
    trigger.handle(s, pubsub_event(json.dumps({"pair": PAIR, "accept_drift": True}), message_id=uuid.uuid4().hex))
    run_id = runs.latest_run(s, PAIR)
    claim = storage.read_json(s, s.staging_bucket, layout.claim(PAIR, run_id, "extract"))  # type: ignore[arg-type]
    assert claim and claim[0]["accept_drift"] is True
    with pytest.raises(TerminalError, match="accept_drift"):
        trigger.parse_request_body(b'{"pair": "eurusd", "accept_drift": "yes"}')


def test_a_checkpoint_replaced_after_validation_is_not_merged(isolated_output) -> None:  # type: ignore[no-untyped-def]
    """Issue 17.2: the merge merges exactly the generations that were validated. A checkpoint overwritten after its
    validation (here with an int64 column the manifest does not allow) fails the merge transiently; nothing is
    published until a validated generation is there."""
    import pyarrow as pa

    from bqx.errors import TransientError

    s = isolated_output
    m = _run(s, 300)
    victim = m.tables[1]
    table = _table(victim, rows=300)
    bad = table.set_column(1, "f000", pa.array(range(300), pa.int64()))
    _upload(s, victim.checkpoint, _parquet(bad))  # a new generation, never validated
    with pytest.raises(TransientError, match="not the generation that was validated"):
        publish.merge_run(s, m, "stream")
    assert storage.read_json(s, s.output_bucket, layout.summary(PAIR)) is None
