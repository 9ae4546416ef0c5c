"""The local stand-in for Eventarc's delivery: Pub/Sub messages pushed to the functions concurrently.

The Pub/Sub emulator's own push subscriptions deliver at most two messages at a time, so 668 checkpoint events
queued behind each other and the handoff waited for the queue (45-110 s at the real shape). Eventarc, in the
cloud, delivers each event as its own HTTP request to as many instances as the function's max_instances allows.
This relay does the same for the local stack: it streaming-pulls each route's subscription (dead-letter policy
and all, as the stack created it) with up to `concurrency` messages outstanding, POSTs each one to the function
in Pub/Sub push format, acknowledges a 2xx and otherwise lets the message go back after a short backoff (a
redelivery, counted against the subscription's max delivery attempts, after which it is dead-lettered).

    python -m bqx.local.eventarc    # env: BQX_EVENTARC_ROUTES = JSON {subscription: endpoint}, PUBSUB_EMULATOR_HOST,
                                    # BQX_PORT_EVENTARC (a health port)
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from typing import Any

import requests

CONCURRENCY = 16  # per route: what one local function process serves at once (functions-framework THREADS)
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)

_local = threading.local()


def push_body(message: Any, subscription: str) -> dict[str, Any]:
    """The JSON body Pub/Sub push (and Eventarc's Pub/Sub transport) POSTs."""
    published = message.publish_time
    return {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "publishTime": published.isoformat().replace("+00:00", "Z") if published else None,
        },
        "subscription": subscription,
        "deliveryAttempt": message.delivery_attempt,
    }


def deliver(endpoint: str, subscription: str, message: Any) -> None:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    try:
        reply = session.post(endpoint, json=push_body(message, subscription), timeout=600)
        ok = 200 <= reply.status_code < 300
    except requests.RequestException:
        _local.session = None
        ok = False
    if ok:
        message.ack()
        return
    attempt = message.delivery_attempt or 1
    time.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1])
    message.nack()


def subscribe(subscriber: Any, subscription: str, endpoint: str, concurrency: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    from google.cloud import pubsub_v1

    return subscriber.subscribe(
        subscription, callback=lambda m: deliver(endpoint, subscription, m),
        flow_control=pubsub_v1.types.FlowControl(max_messages=concurrency),
        scheduler=pubsub_v1.subscriber.scheduler.ThreadScheduler(executor=ThreadPoolExecutor(concurrency)))


def serve(routes: dict[str, str], concurrency: int = CONCURRENCY, stop: threading.Event | None = None) -> None:
    """Deliver every route until `stop`; a streaming pull that ends (the emulator restarted, a subscription not
    there yet) is opened again a second later."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1

    stop = stop or threading.Event()
    subscriber = pubsub_v1.SubscriberClient(credentials=AnonymousCredentials())
    pulls: dict[str, Any] = {}
    while not stop.is_set():
        for subscription, endpoint in routes.items():
            pull = pulls.get(subscription)
            if pull is None or pull.done():
                if pull is not None:
                    print(json.dumps({"severity": "WARNING", "message": "streaming pull ended; reopening",
                                      "subscription": subscription, "error": str(pull.exception())[:300]}),
                          flush=True)
                pulls[subscription] = subscribe(subscriber, subscription, endpoint, concurrency)
        stop.wait(1.0)
    for pull in pulls.values():
        pull.cancel()


def health(port: int) -> None:
    """A port that answers while the relay runs (the stack's liveness check)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> None:
    from bqx.config import Settings

    s = Settings.from_env()
    routes = json.loads(s.eventarc_routes)
    print(json.dumps({"severity": "INFO", "message": "local Eventarc delivering", "routes": routes,
                      "concurrency": CONCURRENCY}), flush=True)
    health(s.ports.eventarc)
    try:
        serve(routes)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
