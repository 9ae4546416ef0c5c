"""The real functions/*/main.py served by functions-framework, fed real CloudEvents, against fake-gcs-server
and a local Cloud Run API that counts launches. Acked = HTTP 200, redelivered = HTTP 500."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cloudevents.conversion import to_structured
from functions_framework import create_app

from bqx import layout
from bqx.catalog import Column, Manifest, TableEntry
from bqx.extract.run import ExtractReport, save_report
from bqx.gcp import storage
from bqx.local.runapi import RunApi

from conftest import REPO, gcs_notification, pubsub_event, storage_event


def client(name: str):  # type: ignore[no-untyped-def]
    return create_app(name, str(REPO / "functions" / name / "main.py"), "cloudevent").test_client()


def post(c, event) -> int:  # type: ignore[no-untyped-def]
    headers, body = to_structured(event)
    return c.post("/", headers=headers, data=body).status_code


def launches(api: RunApi, job: str) -> list[dict]:
    return [e.resource() for e in api.executions.values() if e.job == job]


def upload(settings, name: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
    blob = storage.bucket(settings, settings.staging_bucket).blob(name)
    blob.upload_from_string(data)
    return int(blob.generation)


@pytest.fixture
def s(isolated, run_api):  # type: ignore[no-untyped-def]
    return isolated


def test_request_object_starts_one_extract_even_when_delivered_twice(s, run_api) -> None:
    gen = upload(s, layout.request("gbpusd"), b'{"pair": "gbpusd"}')
    c = client("trigger")
    assert post(c, storage_event(s.staging_bucket, "requests/gbpusd.json", gen, "a")) == 200
    assert post(c, gcs_notification(s.staging_bucket, "requests/gbpusd.json", gen, "b")) == 200
    started = launches(run_api, "bqx-ml-extract")
    assert len(started) == 1
    ex = run_api.executions[started[0]["name"].rsplit("/", 1)[-1]]
    assert ex.args == ["gbpusd"] and ex.env["BQX_RUN_ID"].startswith("r")
    pointer = storage.read_json(s, s.staging_bucket, layout.latest("gbpusd"))
    assert pointer and pointer[0]["run_id"] == ex.env["BQX_RUN_ID"]


def test_pubsub_message_starts_one_extract_per_message(s, run_api) -> None:
    c = client("trigger")
    mid = uuid.uuid4().hex
    assert post(c, pubsub_event(json.dumps({"pair": "usdjpy"}), message_id=mid)) == 200
    assert post(c, pubsub_event(json.dumps({"pair": "usdjpy"}), message_id=mid)) == 200
    assert len(launches(run_api, "bqx-ml-extract")) == 1
    # another message while that run is active: acknowledged as "already running" ...
    assert post(c, pubsub_event(json.dumps({"pair": "usdjpy"}), message_id=uuid.uuid4().hex)) == 200
    assert len(launches(run_api, "bqx-ml-extract")) == 1
    # ... unless it asks for a new run on purpose
    assert post(c, pubsub_event(json.dumps({"pair": "usdjpy", "force": True}), message_id=uuid.uuid4().hex)) == 200
    assert len(launches(run_api, "bqx-ml-extract")) == 2


@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", b'{"pair": "notapair"}', b'{"pair": 7}',
                                  b'{"pair": "eurusd", "drop": "table"}', b'{"pair": "../../etc"}',
                                  b'{"pair": "eurusd\'; DROP TABLE x; --"}', b"\xff\xfe",
                                  b'{"pair":"eurusd","force":"y"}'])
def test_bad_messages_are_acknowledged_and_start_nothing(s, run_api, body: bytes) -> None:
    assert post(client("trigger"), pubsub_event(body, message_id=uuid.uuid4().hex)) == 200
    assert launches(run_api, "bqx-ml-extract") == []


def test_objects_outside_the_layout_are_acknowledged(s, run_api) -> None:
    c = client("trigger")
    gen = upload(s, "requests/nested/eurusd.json", b'{"pair": "eurusd"}')
    assert post(c, storage_event(s.staging_bucket, "requests/nested/eurusd.json", gen)) == 200
    gen = upload(s, "requests/notapair.json", b"{}")
    assert post(c, storage_event(s.staging_bucket, "requests/notapair.json", gen)) == 200
    assert post(c, storage_event("someone-elses-bucket", "requests/eurusd.json", 1)) == 200
    comp = client("completion")
    gen = upload(s, "checkpoints/eurusd/../../x.parquet", b"x")
    assert post(comp, storage_event(s.staging_bucket, "checkpoints/eurusd/../../x.parquet", gen)) == 200
    assert run_api.executions == {}


def checkpoint_bytes(rows: int = 5) -> bytes:
    """A small valid checkpoint matching the manifest entries below."""
    keys = pa.array([i * 60_000_000 for i in range(rows)], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    buf = io.BytesIO()
    pq.write_table(pa.table({"interval_time": keys, "f000": [float(i) for i in range(rows)]}), buf)
    return buf.getvalue()


def _run_with_checkpoints(s, n: int = 3) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    run_id = "t" + uuid.uuid4().hex[:12]
    names = ["targets_eurusd", *[f"mom_eurusd_{i:03d}" for i in range(n - 1)]]
    cols = (Column("interval_time", "timestamp[us, tz=UTC]"), Column("f000", "double"))
    m = Manifest("eurusd", run_id, tuple(
        TableEntry(t, "targets" if t.startswith("targets") else "feature", cols, layout.checkpoint("eurusd", run_id, t))
        for t in names))
    storage.write_json(s, s.staging_bucket, layout.manifest("eurusd", run_id), m.to_json())
    return run_id, [t.checkpoint for t in m.tables]


def report_extract(s, run_id: str) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """What the extract writes after its last checkpoint (its one task's report): (name, generation)."""
    save_report(s, ExtractReport("eurusd", run_id, task_index=0, task_count=1))
    name = layout.extract_report("eurusd", run_id, 0, 0)
    found = storage.read_json(s, s.staging_bucket, name)
    assert found is not None
    return name, found[1]


def test_merge_starts_once_when_the_extract_reports_its_end(s, run_api) -> None:
    run_id, objects = _run_with_checkpoints(s, 3)
    c = client("completion")
    gens = []
    for i, name in enumerate(objects):
        gens.append(upload(s, name, checkpoint_bytes()))
        assert post(c, storage_event(s.staging_bucket, name, gens[-1], f"e{i}")) == 200
        assert launches(run_api, "bqx-ml-merge") == []  # every checkpoint validated; the extract has not reported
    report, generation = report_extract(s, run_id)
    assert post(c, storage_event(s.staging_bucket, report, generation, "r")) == 200
    assert len(launches(run_api, "bqx-ml-merge")) == 1
    for i in range(len(objects)):  # every event again, reordered, both delivery shapes
        assert post(c, gcs_notification(s.staging_bucket, objects[-1 - i], gens[-1 - i], f"d{i}")) == 200
    assert post(c, gcs_notification(s.staging_bucket, report, generation, "dr")) == 200
    merges = launches(run_api, "bqx-ml-merge")
    assert len(merges) == 1
    ex = run_api.executions[merges[0]["name"].rsplit("/", 1)[-1]]
    assert ex.args == ["eurusd"] and ex.env["BQX_RUN_ID"] == run_id
    claim = storage.read_json(s, s.staging_bucket, layout.claim("eurusd", run_id, "merge"))
    assert claim and claim[0]["execution"] == merges[0]["name"]


def test_the_report_event_before_the_checkpoints_events_starts_the_merge(s, run_api) -> None:
    # events arrive in any order: the report's may come before the checkpoints' own
    run_id, objects = _run_with_checkpoints(s, 3)
    gens = [upload(s, n, checkpoint_bytes()) for n in objects]
    report, generation = report_extract(s, run_id)
    c = client("completion")
    assert post(c, storage_event(s.staging_bucket, report, generation, "r")) == 200
    assert len(launches(run_api, "bqx-ml-merge")) == 1  # the report's sweep validated the checkpoints itself
    for i, name in enumerate(objects):
        assert post(c, storage_event(s.staging_bucket, name, gens[i], f"e{i}")) == 200
    assert len(launches(run_api, "bqx-ml-merge")) == 1


def test_launch_failure_is_redelivered_then_succeeds_once(s, run_api) -> None:
    run_id, objects = _run_with_checkpoints(s, 2)
    for n in objects:
        upload(s, n, checkpoint_bytes())
    report, generation = report_extract(s, run_id)
    run_api.fail_next = 2  # Cloud Run answers 503 twice
    c = client("completion")
    ev = storage_event(s.staging_bucket, report, generation)
    assert post(c, ev) == 503  # transient: answer 503 so Pub/Sub redelivers
    assert post(c, ev) == 503
    assert launches(run_api, "bqx-ml-merge") == []
    assert post(c, ev) == 200
    assert post(c, ev) == 200
    assert len(launches(run_api, "bqx-ml-merge")) == 1
    assert run_api.calls == 3


def test_instance_dying_after_claim_is_taken_over_after_the_lease(s, run_api) -> None:
    run_id, objects = _run_with_checkpoints(s, 2)
    for n in objects:
        upload(s, n, checkpoint_bytes())
    report, generation = report_extract(s, run_id)
    claim_name = layout.claim("eurusd", run_id, "merge")
    # what a crashed instance leaves: a claim with no execution recorded
    dead = {"owner": "dead:1", "claimed_at": time.time(), "execution": None}
    storage.create_json(s, s.staging_bucket, claim_name, dead)
    c = client("completion")
    ev = storage_event(s.staging_bucket, report, generation)
    assert post(c, ev) == 503  # fresh claim, no launch recorded: come back later
    assert launches(run_api, "bqx-ml-merge") == []
    # the claim's age is GCS's (its generation's timeCreated against the server's Date), not the body's claimed_at:
    # it goes stale only once the lease has passed on the server's clock (the Date header's second on top)
    time.sleep(s.claim_lease_seconds + 1.2)
    assert post(c, ev) == 200
    assert post(c, ev) == 200
    assert len(launches(run_api, "bqx-ml-merge")) == 1
    final = storage.read_json(s, s.staging_bucket, claim_name)
    assert final and final[0]["execution"] and final[0]["took_over_from"]["owner"] == "dead:1"


def test_checkpoint_of_a_run_without_manifest_is_acknowledged(s, run_api) -> None:
    name = layout.checkpoint("eurusd", "nomanifest1", "targets_eurusd")
    gen = upload(s, name, b"p")
    assert post(client("completion"), storage_event(s.staging_bucket, name, gen)) == 200
    assert run_api.executions == {}


def test_status_says_merging_only_once_a_merge_execution_exists(s, run_api) -> None:
    from bqx import runs

    run_id, objects = _run_with_checkpoints(s, 3)
    gens = [upload(s, n, checkpoint_bytes()) for n in objects]
    c = client("completion")
    for i, name in enumerate(objects):
        assert post(c, storage_event(s.staging_bucket, name, gens[i], f"e{i}")) == 200
    rs = runs.state(s, "eurusd", run_id)
    assert (rs.state, rs.present, rs.validated) == ("handoff", 3, 3)  # all in and checked; no merge yet
    report, generation = report_extract(s, run_id)
    assert post(c, storage_event(s.staging_bucket, report, generation, "r")) == 200
    rs = runs.state(s, "eurusd", run_id)
    assert rs.state == "merging" and rs.merge_execution == launches(run_api, "bqx-ml-merge")[0]["name"]
    # the merge job's progress, as bqx.merge.publish.Progress writes it
    name = layout.merge_progress("eurusd", run_id)
    storage.write_json(s, s.staging_bucket, name, {"phase": "merging", "tables_written": 1, "tables": 2})
    assert runs.state(s, "eurusd", run_id).merge_progress["tables_written"] == 1
    storage.write_json(s, s.staging_bucket, name, {"phase": "publishing", "tables_written": 2, "tables": 2})
    assert runs.state(s, "eurusd", run_id).state == "publishing"


def test_a_refused_merge_launch_is_recorded_not_left_merging(s, run_api) -> None:
    """Cloud Run answering 403 (or 400) to run_job: retrying cannot help. The event is acknowledged and the run
    recorded as failed with the cause and the retry command, instead of staying "merging" with no merge."""
    from bqx import runs

    run_id, objects = _run_with_checkpoints(s, 2)
    for n in objects:
        upload(s, n, checkpoint_bytes())
    report, generation = report_extract(s, run_id)
    run_api.fail_next, run_api.fail_status = 1, 403
    c = client("completion")
    assert post(c, storage_event(s.staging_bucket, report, generation)) == 200  # acknowledged: no retry storm
    assert launches(run_api, "bqx-ml-merge") == []
    err = storage.read_json(s, s.staging_bucket, layout.run_error("eurusd", run_id))
    assert err is not None and err[0]["stage"] == "handoff" and "403" in err[0]["error"]
    assert err[0]["retry"].endswith(f"bqx merge eurusd --run-id {run_id}")
    rs = runs.state(s, "eurusd", run_id)
    assert rs.state == "failed" and rs.error["error_type"] == "LaunchRefused"


def test_a_refused_extract_launch_fails_the_run_it_registered(s, run_api) -> None:
    from bqx import runs

    run_api.fail_next, run_api.fail_status = 1, 400
    msg = pubsub_event(json.dumps({"pair": "eurusd"}), message_id=uuid.uuid4().hex)
    assert post(client("trigger"), msg) == 200
    assert launches(run_api, "bqx-ml-extract") == []
    rs = runs.state(s, "eurusd")
    assert rs.state == "failed" and rs.error["stage"] == "trigger" and "400" in rs.error["error"]
    # the pair is not "already running": the next request starts a run
    msg = pubsub_event(json.dumps({"pair": "eurusd"}), message_id=uuid.uuid4().hex)
    assert post(client("trigger"), msg) == 200
    assert len(launches(run_api, "bqx-ml-extract")) == 1


@pytest.mark.parametrize("nested", [b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000])
def test_deeply_nested_json_is_a_bad_request(s, run_api, nested: bytes) -> None:
    """Nesting within the 64 KB limit used to raise RecursionError: 500 and redelivery forever (issue 17.7)."""
    assert len(nested) < 64 * 1024
    assert post(client("trigger"), pubsub_event(nested, message_id=uuid.uuid4().hex)) == 200
    name = "requests/eurusd.json"
    gen = upload(s, name, nested)
    assert post(client("trigger"), storage_event(s.staging_bucket, name, gen)) == 200
    assert launches(run_api, "bqx-ml-extract") == []


# ---------------------------------------------------------------- recorded payloads (tests/data), as Google sends them
# Each file is an event as Eventarc or Pub/Sub delivers it (shapes from Google's documentation and its
# google-cloudevents test data). A test renames the recorded object to one it wrote and posts the rest untouched.

DATA = REPO / "tests" / "data"


def recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _object_resource(resource: dict, blob) -> dict:  # type: ignore[no-untyped-def]
    """The recorded object resource, renamed to `blob` (identity and content fields; the rest as recorded)."""
    return {**resource, "bucket": blob.bucket.name, "name": blob.name, "generation": str(blob.generation),
            "id": f"{blob.bucket.name}/{blob.name}/{blob.generation}", "size": str(blob.size),
            "crc32c": blob.crc32c, "md5Hash": blob.md5_hash}


def eventarc_finalized(blob) -> dict:  # type: ignore[no-untyped-def]
    """tests/data/eventarc_storage_finalized.json about `blob`."""
    ce = recorded("eventarc_storage_finalized.json")
    ce.update(source=f"//storage.googleapis.com/projects/_/buckets/{blob.bucket.name}", subject=f"objects/{blob.name}",
              bucket=blob.bucket.name, id=uuid.uuid4().hex, data=_object_resource(ce["data"], blob))
    return ce


def notification_push(blob) -> dict:  # type: ignore[no-untyped-def]
    """tests/data/pubsub_push_gcs_notification.json about `blob`: a GCS notification in a Pub/Sub push body."""
    body = recorded("pubsub_push_gcs_notification.json")
    msg = body["message"]
    resource = json.loads(base64.b64decode(msg["data"]))
    msg["attributes"].update(bucketId=blob.bucket.name, objectId=blob.name, objectGeneration=str(blob.generation))
    msg["data"] = base64.b64encode(json.dumps(_object_resource(resource, blob)).encode()).decode()
    msg["messageId"] = msg["message_id"] = uuid.uuid4().hex
    return body


def post_structured(c, ce: dict) -> int:  # type: ignore[no-untyped-def]
    """The CloudEvent in structured mode: the whole event is the JSON body."""
    return c.post("/", data=json.dumps(ce), headers={"Content-Type": "application/cloudevents+json"}).status_code


def post_binary(c, ce: dict) -> int:  # type: ignore[no-untyped-def]
    """The CloudEvent in binary mode (how Eventarc delivers over HTTP): attributes as ce-* headers, data the body."""
    headers = {f"ce-{k}": str(v) for k, v in ce.items() if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = ce["datacontenttype"]
    return c.post("/", data=json.dumps(ce["data"]), headers=headers).status_code


def post_push(c, body: dict) -> int:  # type: ignore[no-untyped-def]
    """A Pub/Sub push request's JSON body, not a CloudEvent (functions-framework converts it)."""
    return c.post("/", json=body).status_code


def _extract_args(run_api: RunApi) -> list[list[str]]:
    return sorted(run_api.executions[e["name"].rsplit("/", 1)[-1]].args for e in launches(run_api, "bqx-ml-extract"))


def test_recorded_eventarc_storage_events_start_extracts_in_both_modes(s, run_api) -> None:
    c = client("trigger")
    blobs = {}
    for pair in ("eurusd", "gbpusd"):
        upload(s, layout.request(pair), json.dumps({"pair": pair}).encode())
        blobs[pair] = storage.get_blob(s, s.staging_bucket, layout.request(pair))
    assert post_binary(c, eventarc_finalized(blobs["eurusd"])) == 200
    assert post_structured(c, eventarc_finalized(blobs["gbpusd"])) == 200
    assert _extract_args(run_api) == [["eurusd"], ["gbpusd"]]
    # delivered again, in the other mode each: nothing more starts
    assert post_structured(c, eventarc_finalized(blobs["eurusd"])) == 200
    assert post_binary(c, eventarc_finalized(blobs["gbpusd"])) == 200
    assert _extract_args(run_api) == [["eurusd"], ["gbpusd"]]


def test_recorded_pubsub_push_and_eventarc_message_start_extracts(s, run_api) -> None:
    c = client("trigger")
    push = recorded("pubsub_push_request.json")
    assert json.loads(base64.b64decode(push["message"]["data"])) == {"pair": "eurusd"}
    assert post_push(c, push) == 200
    assert _extract_args(run_api) == [["eurusd"]]
    ce = recorded("eventarc_pubsub_published.json")
    ce["data"]["message"]["data"] = base64.b64encode(b'{"pair": "usdjpy"}').decode()
    assert post_binary(c, ce) == 200
    assert _extract_args(run_api) == [["eurusd"], ["usdjpy"]]
    assert post_structured(c, ce) == 200  # the same message again
    assert post_push(c, push) == 200
    assert _extract_args(run_api) == [["eurusd"], ["usdjpy"]]


def test_recorded_storage_events_validate_checkpoints_from_their_object_resource(s, run_api) -> None:
    from bqx.completion.validate import is_marked

    run_id, objects = _run_with_checkpoints(s, 2)
    c = client("completion")
    for name in objects:
        upload(s, name, checkpoint_bytes())
    first, second = (storage.get_blob(s, s.staging_bucket, n) for n in objects)
    assert not is_marked(first) and not is_marked(second)
    assert post_binary(c, eventarc_finalized(first)) == 200
    assert post_push(c, notification_push(second)) == 200
    assert all(is_marked(storage.get_blob(s, s.staging_bucket, n)) for n in objects)
    assert launches(run_api, "bqx-ml-merge") == []  # the extract has not reported its end
