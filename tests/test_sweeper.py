"""Runs whose job died without a word (issue 17.5): the sweeper compares each active run's recorded executions with
the Cloud Run Admin API and records the failure, or re-drives a handoff whose event was lost. The local Run API runs
each job as a process; the tests kill it with SIGKILL, as an out-of-memory kill or a lost instance does, and `bqx
status` shows the run failed with the cause and the retry command."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from click.testing import CliRunner
from test_faults import COLS, PAIR, TABLES, _parquet, _table, _upload

from bqx import layout, runs, sweeper, trigger
from bqx.catalog import Manifest, TableEntry
from bqx.cli import main
from bqx.completion import handler as completion
from bqx.config import Settings
from bqx.extract.run import ExtractReport, save_report
from bqx.gcp import clients, storage
from bqx.local.runapi import RunApi

from conftest import pubsub_event, storage_event
from fakes import validate_all

EXTRACT, MERGE = "bqx-ml-extract", "bqx-ml-merge"
SLEEPER = ["sh", "-c", "exec sleep 600", "job"]  # a task that runs until killed (the job's args follow, ignored)


@pytest.fixture
def api(run_api: RunApi) -> RunApi:
    """The test's Run API, its jobs long-running processes that are not retried (max_retries 0)."""
    run_api.jobs.update({EXTRACT: SLEEPER, MERGE: SLEEPER})
    run_api.max_retries = 0
    clients.executions_client.cache_clear()
    yield run_api
    clients.executions_client.cache_clear()
    with run_api.lock:
        pids = [pid for ex in run_api.executions.values() for pid in ex.pids.values()]
    for pid in pids:  # the processes this test started and did not kill
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def s(isolated_output: Settings, api: RunApi) -> Settings:
    """The test's own buckets and its Run API."""
    return Settings.from_env()


def _only(api: RunApi, job: str):  # type: ignore[no-untyped-def]
    with api.lock:
        found = [e for e in api.executions.values() if e.job == job]
    assert len(found) == 1, found
    return found[0]


def _sigkill(api: RunApi, job: str) -> str:
    """SIGKILL every task process of the job's execution (killed tasks are not retried: max_retries 0); returns the
    execution's name once Cloud Run counts it ended."""
    ex = _only(api, job)
    deadline = time.time() + 30
    while len(ex.pids) < ex.task_count:
        assert time.time() < deadline
        time.sleep(0.05)
    with api.lock:
        pids = list(ex.pids.values())
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    while ex.completed is None:
        assert time.time() < deadline
        time.sleep(0.05)
    return ex.name


def _status(pair: str) -> str:
    result = CliRunner().invoke(main, ["status", pair, "--cloud"])
    assert result.exit_code == 0, result.output
    return result.output


def test_item5_an_extract_killed_from_outside_is_recorded_failed(s, api) -> None:  # type: ignore[no-untyped-def]
    trigger.handle(s, pubsub_event(json.dumps({"pair": PAIR}), message_id=uuid.uuid4().hex))
    run_id = runs.latest_run(s, PAIR)
    assert run_id and runs.state(s, PAIR).state == "extracting"
    name = _sigkill(api, EXTRACT)
    assert runs.state(s, PAIR).state == "extracting"  # nothing recorded it: without the sweeper it stays so
    out = _status(PAIR)  # `bqx status` sweeps first
    assert "failed" in out and "extract:" in out and "terminated by signal 9" in out, out
    assert f"retry: bqx run {PAIR}" in out, out
    err = storage.read_json(s, s.staging_bucket, layout.run_error(PAIR, run_id))
    assert err and err[0]["stage"] == "extract" and err[0]["execution"] == name
    assert err[0]["recorded_by"] == "sweeper" and "exit code 137" in err[0]["error"]
    assert runs.active_run_id(s, PAIR) is None  # a new request is no longer refused as "already running"
    assert sweeper.sweep(s, [PAIR]) == []  # swept once: nothing more to say


def _extracted(s, run_id: str) -> Manifest:  # type: ignore[no-untyped-def]
    m = Manifest(PAIR, run_id, tuple(
        TableEntry(t, "targets" if t.startswith("targets") else "feature", COLS, layout.checkpoint(PAIR, run_id, t))
        for t in TABLES))
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    for e in m.tables:
        _upload(s, e.checkpoint, _parquet(_table(e, rows=30)))
    validate_all(s, m)
    return m


def test_item5_a_merge_killed_from_outside_is_recorded_failed(s, api) -> None:  # type: ignore[no-untyped-def]
    api.jobs[EXTRACT] = ["true"]
    trigger.handle(s, pubsub_event(json.dumps({"pair": PAIR}), message_id=uuid.uuid4().hex))
    run_id = runs.latest_run(s, PAIR)
    assert run_id
    _extracted(s, run_id)
    save_report(s, ExtractReport(PAIR, run_id, 0, 1))
    report = storage.bucket(s, s.staging_bucket).get_blob(layout.extract_report(PAIR, run_id, 0, 0))
    assert completion.handle(s, storage_event(s.staging_bucket, report.name, report.generation)).launched
    assert runs.state(s, PAIR).state == "merging"
    name = _sigkill(api, MERGE)
    assert [f.action for f in sweeper.sweep(s, [PAIR])] == ["recorded"]
    rs = runs.state(s, PAIR)
    assert rs.state == "failed" and rs.error and rs.error["stage"] == "merge" and rs.error["execution"] == name
    assert rs.error["retry"] == f"bqx merge {PAIR} --run-id {run_id}"
    assert "terminated by signal 9" in rs.error["error"]


def test_item5_a_lost_handoff_is_redriven(s, api) -> None:  # type: ignore[no-untyped-def]
    """The extract finished (its report written) but the report's event never reached the completion function: the
    sweeper does what that event asks, and the merge starts, once."""
    api.jobs[EXTRACT] = ["true"]
    trigger.handle(s, pubsub_event(json.dumps({"pair": PAIR}), message_id=uuid.uuid4().hex))
    run_id = runs.latest_run(s, PAIR)
    assert run_id
    _extracted(s, run_id)
    save_report(s, ExtractReport(PAIR, run_id, 0, 1))  # ... and its event is lost
    deadline = time.time() + 30
    while _only(api, EXTRACT).completed is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert runs.state(s, PAIR).state == "handoff"
    found = sweeper.sweep(s, [PAIR])
    assert [(f.stage, f.action) for f in found] == [("handoff", "redriven")], found
    assert _only(api, MERGE).env["BQX_RUN_ID"] == run_id
    assert runs.state(s, PAIR).state == "merging"
    assert [f.action for f in sweeper.sweep(s, [PAIR])] == ["running"]
    # the lost event, delivered late after all, starts nothing more
    report = storage.bucket(s, s.staging_bucket).get_blob(layout.extract_report(PAIR, run_id, 0, 0))
    outcome = completion.handle(s, storage_event(s.staging_bucket, report.name, report.generation))
    assert outcome is not None and not outcome.launched
    assert len(api.executions) == 2


def test_item5_the_scheduled_sweep_reaches_the_completion_function(s, api) -> None:  # type: ignore[no-untyped-def]
    """What Cloud Scheduler posts (deploy/sweeper.tf): a `bqx.sweep` CloudEvent to the completion function."""
    from cloudevents.http import CloudEvent

    trigger.handle(s, pubsub_event(json.dumps({"pair": PAIR}), message_id=uuid.uuid4().hex))
    run_id = runs.latest_run(s, PAIR)
    _sigkill(api, EXTRACT)
    event = CloudEvent({"type": completion.SWEEP_EVENT, "source": "//cloudscheduler.googleapis.com/bqx-sweep",
                        "id": uuid.uuid4().hex, "specversion": "1.0"}, {"sweep": True})
    assert completion.handle(s, event) is None
    assert runs.state(s, PAIR, run_id).state == "failed"
