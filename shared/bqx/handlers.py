"""What the two functions do with an event. Each returns normally (acknowledged) or raises (redelivered)."""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from google.api_core import exceptions as gexc

from bqx import claims, events, ids, layout, logs, runs, storage
from bqx.config import Settings
from bqx.errors import AlreadyRunning, BadRequest, ClaimHeld, LaunchRefused, TerminalError, TransientError
from bqx.launch import run_job
from bqx.logs import Log
from bqx.pairs import validate_pair

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_FIELDS = {"pair", "force", "accept_drift", "requested_by", "note"}

log = Log("bqx.functions")


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


def serve(component: str, handler: Any, cloud_event: Any) -> Any:
    """Run a handler with the retry contract: terminal -> log + ack (200); transient -> 503, so the event is
    redelivered, logged once without a traceback (a claim held by another instance is part of the protocol: INFO);
    unexpected -> raise (500 with the framework's traceback: a bug to look at). Each event's CPU and wall time are
    logged at DEBUG (benchmarks/handoff.py reads them)."""
    logs.setup(component)
    clog = log.bind(component=component, event_id=_safe(cloud_event, "id"))
    cpu, wall, outcome = time.thread_time(), time.perf_counter(), "done"
    try:
        return handler(settings(), cloud_event)
    except TerminalError as exc:
        outcome = "rejected"
        clog.error(f"rejected: {exc}", error_type=type(exc).__name__)
        return None
    except ClaimHeld as exc:
        outcome = "redelivered"
        clog.info(f"another instance is launching; will be redelivered: {exc}")
        _redeliver(exc)
    except TransientError as exc:
        outcome = "redelivered"
        clog.warning(f"will be redelivered: {exc}", error_type=type(exc).__name__)
        _redeliver(exc)
    except Exception as exc:
        outcome = "failed"
        clog.error(f"unexpected failure, will be redelivered: {exc}", exc_info=True)
        raise
    finally:
        clog.debug("event handled", outcome=outcome, cpu_ms=round((time.thread_time() - cpu) * 1000, 2),
                   wall_ms=round((time.perf_counter() - wall) * 1000, 2))


def _redeliver(exc: Exception) -> None:
    """Answer 503: Pub/Sub push and Eventarc deliver the event again, and Flask logs no traceback for it."""
    from werkzeug.exceptions import ServiceUnavailable  # the functions' web stack; the jobs do not have it

    raise ServiceUnavailable(description=str(exc)) from exc


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
    except RecursionError:  # nesting deeper than the parser goes, within the size limit: still just bad input
        raise BadRequest("request is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request must be a JSON object, got {type(body).__name__}")
    unknown = set(body) - REQUEST_FIELDS
    if unknown:
        raise BadRequest(f"unknown request fields {sorted(unknown)[:5]}; allowed: {sorted(REQUEST_FIELDS)}")
    for flag in ("force", "accept_drift"):
        if flag in body and not isinstance(body[flag], bool):
            raise BadRequest(f"'{flag}' must be true or false")
    return body


def start_run(s: Settings, pair: str, run_id: str, origin: dict[str, Any], force: bool = False,
              accept_drift: bool = False) -> claims.Outcome:
    """Start run `run_id` of `pair` once (runs.register, which an extract started by hand calls too). While the
    pair's latest run is another, active one, the request is acknowledged as "already running" unless `force`."""
    rlog = log.bind(pair=pair, run_id=run_id, stage="extract")
    try:
        outcome = runs.register(s, pair, run_id, lambda: run_job(s, s.extract_job, [pair], {"BQX_RUN_ID": run_id}),
                                origin, force=force, accept_drift=accept_drift)
    except AlreadyRunning as busy:
        rlog.info("already running: request acknowledged, no new run (send force: true to start one anyway)",
                  active_run_id=busy.run_id, execution=busy.execution, **origin)
        return claims.Outcome(False, busy.execution)
    except LaunchRefused as exc:  # Cloud Run said no (a 4xx): retrying cannot help; the run has failed
        runs.record_failure(s, pair, run_id, "trigger", str(exc), type(exc).__name__,
                            f"fix the cause, then: bqx run {pair}")
        raise
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
    return start_run(s, pair, run_id, origin, force=bool(body.get("force", False)),
                     accept_drift=bool(body.get("accept_drift", False)))


# ---------------------------------------------------------------- completion: checkpoints -> merge job


def completion(s: Settings, cloud_event: Any) -> claims.Outcome | None:
    """A checkpoint arrived (validate it: a bad one is set aside and reported) or the extract reported its end
    (sweep the run); when every manifest checkpoint is present and validated, start the merge once.

    Whether the run is complete is asked only on the event of an extract task's report, which each task writes
    after its last checkpoint: a checkpoint's event only validates that checkpoint (listing 668 objects on each of
    668 events made the handoff quadratic). The last task's report finds every checkpoint present; the sweep
    validates any whose own event has not been handled yet, and a failed launch is retried by the report's
    redelivery."""
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
        if not validate.arrival(s, manifest, ev.name, int(ev.generation), ev):
            # that generation is gone (overwritten, set aside, or re-stamped by a metadata patch on the emulator)
            rlog.debug("that checkpoint generation is gone", generation=ev.generation)
        return None  # the extract's report, written after its last checkpoint, is what asks for the merge
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
    try:
        outcome = claims.launch_once(
            s, layout.claim(pair, run_id, "merge"),
            lambda: run_job(s, s.merge_job, [pair], {"BQX_RUN_ID": run_id}),
            {"pair": pair, "run_id": run_id},
        )
    except LaunchRefused as exc:  # Cloud Run said no (a 4xx): record it, or `bqx status` would say "handoff" forever
        runs.record_failure(s, pair, run_id, "handoff", str(exc), type(exc).__name__,
                            f"fix the cause, then: bqx merge {pair} --run-id {run_id}")
        raise
    if outcome.launched:
        rlog.info("all checkpoints present: merge job started", checkpoints=len(expected),
                  execution=outcome.execution, took_over=outcome.took_over)
    return outcome
