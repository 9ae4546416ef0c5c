"""The jobs started by hand (`gcloud run jobs execute bqx-ml-extract --args=eurusd`, `bqx-ml-merge --args=eurusd[,RUN]`)
under the same exactly-once rules as the trigger and the completion function, and the exit codes Cloud Run sees.

Cloud Run's environment is set as it would be (CLOUD_RUN_JOB, CLOUD_RUN_EXECUTION, CLOUD_RUN_TASK_ATTEMPT, no
BQX_RUN_ID); the entrypoints run in-process (`main([...])`) and, for exit codes and log lines, as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import ids, layout, runs, serving, trigger
from bqx.catalog import KEY, Column, Manifest, TableEntry
from bqx.completion import handler as completion_handler
from bqx.config import Settings
from bqx.extract import job as extract_job
from bqx.gcp import storage
from bqx.local.runapi import RunApi
from bqx.merge import job as merge_job
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS, schema_of

from conftest import REPO, storage_event

PAIR = "eurusd"
EXTRACT, MERGE = "bqx-ml-extract", "bqx-ml-merge"


# ---------------------------------------------------------------- helpers


def execution_id(job: str) -> str:
    return f"{job}-{uuid.uuid4().hex[:8]}"


def cloud_run_env(job: str, execution: str, attempt: int = 0, **extra: str) -> dict[str, str]:
    """What Cloud Run gives a task of an execution started with `gcloud run jobs execute` (no BQX_RUN_ID)."""
    env = {k: v for k, v in os.environ.items() if k != "BQX_RUN_ID"}
    return {**env, "CLOUD_RUN_JOB": job, "CLOUD_RUN_EXECUTION": execution, "CLOUD_RUN_TASK_INDEX": "0",
            "CLOUD_RUN_TASK_COUNT": "1", "CLOUD_RUN_TASK_ATTEMPT": str(attempt), "BQX_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1", **extra}


def as_cloud_run(monkeypatch: pytest.MonkeyPatch, job: str, execution: str, attempt: int = 0, **extra: str) -> None:
    """The same environment for an in-process call of the job's main()."""
    monkeypatch.delenv("BQX_RUN_ID", raising=False)
    for k, v in cloud_run_env(job, execution, attempt, **extra).items():
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)


def run_process(job: str, args: list[str], env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    """The job's entrypoint as Cloud Run runs it: (exit code, its JSON log lines)."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / job / "main.py"), *args], env=env,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    lines = []
    for line in done.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return done.returncode, lines


def errors(lines: list[dict[str, Any]]) -> str:
    return "\n".join(x["message"] for x in lines if x.get("severity") == "ERROR")


def launched(api: RunApi, job: str, run_id: str | None = None) -> list[str]:
    with api.lock:
        return [e.name for e in api.executions.values()
                if e.job == job and (run_id is None or e.env.get("BQX_RUN_ID") == run_id)]


def read(s: Settings, bucket: str, name: str) -> dict[str, Any] | None:
    found = storage.read_json(s, bucket, name)
    return None if found is None else found[0]


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-table warehouse for eurusd (the extract takes about a second)."""
    path = tmp_path_factory.mktemp("wh") / "tiny.duckdb"
    dataset = Settings().dataset
    con = duckdb.connect(str(path))
    con.execute(f'CREATE SCHEMA "{dataset}"')
    start = "TIMESTAMPTZ '2024-01-01 00:00:00+00' + INTERVAL (i) MINUTE AS interval_time"
    con.execute(f'CREATE TABLE "{dataset}".targets_eurusd AS SELECT {start}, i * 1.0 AS target_bqx45_h15 '
                f"FROM range(60) t(i)")
    for t in ("mom_eurusd_000", "vol_eurusd_000"):
        con.execute(f'CREATE TABLE "{dataset}".{t} AS SELECT {start}, i * 0.5 AS f000 FROM range(0, 60, 2) t(i)')
    con.close()
    return path


@pytest.fixture
def s(isolated_output: Settings, run_api: RunApi, warehouse: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Staging and output buckets of the test's own, the tiny warehouse, a Cloud Run API that counts launches."""
    monkeypatch.setenv("BQX_WAREHOUSE", str(warehouse))
    serving.settings.cache_clear()
    return Settings.from_env()


COLS = (Column(KEY, "timestamp[us, tz=UTC]"), Column("f000", "double"), Column("f001", "double"))
TABLES = ("targets_eurusd", "mom_eurusd_000", "vol_eurusd_000")


def _checkpoint(entry: TableEntry, rows: int = 40) -> bytes:
    keys = pa.array(range(1_700_000_000_000_000, 1_700_000_000_000_000 + rows * 60_000_000, 60_000_000), pa.int64())
    data = {KEY: keys.cast(KEY_TYPE), "f000": pa.array([float(j) for j in range(rows)]),
            "f001": pa.array([float(2 * j) for j in range(rows)])}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(data, schema=schema_of(entry.columns)), sink, **WRITER_OPTIONS)
    return sink.getvalue().to_pybytes()


def extracted_run(s: Settings, complete: bool = True) -> Manifest:
    """A run as the extract leaves it: manifest, then its checkpoints (all of them, or all but the last)."""
    run_id = "h" + uuid.uuid4().hex[:12]
    m = Manifest(PAIR, run_id, tuple(
        TableEntry(t, "targets" if t.startswith("targets") else "feature", COLS, layout.checkpoint(PAIR, run_id, t))
        for t in TABLES), created_at=time.time())
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    for entry in m.tables[: None if complete else -1]:
        storage.bucket(s, s.staging_bucket).blob(entry.checkpoint).upload_from_string(_checkpoint(entry))
    time.sleep(0.02)  # runs are ordered by when their manifest was written
    return m


# ---------------------------------------------------------------- extract by hand


def test_extract_by_hand_registers_its_run_and_the_completion_merges_it(s, run_api, monkeypatch) -> None:
    execution = execution_id(EXTRACT)
    as_cloud_run(monkeypatch, EXTRACT, execution)
    assert extract_job.main([PAIR]) == 0
    run_id = ids.run_id_for_execution(execution)
    pointer = read(s, s.staging_bucket, layout.latest(PAIR))
    assert pointer and pointer["run_id"] == run_id and pointer["origin"] == "execution"
    claim = read(s, s.staging_bucket, layout.claim(PAIR, run_id, "extract"))
    assert claim and claim["execution"].endswith(f"/jobs/{EXTRACT}/executions/{execution}")
    # `bqx status` sees it, and the trigger's "already running" rule too: a request starts nothing
    rs = runs.state(s, PAIR)
    assert rs.run_id == run_id and rs.extract_execution == claim["execution"] and rs.present == rs.expected == 3
    assert runs.active_run_id(s, PAIR) == run_id
    busy = trigger.start_run(s, PAIR, "r" + uuid.uuid4().hex[:12], {"origin": "test"})
    assert not busy.launched and busy.execution == claim["execution"] and launched(run_api, EXTRACT) == []
    # the completion function merges it by itself, once, on its checkpoints' and its report's events
    manifest = runs.load_manifest(s, PAIR, run_id)
    assert manifest is not None
    for name in [*(e.checkpoint for e in manifest.tables), layout.extract_report(PAIR, run_id, 0, 0)]:
        blob = storage.bucket(s, s.staging_bucket).get_blob(name)
        completion_handler.handle(s, storage_event(s.staging_bucket, name, blob.generation))
    assert len(launched(run_api, MERGE, run_id)) == 1
    assert runs.state(s, PAIR).merge_execution == launched(run_api, MERGE, run_id)[0]


def test_extract_launched_by_the_trigger_behaves_as_before(s, run_api, monkeypatch) -> None:
    run_id = "r" + uuid.uuid4().hex[:12]
    started = trigger.start_run(s, PAIR, run_id, {"origin": "test"})
    assert started.launched and started.execution
    before = {n: storage.read_json(s, s.staging_bucket, n)
              for n in (layout.latest(PAIR), layout.claim(PAIR, run_id, "extract"))}
    as_cloud_run(monkeypatch, EXTRACT, started.execution.rsplit("/", 1)[-1], BQX_RUN_ID=run_id)
    assert extract_job.main([PAIR]) == 0
    assert storage.exists(s, s.staging_bucket, layout.manifest(PAIR, run_id))
    assert {n: storage.read_json(s, s.staging_bucket, n) for n in before} == before  # nothing registered again


def test_extract_by_hand_refuses_while_another_run_is_active_unless_forced(s, run_api, monkeypatch) -> None:
    active = "r" + uuid.uuid4().hex[:12]
    assert trigger.start_run(s, PAIR, active, {"origin": "test"}).launched
    execution = execution_id(EXTRACT)
    mine = ids.run_id_for_execution(execution)
    code, lines = run_process("extract", [PAIR], cloud_run_env(EXTRACT, execution))
    assert code == 2, lines
    assert f"already has an active run {active}" in errors(lines) and f"--args={PAIR},--force" in errors(lines)
    assert read(s, s.staging_bucket, layout.latest(PAIR))["run_id"] == active  # type: ignore[index]
    for name in (layout.manifest(PAIR, mine), layout.claim(PAIR, mine, "extract"), layout.run_error(PAIR, mine),
                 layout.run_error(PAIR, active)):
        assert not storage.exists(s, s.staging_bucket, name), name  # refused: nothing started, nothing recorded
    # forced (gcloud run jobs execute bqx-ml-extract --args=eurusd,--force): a new run, registered
    forced = execution_id(EXTRACT)
    as_cloud_run(monkeypatch, EXTRACT, forced)
    assert extract_job.main([PAIR, "--force"]) == 0
    pointer = read(s, s.staging_bucket, layout.latest(PAIR))
    assert pointer and pointer["run_id"] == ids.run_id_for_execution(forced) and pointer["force"] is True


# ---------------------------------------------------------------- merge by hand


def test_merge_by_hand_merges_the_newest_complete_run(s, run_api, monkeypatch) -> None:
    older, newest_complete = extracted_run(s), extracted_run(s)
    still_extracting = extracted_run(s, complete=False)
    execution = execution_id(MERGE)
    as_cloud_run(monkeypatch, MERGE, execution)
    assert merge_job.main([PAIR]) == 0
    summary = read(s, s.output_bucket, layout.summary(PAIR))
    assert summary and summary["run_id"] == newest_complete.run_id and summary["execution"] == execution
    assert summary["rows"] == 40 and summary["columns"] == 1 + 3 * 2
    claim = read(s, s.staging_bucket, layout.claim(PAIR, newest_complete.run_id, "merge"))
    assert claim and claim["execution"].endswith(f"/executions/{execution}") and claim["by_hand"] is True
    for other in (older, still_extracting):
        assert not storage.exists(s, s.staging_bucket, layout.claim(PAIR, other.run_id, "merge"))
    assert launched(run_api, MERGE) == []  # it is its own launch


def test_merge_by_hand_of_a_named_run(s, run_api, monkeypatch) -> None:
    named, _newer = extracted_run(s), extracted_run(s)
    execution = execution_id(MERGE)
    as_cloud_run(monkeypatch, MERGE, execution)
    assert merge_job.main([PAIR, named.run_id]) == 0
    summary = read(s, s.output_bucket, layout.summary(PAIR))
    assert summary and summary["run_id"] == named.run_id
    claim = read(s, s.staging_bucket, layout.claim(PAIR, named.run_id, "merge"))
    assert claim and claim["execution"].endswith(f"/executions/{execution}")


def test_a_merged_run_is_not_merged_again_unless_forced(s, run_api, monkeypatch) -> None:
    m = extracted_run(s)
    first = execution_id(MERGE)
    as_cloud_run(monkeypatch, MERGE, first)
    assert merge_job.main([PAIR, m.run_id]) == 0
    published = read(s, s.output_bucket, layout.summary(PAIR))
    assert published
    for args in ([PAIR, m.run_id], [PAIR]):  # named, or as the newest complete run
        code, lines = run_process("merge", args, cloud_run_env(MERGE, execution_id(MERGE)))
        assert code == 2, lines
        assert f"run {m.run_id} of {PAIR} is already merged" in errors(lines), errors(lines)
        assert f"--args={PAIR},{m.run_id},--force" in errors(lines)
    assert read(s, s.output_bucket, layout.summary(PAIR)) == published
    claim = read(s, s.staging_bucket, layout.claim(PAIR, m.run_id, "merge"))
    assert claim and claim["execution"].endswith(f"/executions/{first}")
    # a run whose merge the completion function launched (claim recorded, merge still running)
    launching = extracted_run(s)
    by_completion = f"projects/p/locations/r/jobs/{MERGE}/executions/{MERGE}-fromcompletion"
    storage.create_json(s, s.staging_bucket, layout.claim(PAIR, launching.run_id, "merge"),
                        {"owner": "completion", "claimed_at": time.time(), "execution": by_completion})
    code, lines = run_process("merge", [PAIR, launching.run_id], cloud_run_env(MERGE, execution_id(MERGE)))
    assert code == 2 and f"execution {by_completion} holds its merge claim" in errors(lines), lines
    # ... and that completion-launched merge itself, if launched twice, exits 0 in its duplicate having done nothing
    as_cloud_run(monkeypatch, MERGE, execution_id(MERGE), BQX_RUN_ID=launching.run_id)
    assert merge_job.main([PAIR]) == 0
    assert read(s, s.output_bucket, layout.summary(PAIR)) == published
    # --force merges again and takes the claim over
    forced = execution_id(MERGE)
    as_cloud_run(monkeypatch, MERGE, forced)
    assert merge_job.main([PAIR, launching.run_id, "--force"]) == 0
    summary = read(s, s.output_bucket, layout.summary(PAIR))
    assert summary and summary["run_id"] == launching.run_id and summary["execution"] == forced
    claim = read(s, s.staging_bucket, layout.claim(PAIR, launching.run_id, "merge"))
    assert claim and claim["execution"].endswith(f"/executions/{forced}")
    assert claim["took_over_from"]["execution"] == by_completion


def test_merge_by_hand_without_a_complete_run_fails_clearly(s, run_api) -> None:
    code, lines = run_process("merge", ["gbpusd"], cloud_run_env(MERGE, execution_id(MERGE)))
    assert code == 2 and "gbpusd has no complete run to merge" in errors(lines), lines
    m = extracted_run(s, complete=False)
    code, lines = run_process("merge", [PAIR], cloud_run_env(MERGE, execution_id(MERGE)))
    assert code == 2 and f"{PAIR} has no complete run to merge" in errors(lines), lines
    code, lines = run_process("merge", [PAIR, m.run_id, "--force"], cloud_run_env(MERGE, execution_id(MERGE)))
    assert code == 2 and f"run {m.run_id} of {PAIR} is not complete: 2 of 3 checkpoints present" in errors(lines), lines
    code, lines = run_process("merge", [PAIR, "hnosuchrun"], cloud_run_env(MERGE, execution_id(MERGE)))
    assert code == 2 and "run hnosuchrun of eurusd has no manifest" in errors(lines), lines
    for name in (layout.claim(PAIR, m.run_id, "merge"), layout.run_error(PAIR, m.run_id)):
        assert not storage.exists(s, s.staging_bucket, name), name  # the run is left as it was
    assert not storage.exists(s, s.output_bucket, layout.summary(PAIR))


def test_bad_arguments_exit_2(s) -> None:
    for job, args in (("extract", [PAIR, "somerun"]), ("extract", [PAIR, "--all"]), ("merge", [PAIR, "a", "b"])):
        code, lines = run_process(job, args, cloud_run_env(f"bqx-ml-{job}", execution_id(f"bqx-ml-{job}")))
        assert code == 2 and "usage:" in errors(lines), (job, args, lines)


# ---------------------------------------------------------------- failures look like failures


@pytest.fixture
def duplicate_keys(s: Settings, tmp_path: Path) -> Path:
    from test_extract import duplicate_keys_warehouse

    return duplicate_keys_warehouse(s.dataset, tmp_path / "dups.duckdb")


def test_terminal_failure_exits_2_and_a_retried_task_stops_at_once(s, run_api, duplicate_keys) -> None:
    execution = execution_id(EXTRACT)
    run_id = ids.run_id_for_execution(execution)
    env = cloud_run_env(EXTRACT, execution, BQX_WAREHOUSE=str(duplicate_keys))
    code, lines = run_process("extract", [PAIR], env)
    assert code == 2, lines  # Cloud Run shows the execution failed
    assert "extract failed permanently" in errors(lines) and "duplicate interval_time" in errors(lines)
    err = read(s, s.staging_bucket, layout.run_error(PAIR, run_id))
    assert err and err["stage"] == "extract" and err["table"] == "mom_eurusd_000" and err["retry"] == f"bqx run {PAIR}"
    assert err["execution"].endswith(f"/executions/{execution}")
    # Cloud Run retries the task: it finds the error its execution recorded and stops without extracting again
    t0 = time.time()
    code, lines = run_process("extract", [PAIR], {**env, "CLOUD_RUN_TASK_ATTEMPT": "1"})
    assert code == 2, lines
    assert "failed permanently on an earlier attempt of this execution" in errors(lines), lines
    assert not any(x["message"] == "extract starting" for x in lines)
    assert storage.exists(s, s.staging_bucket, layout.extract_report(PAIR, run_id, 0, 0))
    assert not storage.exists(s, s.staging_bucket, layout.extract_report(PAIR, run_id, 0, 1))
    print(f"retried attempt: {time.time() - t0:.1f}s")
    # `bqx status` shows the failure and the command to retry
    done = subprocess.run([sys.executable, "-m", "bqx.cli", "status", PAIR, "--json"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)[0]
    assert status["run_id"] == run_id and status["state"] == "failed"
    assert status["error"]["retry"] == f"bqx run {PAIR}" and "duplicate" in status["error"]["error"]
    # the pair is no longer busy: a new request is not "already running"
    assert runs.active_run_id(s, PAIR) is None


def test_retried_merge_after_its_recorded_terminal_failure_stops_at_once(s, run_api, monkeypatch) -> None:
    m = extracted_run(s)
    execution = execution_id(MERGE)
    # what attempt 0 of this execution left behind after a terminal failure (record_error's shape)
    storage.write_json(s, s.staging_bucket, layout.run_error(PAIR, m.run_id), {
        "pair": PAIR, "run_id": m.run_id, "stage": "merge", "error": "merged file has 1 rows",
        "retry": f"bqx merge {PAIR} --run-id {m.run_id}",
        "execution": f"projects/p/locations/r/jobs/{MERGE}/executions/{execution}"})
    for launched_by_completion in (True, False):
        extra = {"BQX_RUN_ID": m.run_id} if launched_by_completion else {}
        code, lines = run_process("merge", [PAIR, m.run_id], cloud_run_env(MERGE, execution, attempt=1, **extra))
        assert code == 2, lines
        assert "failed permanently on an earlier attempt" in errors(lines)
        assert f"bqx merge {PAIR} --run-id {m.run_id}" in errors(lines)
    assert not storage.exists(s, s.output_bucket, layout.summary(PAIR))
    # another execution's attempt 1 (a forced merge by hand after that failure) is not stopped by it
    as_cloud_run(monkeypatch, MERGE, execution_id(MERGE), attempt=1)
    assert merge_job.main([PAIR, m.run_id, "--force"]) == 0
    assert read(s, s.output_bucket, layout.summary(PAIR))["run_id"] == m.run_id  # type: ignore[index]
