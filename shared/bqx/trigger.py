"""The trigger stage: a request (an object requests/<pair>.json, or a Pub/Sub message) starts a pair's extract."""

from __future__ import annotations

import json
from typing import Any

from google.api_core import exceptions as gexc

from bqx import events, ids, layout, runs, schedule
from bqx.config import Settings
from bqx.errors import AlreadyRunning, BadRequest, LaunchRefused, TransientError
from bqx.gcp import claims, storage
from bqx.gcp.launch import run_job
from bqx.logs import Log
from bqx.pairs import validate_pair

MAX_REQUEST_BYTES = 64 * 1024
MAX_REQUEST_DEPTH = 16  # a request is an object of strings, booleans and one list of pairs: two levels
REQUEST_FIELDS = {"pair", "pairs", "origin", "force", "accept_drift", "requested_by", "note"}

log = Log("bqx.functions")


def _nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_REQUEST_DEPTH:
        return 0  # cannot be deeper than this many openings
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_REQUEST_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_request_body(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request body is {len(raw)} bytes; at most {MAX_REQUEST_BYTES} allowed")
    try:
        if not raw.strip():
            raise BadRequest('request is empty; write a JSON object such as {"pair": "eurusd"}')
        text = raw.decode("utf-8")
        # Refused before parsing: json.loads of nesting near the interpreter's recursion limit raises RecursionError
        # at a depth that varies, and what it leaves behind was once reported as an unraisable exception.
        if _nesting(text) > MAX_REQUEST_DEPTH:
            raise BadRequest("request is nested too deeply to be a request")
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    except RecursionError:  # a backstop: the depth check above makes this unreachable for valid UTF-8
        raise BadRequest("request is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request must be a JSON object, got {type(body).__name__}")
    unknown = set(body) - REQUEST_FIELDS
    if unknown:
        raise BadRequest(f"unknown request fields {sorted(unknown)[:5]}; allowed: {sorted(REQUEST_FIELDS)}")
    for flag in ("force", "accept_drift"):
        if flag in body and not isinstance(body[flag], bool):
            raise BadRequest(f"'{flag}' must be true or false")
    if "origin" in body and not (isinstance(body["origin"], str) and 0 < len(body["origin"]) <= 64):
        raise BadRequest("'origin' must be a short string, such as \"schedule\"")
    if "pairs" in body:
        pairs = body["pairs"]
        if "pair" in body:
            raise BadRequest("a request names either 'pair' or 'pairs', not both")
        if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
            raise BadRequest('\'pairs\' must be a non-empty list of pair names, such as ["eurusd", "gbpusd"]')
        if len(set(pairs)) != len(pairs):
            raise BadRequest("'pairs' names a pair more than once")
        body["pairs"] = [validate_pair(p) for p in pairs]
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


def start_queued(s: Settings, entry: dict[str, Any]) -> claims.Outcome:
    """Start a request the queue hands a slot (bqx.schedule.drain)."""
    origin = {k: v for k, v in (entry.get("origin") or {}).items() if isinstance(k, str)}
    return start_run(s, str(entry["pair"]), str(entry["run_id"]), origin, force=bool(entry.get("force")),
                     accept_drift=bool(entry.get("accept_drift")))


def drain(s: Settings, wait_for: tuple[str, str] | None = None) -> schedule.Drained:
    """Hand free extract slots to queued requests (bqx.schedule): the trigger's, and `bqx status`'s sweep."""
    return schedule.drain(s, lambda entry: start_queued(s, entry), wait_for)


def request(s: Settings, pairs: list[str], run_ids: list[str], origin: dict[str, Any],
            body: dict[str, Any]) -> claims.Outcome | None:
    """Queue each pair's run, then drain: each starts now if a slot is free, else when one frees. Returns the
    outcome of the first pair's run if it started (or was refused as already running) in this drain."""
    options = {"force": bool(body.get("force", False)), "accept_drift": bool(body.get("accept_drift", False))}
    for pair, run_id in zip(pairs, run_ids, strict=True):
        if schedule.enqueue(s, pair, run_id, {"origin": origin, **options}):
            log.info("request queued", pair=pair, run_id=run_id, **origin)
    drained = drain(s)
    mine = drained.errors.get(run_ids[0])
    if mine is not None:
        raise mine
    if drained.waiting:
        log.info("extract slots all busy: requests wait their turn", active=drained.active,
                 waiting=drained.waiting, max_active_extracts=s.max_active_extracts)
    return drained.started.get(run_ids[0], claims.Outcome(False, None))


def handle(s: Settings, cloud_event: Any) -> claims.Outcome | None:
    ev = events.parse(cloud_event)
    if isinstance(ev, events.ObjectEvent):
        if ev.bucket == s.staging_bucket and ev.kind == "finalize" and not ev.name.startswith(layout.REQUESTS):
            ended = layout.parse_extract_report(ev.name)
            failed = layout.parse_run_end(ev.name)
            if ended is not None or (failed is not None and failed[2] == "failed"):
                drain(s, wait_for=ended)  # an extract's end: its slot goes to the next queued request
            return None
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
        if "pairs" in body:
            raise BadRequest(f"request {ev.name} is for {pair}; a list of pairs goes in a message to the requests "
                             "topic")
        run_id = ids.run_id_for_object(ev.bucket, ev.name, ev.generation)
        return request(s, [pair], [run_id], {"origin": "object", "object": ev.key}, body)
    body = parse_request_body(ev.data)
    origin = {"origin": str(body.get("origin") or "message"), "message_id": ev.message_id}
    if "pairs" in body:
        pairs = body["pairs"]
        return request(s, pairs, [ids.run_id_for_pair_message(ev.message_id, p) for p in pairs], origin, body)
    if "pair" not in body:
        raise BadRequest('message must carry {"pair": "<pair>"} or {"pairs": ["<pair>", ...]}')
    pair = validate_pair(body["pair"])
    return request(s, [pair], [ids.run_id_for_message(ev.message_id)], origin, body)
