"""What the two functions do with an event. Each returns normally (acknowledged) or raises (redelivered)."""

from __future__ import annotations

import functools
import json
from typing import Any

from google.api_core import exceptions as gexc

from bqx import claims, events, ids, layout, logs, runs, storage
from bqx.config import Settings
from bqx.errors import AlreadyRunning, BadRequest, TerminalError, TransientError
from bqx.launch import run_job
from bqx.logs import Log
from bqx.pairs import validate_pair

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_FIELDS = {"pair", "force", "requested_by", "note"}

log = Log("bqx.functions")


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


def serve(component: str, handler: Any, cloud_event: Any) -> Any:
    """Run a handler with the retry contract: terminal -> log + ack; transient or unexpected -> raise."""
    logs.setup(component)
    clog = log.bind(component=component, event_id=_safe(cloud_event, "id"))
    try:
        return handler(settings(), cloud_event)
    except TerminalError as exc:
        clog.error(f"rejected: {exc}", error_type=type(exc).__name__)
        return None
    except TransientError as exc:
        clog.warning(f"will be redelivered: {exc}", error_type=type(exc).__name__)
        raise
    except Exception as exc:
        clog.error(f"unexpected failure, will be redelivered: {exc}", exc_info=True)
        raise


def _safe(event: Any, key: str) -> Any:
    try:
        return event[key]
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- trigger: request -> extract job


def parse_request_body(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request body is {len(raw)} bytes; at most {MAX_REQUEST_BYTES} allowed")
    try:
        if not raw.strip():
            raise BadRequest('request is empty; write a JSON object such as {"pair": "eurusd"}')
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request must be a JSON object, got {type(body).__name__}")
    unknown = set(body) - REQUEST_FIELDS
    if unknown:
        raise BadRequest(f"unknown request fields {sorted(unknown)[:5]}; allowed: {sorted(REQUEST_FIELDS)}")
    if "force" in body and not isinstance(body["force"], bool):
        raise BadRequest("'force' must be true or false")
    return body


def start_run(s: Settings, pair: str, run_id: str, origin: dict[str, Any], force: bool = False) -> claims.Outcome:
    """Start run `run_id` of `pair` once (runs.register, which an extract started by hand calls too). While the
    pair's latest run is another, active one, the request is acknowledged as "already running" unless `force`."""
    rlog = log.bind(pair=pair, run_id=run_id, stage="extract")
    try:
        outcome = runs.register(s, pair, run_id, lambda: run_job(s, s.extract_job, [pair], {"BQX_RUN_ID": run_id}),
                                origin, force=force)
    except AlreadyRunning as busy:
        rlog.info("already running: request acknowledged, no new run (send force: true to start one anyway)",
                  active_run_id=busy.run_id, execution=busy.execution, **origin)
        return claims.Outcome(False, busy.execution)
    if outcome.launched:
        rlog.info("extract job started", execution=outcome.execution, took_over=outcome.took_over, force=force)
    else:
        rlog.info("duplicate request ignored: run already started", execution=outcome.execution)
    return outcome


def trigger(s: Settings, cloud_event: Any) -> claims.Outcome | None:
    ev = events.parse(cloud_event)
    if isinstance(ev, events.ObjectEvent):
        if ev.bucket != s.staging_bucket or not ev.name.startswith(layout.REQUESTS) or ev.kind != "finalize":
            return None  # another object in a shared notification stream: not ours
        pair = layout.parse_request(ev.name)
        blob = storage.bucket(s, ev.bucket).blob(ev.name, generation=int(ev.generation))
        try:
            raw = blob.download_as_bytes(end=MAX_REQUEST_BYTES)
        except gexc.NotFound:
            raise BadRequest(f"request {ev.key} no longer exists") from None
        except gexc.RequestRangeNotSatisfiable:
            raw = b""  # a 0-byte object: ranged reads of it answer 416
        except storage.TRANSIENT as exc:
            raise TransientError(f"reading {ev.key}: {exc}") from exc
        body = parse_request_body(raw)
        if "pair" in body and validate_pair(body["pair"]) != pair:
            raise BadRequest(f"request {ev.name} names pair {body['pair']!r}, which is not {pair!r}")
        run_id = ids.run_id_for_object(ev.bucket, ev.name, ev.generation)
        origin = {"origin": "object", "object": ev.key}
    else:
        body = parse_request_body(ev.data)
        if "pair" not in body:
            raise BadRequest('message must carry {"pair": "<pair>"}')
        pair = validate_pair(body["pair"])
        run_id = ids.run_id_for_message(ev.message_id)
        origin = {"origin": "message", "message_id": ev.message_id}
    return start_run(s, pair, run_id, origin, force=bool(body.get("force", False)))


# ---------------------------------------------------------------- completion: checkpoints -> merge job


def completion(s: Settings, cloud_event: Any) -> claims.Outcome | None:
    """A checkpoint arrived (validate it: a bad one is set aside and reported) or the extract reported its end
    (sweep the run); when every manifest checkpoint is present and validated, start the merge once.

    Whether the run is complete is asked only once its extract has reported success (every task's report is in):
    before that, at least one checkpoint is still to come, and listing 668 objects on each of 668 events made the
    handoff quadratic. The report's own event, or any event after it, finds the run complete."""
    from bqx import validate  # pyarrow and numpy: only the completion function pays for them at cold start

    ev = events.parse(cloud_event)
    if not isinstance(ev, events.ObjectEvent):
        raise BadRequest("completion expects storage events, got a plain Pub/Sub message")
    if ev.bucket != s.staging_bucket or ev.kind != "finalize":
        return None
    if ev.name.startswith(layout.CHECKPOINTS):
        cp = layout.parse_checkpoint(ev.name)
        pair, run_id, table = cp.pair, cp.run_id, cp.table
    elif (finished := validate.report_run(ev.name)) is not None:
        (pair, run_id), table = finished, None
    else:
        return None
    rlog = log.bind(pair=pair, run_id=run_id, stage="completion", table=table)
    manifest = runs.load_manifest(s, pair, run_id)
    if manifest is None:
        raise BadRequest(f"object {ev.name} belongs to no run with a manifest")
    if table is not None:
        if not validate.arrival(s, manifest, ev.name, int(ev.generation)):
            # that generation is gone (overwritten, set aside, or re-stamped by a metadata patch on the emulator):
            # still a reason to look at the run, so a redelivered last event can retry a failed launch
            rlog.debug("that checkpoint generation is gone; checking the run", generation=ev.generation)
        if not validate.extract_finished(s, pair, run_id):
            return None  # more checkpoints are coming; the extract's report will ask
    else:
        if not validate.extract_finished(s, pair, run_id):
            return None
        validate.sweep(s, manifest)
    expected = manifest.expected_objects()
    done, valid, missing = validate.complete(s, manifest)
    if not done:
        rlog.debug("run not complete yet", present=len(expected) - missing, expected=len(expected))
        return None
    blocking = validate.blocking_error(s, manifest, valid)
    if blocking is not None:
        rlog.error("all checkpoints present, but the run has a recorded error: merge not started",
                   error=blocking.get("error"), error_stage=blocking.get("stage"))
        return None
    outcome = claims.launch_once(
        s, layout.claim(pair, run_id, "merge"),
        lambda: run_job(s, s.merge_job, [pair], {"BQX_RUN_ID": run_id}),
        {"pair": pair, "run_id": run_id},
    )
    if outcome.launched:
        rlog.info("all checkpoints present: merge job started", checkpoints=len(expected),
                  execution=outcome.execution, took_over=outcome.took_over)
    return outcome
