"""Exactly-once, proven under chaos (issue 4).

Completion: seeded schedules from scripts/chaos.py against the real `completion` function in a real
functions-framework server process and the session's fake-gcs-server: each checkpoint's finalize delivered 1-3
times, shuffled, by 8 concurrent senders; instances killed (os._exit) or raising right after winning the merge
claim, or after Cloud Run accepted the merge's `run_job` and before the execution was recorded (the launch window: the
merge is launched twice, and the job's start claim lets only one of them work); the Cloud Run API answering 503
first. Failed deliveries come back like Pub/Sub push redeliveries (bounded attempts), and the claim lease is 1 s.
Every run must get exactly one merge execution that does the work. CI runs 50 schedules; BQX_CHAOS_SCHEDULES changes
that (scripts/chaos.py runs 1,000).

Start: one request starts one run, and a second request for a pair whose run is active is acknowledged as
"already running" unless it says force — also when different requests race for an idle pair.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cloudevents.conversion import to_structured
from functions_framework import create_app

from bqx import layout, serving
from bqx.gcp import storage
from bqx.local.runapi import RunApi

from conftest import REPO, pubsub_event, storage_event

_spec = importlib.util.spec_from_file_location("bqx_chaos", REPO / "scripts" / "chaos.py")
chaos = sys.modules.setdefault("bqx_chaos", importlib.util.module_from_spec(_spec))  # type: ignore[arg-type]
_spec.loader.exec_module(chaos)  # type: ignore[union-attr]

SCHEDULES = int(os.environ.get("BQX_CHAOS_SCHEDULES", "50"))
SEED = int(os.environ.get("BQX_CHAOS_SEED", "4000"))

pytestmark = pytest.mark.stack


# ---------------------------------------------------------------- completion: exactly one merge per run


@pytest.fixture
def harnesses(isolated, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two independent completion servers (each with its own Run API), sharing the test's staging bucket."""
    env = dict(os.environ)
    started = []
    try:
        for i in range(2):
            started.append(chaos.Harness(isolated, env, tmp_path / f"h{i}", lease=1.0).start())
        yield started
    finally:
        for h in started:
            h.stop()


def _explain(results: list) -> str:  # type: ignore[type-arg]
    bad = [r for r in results if not r.ok]
    return "\n".join(f"seed {r.seed} run {r.run_id}: {r.workers} merged of {r.merges} {r.executions}, claim says "
                     f"{r.claim_execution}; crash={r.crash_kind or '-'}x{r.crashes} 503s={r.fail_503} "
                     f"dead-lettered={r.dead_letters}" for r in bad[:10])


def test_seeded_schedules_give_every_run_exactly_one_merge(harnesses) -> None:  # type: ignore[no-untyped-def]
    totals, results = chaos.run_many(harnesses, list(range(SEED, SEED + SCHEDULES)))
    assert totals.schedules == SCHEDULES
    assert totals.runs_without_merge == 0 and totals.runs_with_extra_merges == 0, _explain(results)
    assert totals.workers == SCHEDULES and totals.merges >= SCHEDULES
    assert all(r.ok for r in results), _explain(results)
    # the schedules did exercise what they claim to
    if SCHEDULES >= 30:
        assert totals.duplicates > SCHEDULES / 2
        assert totals.crashes >= 3 and totals.fail_503 >= 3 and totals.takeovers >= 1
        assert totals.launch_crashes >= 1
        assert any(r.crash_kind == "exit" and r.crashes for r in results)
        assert any(r.crash_kind == "raise" and r.crashes for r in results)


def test_killed_instance_and_cloud_run_503s_in_one_run(harnesses) -> None:  # type: ignore[no-untyped-def]
    h = harnesses[0]
    r = h.run_schedule(7, crash="exit", fail_503=2)  # a taker's failed launch gives the claim back: no takeover
    assert r.crashes >= 1 and r.fail_503 == 2
    assert r.ok, _explain([r])
    assert h.proc.poll() is None  # gunicorn replaced the killed worker; the server is still up
    for seed, kind in ((8, "exit"), (9, "raise")):
        r = h.run_schedule(seed, crash=kind, fail_503=0, launch_crash="")
        assert r.crashes >= 1 and r.ok, _explain([r])
        assert r.took_over  # the dead instance's claim was taken over after the lease


@pytest.mark.parametrize("kind", ["exit", "raise"])
def test_item6_a_crash_between_run_job_and_its_record_still_gives_one_merge(harnesses, kind: str) -> None:  # type: ignore[no-untyped-def]
    """The launch window: the instance dies (or raises) after Cloud Run accepted `run_job`, before it recorded the
    execution. Past the lease a redelivery takes the claim over and launches the merge again; of the two executions
    exactly one merges (the job's start claim), the other exits 0."""
    r = harnesses[0].run_schedule(21, crash="", fail_503=0, launch_crash=kind)
    assert r.launch_crashes == 1 and r.took_over, _explain([r])
    assert r.merges == 2 and r.workers == 1, _explain([r])
    assert r.ok, _explain([r])


def test_a_clean_schedule_needs_no_redelivery(harnesses) -> None:  # type: ignore[no-untyped-def]
    r = harnesses[0].run_schedule(11, crash="", fail_503=0, launch_crash="")
    assert r.ok and r.crashes == 0 and not r.took_over, _explain([r])
    assert r.dead_letters == 0


# ---------------------------------------------------------------- trigger: one run per request, one per pair


def _trigger():  # type: ignore[no-untyped-def]
    return create_app("trigger", str(REPO / "functions" / "trigger" / "main.py"), "cloudevent").test_client()


def _post(c, event) -> int:  # type: ignore[no-untyped-def]
    headers, body = to_structured(event)
    return c.post("/", headers=headers, data=body).status_code


def _extracts(api: RunApi, pair: str) -> list[str]:
    with api.lock:
        return [e.env["BQX_RUN_ID"] for e in api.executions.values() if e.job == "bqx-ml-extract" and e.args == [pair]]


def _request(s, pair: str, body: dict) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    blob = storage.bucket(s, s.staging_bucket).blob(layout.request(pair))
    blob.upload_from_string(json.dumps(body).encode())
    return blob.name, int(blob.generation)


@pytest.fixture
def s(isolated_output, run_api):  # type: ignore[no-untyped-def]
    """The test's own staging and output buckets (summaries of other tests' runs must not count)."""
    return isolated_output


def test_second_request_while_a_run_is_active_is_acknowledged_not_started(s, run_api) -> None:
    c = _trigger()
    name, gen = _request(s, "audnzd", {"pair": "audnzd"})
    assert _post(c, storage_event(s.staging_bucket, name, gen, "a")) == 200
    first = _extracts(run_api, "audnzd")
    assert len(first) == 1
    name, gen2 = _request(s, "audnzd", {"pair": "audnzd", "note": "again"})  # a new generation: a new request
    assert _post(c, storage_event(s.staging_bucket, name, gen2, "b")) == 200
    assert _post(c, pubsub_event(json.dumps({"pair": "audnzd"}), message_id=uuid.uuid4().hex)) == 200
    assert _extracts(run_api, "audnzd") == first  # "already running"
    pointer = storage.read_json(s, s.staging_bucket, layout.latest("audnzd"))
    assert pointer and pointer[0]["run_id"] == first[0]
    # the first request delivered again is still the same run, not a new one
    assert _post(c, storage_event(s.staging_bucket, name, gen, "c")) == 200
    assert _extracts(run_api, "audnzd") == first


def test_force_starts_a_new_run_while_one_is_active(s, run_api) -> None:
    c = _trigger()
    assert _post(c, pubsub_event(json.dumps({"pair": "cadjpy"}), message_id=uuid.uuid4().hex)) == 200
    mid = uuid.uuid4().hex
    forced = pubsub_event(json.dumps({"pair": "cadjpy", "force": True}), message_id=mid)
    assert _post(c, forced) == 200
    assert _post(c, forced) == 200  # a forced message delivered twice is still one run
    runs = _extracts(run_api, "cadjpy")
    assert len(runs) == 2
    pointer = storage.read_json(s, s.staging_bucket, layout.latest("cadjpy"))
    assert pointer and pointer[0]["run_id"] == runs[1] and pointer[0]["force"] is True


@pytest.mark.parametrize("ending", ["summary", "error", "max_age"])
def test_a_finished_failed_or_too_old_run_no_longer_blocks(s, run_api, ending: str) -> None:
    c = _trigger()
    assert _post(c, pubsub_event(json.dumps({"pair": "chfjpy"}), message_id=uuid.uuid4().hex)) == 200
    (run_id,) = _extracts(run_api, "chfjpy")
    if ending == "summary":
        storage.write_json(s, s.output_bucket, layout.summary("chfjpy"), {"pair": "chfjpy", "run_id": run_id})
    elif ending == "error":
        storage.write_json(s, s.staging_bucket, layout.run_error("chfjpy", run_id), {"error": "boom"})
    else:
        os.environ["BQX_ACTIVE_RUN_MAX_SECONDS"] = "0.2"
        serving.settings.cache_clear()
        time.sleep(0.3)
    assert _post(c, pubsub_event(json.dumps({"pair": "chfjpy"}), message_id=uuid.uuid4().hex)) == 200
    assert len(_extracts(run_api, "chfjpy")) == 2


def test_different_requests_racing_for_an_idle_pair_start_one_run(s, run_api) -> None:
    """8 distinct messages for one pair at the same moment, 500s redelivered: the latest.json swap lets one win."""
    failures = []

    def deliver(mid: str) -> None:
        c = _trigger()
        for _ in range(chaos.MAX_ATTEMPTS):
            if _post(c, pubsub_event(json.dumps({"pair": "nzdjpy"}), message_id=mid)) == 200:
                return
            time.sleep(0.2)
        failures.append(mid)

    threads = [threading.Thread(target=deliver, args=(uuid.uuid4().hex,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    runs = _extracts(run_api, "nzdjpy")
    assert len(runs) == 1
    pointer = storage.read_json(s, s.staging_bucket, layout.latest("nzdjpy"))
    assert pointer and pointer[0]["run_id"] == runs[0]


def test_a_run_whose_launch_failed_does_not_block_the_next_request(s, run_api) -> None:
    c = _trigger()
    run_api.fail_next = 1
    assert _post(c, pubsub_event(json.dumps({"pair": "eurnzd"}), message_id=uuid.uuid4().hex)) == 503
    assert _extracts(run_api, "eurnzd") == []  # its pointer is written, but its claim was given back
    assert _post(c, pubsub_event(json.dumps({"pair": "eurnzd"}), message_id=uuid.uuid4().hex)) == 200
    assert len(_extracts(run_api, "eurnzd")) == 1


def test_a_dead_service_stops_the_harness_at_once_with_its_log(harnesses, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 17.13: a crashed emulator (fake-gcs-server's memory backend died with 'concurrent map writes') used to
    leave the harness silent for minutes; now the schedules stop before the next one, naming it."""
    import subprocess
    import time

    log = tmp_path / "gcs.log"
    log.write_text("fatal error: concurrent map writes\ngoroutine 1 [running]:\n")
    dead = subprocess.Popen(["false"])
    dead.wait()
    t0 = time.time()
    with pytest.raises(chaos.ServiceDied) as died:
        chaos.run_many(harnesses, list(range(5)), services={"fake-gcs-server": (dead, log)})
    assert time.time() - t0 < 5
    assert "fake-gcs-server exited with 1" in str(died.value) and "concurrent map writes" in str(died.value)
