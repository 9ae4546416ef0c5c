"""The trigger stage: a request (an object requests/<pair>.json, or a Pub/Sub message) starts a pair's extract."""

from __future__ import annotations

import json
from typing import Any

from google.api_core import exceptions as gexc

from bqx import events, ids, layout, runs
from bqx.config import Settings
from bqx.errors import AlreadyRunning, BadRequest, LaunchRefused, TransientError
from bqx.gcp import claims, storage
from bqx.gcp.launch import run_job
from bqx.logs import Log
from bqx.pairs import validate_pair

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_FIELDS = {"pair", "force", "accept_drift", "requested_by", "note"}

log = Log("bqx.functions")


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


def handle(s: Settings, cloud_event: Any) -> claims.Outcome | None:
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
