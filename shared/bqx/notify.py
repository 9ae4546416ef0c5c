"""Run events: each run's end (done or failed) as one JSON message on the run events topic (bqx-run-events).

A run ends when runs/<pair>/<run>/done.json (the merge, after publishing: the run's summary) or error.json (any
stage's terminal failure) is finalized in the staging bucket; the completion function, which receives every staging
event, publishes the message. A failed run also logs one ERROR line with `event: "run_failed"`, which the log-based
metric counts. Delivery is at least once (a redelivered event publishes again): subscribers dedupe on the
`event_id` attribute, the same for every publication of one run's end.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bqx import ids, layout
from bqx.config import Settings
from bqx.errors import TransientError
from bqx.gcp import storage
from bqx.logs import Log

log = Log("bqx.notify")


def message(pair: str, run_id: str, state: str, record: dict[str, Any]) -> dict[str, Any]:
    """The run event's body: what ended, and its summary (done) or its error (failed)."""
    return {"event": f"run_{state}", "pair": pair, "run_id": run_id, "state": state,
            "summary": record if state == "done" else None, "error": record if state == "failed" else None,
            "at": time.time()}


def run_ended(s: Settings, pair: str, run_id: str, state: str) -> str | None:
    """Publish the end of the run whose done.json or error.json was just finalized; returns the message id (None:
    that record is gone). A publish that fails raises TransientError, so the event is delivered again."""
    name = layout.run_done(pair, run_id) if state == "done" else layout.run_error(pair, run_id)
    found = storage.read_json(s, s.staging_bucket, name)
    if found is None:
        return None
    record = found[0]
    rlog = log.bind(pair=pair, run_id=run_id)
    if state == "failed":
        rlog.error(f"run failed in {record.get('stage')}: {record.get('error')}", event="run_failed",
                   error_stage=record.get("stage"), error_type=record.get("error_type"), retry=record.get("retry"))
    from bqx.gcp.clients import publish

    body = json.dumps(message(pair, run_id, state, record), sort_keys=True, default=str).encode()
    try:
        message_id = publish(s, s.run_events_topic, body, event=f"run_{state}", pair=pair, run_id=run_id,
                             state=state, event_id=ids.digest("run-end", pair, run_id, state))
    except Exception as exc:  # noqa: BLE001 - the emulator or Pub/Sub away: the event comes back
        raise TransientError(f"publishing the end of run {run_id} to {s.run_events_topic}: {exc}") from exc
    rlog.info("run event published", state=state, message_id=message_id, topic=s.run_events_topic)
    return message_id


def subscribe(s: Settings, subscription: str) -> Any:
    """A subscriber client, with `subscription` created on the run events topic if absent (it receives the events
    published from then on)."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    from bqx.gcp.clients import _credentials

    sub = pubsub_v1.SubscriberClient(credentials=_credentials(s))
    try:
        sub.create_subscription(request={"name": sub.subscription_path(s.project, subscription),
                                         "topic": f"projects/{s.project}/topics/{s.run_events_topic}",
                                         "ack_deadline_seconds": 30})
    except AlreadyExists:
        pass
    return sub


def follow(s: Settings, subscription: str, on_message: Any, max_messages: int = 0, timeout: float = 0.0) -> int:
    """Pull run events from `subscription` (created on the run events topic if absent), calling on_message(dict)
    for each and acknowledging it; stops after `max_messages` (0: never) or `timeout` seconds without one (0: never).
    Returns how many were received."""
    from google.api_core.exceptions import DeadlineExceeded

    sub = subscribe(s, subscription)
    path = sub.subscription_path(s.project, subscription)
    got, idle_since = 0, time.time()
    try:
        while not max_messages or got < max_messages:
            try:
                want = min(10, max_messages - got) if max_messages else 10
                resp = sub.pull(request={"subscription": path, "max_messages": want}, timeout=10)
            except DeadlineExceeded:
                resp = None
            received = list(resp.received_messages) if resp is not None else []
            for m in received:
                on_message(json.loads(m.message.data))
                got += 1
            if received:
                sub.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in received]})
                idle_since = time.time()
            elif timeout and time.time() - idle_since > timeout:
                break
    finally:
        sub.close()
    return got
