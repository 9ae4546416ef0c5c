"""The launch window (issue 17.6): a function instance that dies after Cloud Run accepted `run_job` and before it
recorded the execution leaves a claim that a later delivery takes over and launches again. Each job claims its run's
stage with its own CLOUD_RUN_EXECUTION as it starts (runs/<pair>/<run>/<stage>.started, create-once), and a second
execution for the same run exits 0 having done nothing. Real job entrypoints against fake-gcs-server."""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
from test_jobs_manual import MERGE, PAIR, as_cloud_run, execution_id, extracted_run, read, s, warehouse  # noqa: F401

from bqx import layout
from bqx.errors import ClaimHeld
from bqx.gcp import claims, storage
from bqx.merge import job as merge_job

from fakes import validate_all


def test_item6_a_second_merge_launched_for_the_same_run_does_no_work(s, monkeypatch) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    m = extracted_run(s)
    validate_all(s, m)
    claim = layout.claim(PAIR, m.run_id, "merge")
    # the completion instance that won the claim launched E1 and died before recording it
    storage.create_json(s, s.staging_bucket, claim, {"owner": "dead", "claimed_at": time.time(), "execution": None,
                                                     "pair": PAIR, "run_id": m.run_id})
    first, second = execution_id(MERGE), execution_id(MERGE)
    as_cloud_run(monkeypatch, MERGE, first, BQX_RUN_ID=m.run_id)
    assert merge_job.main([PAIR]) == 0
    published = read(s, s.output_bucket, layout.summary(PAIR))
    assert published and published["execution"] == first
    # past the lease a redelivery took the claim over and launched E2, which it recorded
    found = storage.read_json(s, s.staging_bucket, claim)
    assert found is not None
    taken = f"projects/{s.project}/locations/{s.region}/jobs/{MERGE}/executions/{second}"
    storage.replace_json(s, s.staging_bucket, claim, {**found[0], "execution": taken, "took_over_from": found[0]},
                         found[1])
    as_cloud_run(monkeypatch, MERGE, second, BQX_RUN_ID=m.run_id)
    assert merge_job.main([PAIR]) == 0  # a duplicate launch: exit 0 ...
    assert read(s, s.output_bucket, layout.summary(PAIR)) == published  # ... having merged and published nothing
    started = read(s, s.staging_bucket, layout.started(PAIR, m.run_id, "merge"))
    assert started and started["execution"].endswith(f"/executions/{first}")
    # E1's task retried (an attempt of the execution that started the run's merge) is not a second launch
    as_cloud_run(monkeypatch, MERGE, first, attempt=1, BQX_RUN_ID=m.run_id)
    assert merge_job.main([PAIR]) == 0


def test_item6_two_launches_neither_recorded_merge_once(s, monkeypatch) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Both executions start while the claim records neither (the dead launcher's, and the taker's before it
    recorded): the first to start merges, the other exits 0."""
    m = extracted_run(s)
    validate_all(s, m)
    storage.create_json(s, s.staging_bucket, layout.claim(PAIR, m.run_id, "merge"),
                        {"owner": "taker", "claimed_at": time.time(), "execution": None, "pair": PAIR,
                         "run_id": m.run_id})
    executions = [execution_id(MERGE), execution_id(MERGE)]
    for execution in executions:
        as_cloud_run(monkeypatch, MERGE, execution, BQX_RUN_ID=m.run_id)
        assert merge_job.main([PAIR]) == 0
    published = read(s, s.output_bucket, layout.summary(PAIR))
    assert published and published["execution"] == executions[0]


def _dead_or_alive_claim(settings, name: str, skew: float) -> None:  # type: ignore[no-untyped-def]
    """A claim written just now (GCS's clock) by an owner whose own clock is `skew` seconds off, not launched yet."""
    now = time.time() + skew
    storage.create_json(settings, settings.staging_bucket, name,
                        {"owner": "skewed:1", "claimed_at": now, "renewed_at": now, "execution": None})


def test_item6_a_skewed_clock_does_not_let_a_second_instance_take_a_live_claim(isolated) -> None:  # type: ignore[no-untyped-def]
    st = dataclasses.replace(isolated, claim_lease_seconds=2.0)
    name = layout.claim(PAIR, "skew" + uuid.uuid4().hex[:8], "merge")
    _dead_or_alive_claim(st, name, skew=-3600)  # its owner's clock is an hour behind: it looks an hour old
    launched = []
    with pytest.raises(ClaimHeld):
        claims.launch_once(st, name, lambda: launched.append(1) or "E2", {})
    assert launched == []
    found = storage.read_json(st, st.staging_bucket, name)
    assert found and found[0]["owner"] == "skewed:1"  # still its owner's


def test_item6_a_claim_older_than_the_lease_by_the_servers_clock_is_taken_over(isolated) -> None:  # type: ignore[no-untyped-def]
    st = dataclasses.replace(isolated, claim_lease_seconds=1.0)
    name = layout.claim(PAIR, "skew" + uuid.uuid4().hex[:8], "merge")
    _dead_or_alive_claim(st, name, skew=+3600)  # its owner's clock is an hour ahead: it looks fresh for an hour
    time.sleep(2.5)  # longer than the lease (plus the second the server's Date header may be short by)
    outcome = claims.launch_once(st, name, lambda: "E2", {})
    assert outcome.launched and outcome.took_over and outcome.execution == "E2"
