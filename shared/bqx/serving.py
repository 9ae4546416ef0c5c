"""How a Cloud Function serves an event: settings once per instance, the retry contract, per-event cost.

A handler returns normally (acknowledged) or raises: terminal errors are logged and acknowledged, transient ones
are answered 503 and redelivered, anything else is a bug (500 with a traceback)."""

from __future__ import annotations

import functools
import time
from typing import Any

from bqx import logs
from bqx.config import Settings
from bqx.errors import BqxError, ClaimHeld, TerminalError, TransientError
from bqx.logs import Log

log = Log("bqx.functions")


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


def serve(component: str, handler: Any, cloud_event: Any) -> Any:
    """Run a handler with the retry contract: terminal -> log + ack (200); transient -> 503, so the event is
    redelivered, logged once without a traceback (a claim held by another instance is part of the protocol: INFO);
    unexpected -> raise (500 with the framework's traceback: a bug to look at). Each event's CPU and wall time are
    logged at DEBUG (benchmarks/handoff.py reads them)."""
    try:
        logs.setup(component, settings())
    except BqxError:  # an unreadable setting: logged as the event's rejection below
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
