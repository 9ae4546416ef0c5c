"""Bounded concurrency: at most `max_active_extracts` extracts run at once, across pairs; other requests wait.

A request is queued as queue/requests/<pair>/<run_id>.json (create-once: a duplicate delivery queues nothing new),
then the queue is drained: oldest first, each request takes a free slot queue/slots/<n>.json (n < the setting) and
only then starts its run. A slot is an object that is never deleted: taking it or freeing it replaces it under the
generation the drain read (created with if_generation_match=0 the first time), so two drains never hand out the same
slot. (A precondition on a delete would do, but fake-gcs-server ignores those.) A slot is held while the extract
execution of its run is running (asked of the Cloud Run API), or, before the execution is recorded, for the claim
lease; then any drain marks it free and gives it to the next request. The trigger drains
on each request, on each extract report and error.json (an extract's end), and `bqx status` drains too, so a slot
freed while nobody was asking is still handed on. See docs/EXACTLY-ONCE.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bqx import layout
from bqx.config import Settings
from bqx.errors import TerminalError, TransientError
from bqx.gcp import claims, storage
from bqx.gcp.clients import TRANSIENT_ERRORS, storage_client
from bqx.logs import Log

log = Log("bqx.schedule")
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Queued:
    """A request waiting for a slot, oldest first by when it was queued."""

    pair: str
    run_id: str
    name: str
    queued_at: float


@dataclass
class Drained:
    """What one drain did: runs started (run id -> outcome), failures of starting (run id -> error)."""

    started: dict[str, claims.Outcome] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    active: int = 0
    waiting: int = 0


def enqueue(s: Settings, pair: str, run_id: str, body: dict[str, Any]) -> bool:
    """Queue the request; False when it is already queued or its run already started (a duplicate delivery)."""
    if storage.exists(s, s.staging_bucket, layout.claim(pair, run_id, "extract")):
        return False
    entry = {"pair": pair, "run_id": run_id, "queued_at": time.time(), **body}
    return storage.create_json(s, s.staging_bucket, layout.queued(pair, run_id), entry) is not None


def waiting(s: Settings, pair: str | None = None) -> list[Queued]:
    """Queued requests (of `pair`, or all), oldest first."""
    out = []
    for b in storage_client(s).list_blobs(s.staging_bucket, prefix=layout.queued_prefix(pair)):
        parsed = layout.parse_queued(b.name)
        if parsed:
            out.append(Queued(*parsed, b.name, b.time_created.timestamp() if b.time_created else 0.0))
    return sorted(out, key=lambda q: (q.queued_at, q.name))


def slot_objects(s: Settings) -> dict[int, tuple[dict[str, Any], int]]:
    """Every slot object, held or free: index -> (body, generation)."""
    out = {}
    for b in storage_client(s).list_blobs(s.staging_bucket, prefix=layout.QUEUE_SLOTS):
        index = layout.parse_slot(b.name)
        if index is None:
            continue
        found = storage.read_json(s, s.staging_bucket, b.name)
        if found is not None:
            out[index] = found
    return out


def slots(s: Settings) -> dict[int, tuple[dict[str, Any], int]]:
    """Held slots: index -> (body, generation)."""
    return {i: found for i, found in slot_objects(s).items() if not found[0].get("free")}


def _swap(s: Settings, index: int, body: dict[str, Any], generation: int) -> int | None:
    """Replace slot `index` if it is still at `generation` (0: absent); its new generation, or None."""
    name = layout.slot(index)
    if generation == 0:
        return storage.create_json(s, s.staging_bucket, name, body)
    return storage.replace_json(s, s.staging_bucket, name, body, generation)


def execution_running(s: Settings, execution: str) -> bool:
    """Whether a Cloud Run execution (full resource name) has not completed yet. Unknown to Cloud Run: not running."""
    from google.api_core import exceptions as gexc

    from bqx.gcp.clients import executions_client

    try:
        ex = executions_client(s).get_execution(name=execution, timeout=30)
    except gexc.NotFound:
        return False
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"asking Cloud Run about {execution}: {exc}") from exc
    return not ex.completion_time


def slot_held(s: Settings, body: dict[str, Any], wait: float = 0.0) -> bool:
    """Whether the slot's run still holds it: its extract execution runs, or is being launched (within the claim
    lease). `wait`: seconds to wait for a running execution to complete (its report is its last write)."""
    pair, run_id = str(body.get("pair")), str(body.get("run_id"))
    try:
        found = storage.read_json(s, s.staging_bucket, layout.claim(pair, run_id, "extract"))
    except TerminalError:
        return False  # a slot naming something outside the layout: not ours to keep
    execution = (found[0].get("execution") or "") if found else ""
    if not execution:
        return time.time() - float(body.get("claimed_at") or 0) < s.claim_lease_seconds + 30
    if not execution.startswith("projects/"):
        return False  # an extract started by hand, which no slot bounds
    deadline = time.time() + wait
    while execution_running(s, execution):
        if time.time() >= deadline:
            return True
        time.sleep(POLL_SECONDS)
    return False


def drain(s: Settings, start: Callable[[dict[str, Any]], claims.Outcome],
          wait_for: tuple[str, str] | None = None, wait: float = 20.0) -> Drained:
    """Free the slots whose extracts ended, then start queued requests while slots are free, oldest first.
    `start(entry)` starts one queued request's run (the trigger's start_run). `wait_for`: (pair, run_id) of an
    extract that just reported its end: its slot is waited for up to `wait` seconds (the execution exits just after
    the report); still running then, TransientError (the event comes back later and drains again)."""
    objects = slot_objects(s)
    # index -> generation of each slot a request may take (0: never created)
    free = {i: 0 for i in range(s.max_active_extracts) if i not in objects}
    free.update({i: g for i, (body, g) in objects.items() if body.get("free") and i < s.max_active_extracts})
    for index, (body, generation) in sorted(objects.items()):
        if body.get("free"):
            continue
        mine = wait_for is not None and (body.get("pair"), body.get("run_id")) == wait_for
        if slot_held(s, body, wait if mine else 0.0):
            if mine:
                raise TransientError(f"extract of run {wait_for[1]} reported its end but its execution still runs; "
                                     "its slot is freed when it completes")
            continue
        freed = _swap(s, index, {"free": True, "freed_at": time.time()}, generation)
        if freed is not None:
            log.info("extract slot freed", slot=index, pair=body.get("pair"), run_id=body.get("run_id"))
            if index < s.max_active_extracts:
                free[index] = freed
    out = Drained(active=s.max_active_extracts - len(free))
    queue = waiting(s)
    for entry in queue:
        if not free:
            break
        if storage.exists(s, s.staging_bucket, layout.claim(entry.pair, entry.run_id, "extract")):
            _dequeue(s, entry)  # started already (a drain that stopped before dequeuing, or a duplicate)
            continue
        index, generation = _take_slot(s, free, entry)
        if index is None:
            break  # every free slot was taken by a concurrent drain
        found = storage.read_json(s, s.staging_bucket, entry.name)
        if found is None:  # started and dequeued by a concurrent drain
            _give_back(s, free, index, generation)
            continue
        try:
            outcome = start(found[0])
        except TerminalError as exc:  # refused (recorded by start): the request is done with
            _give_back(s, free, index, generation)
            _dequeue(s, entry)
            out.errors[entry.run_id] = exc
            continue
        except BaseException:
            _give_back(s, free, index, generation)
            raise  # transient: the request stays queued; the redelivered event drains again
        if not outcome.launched:  # already running, or a duplicate: it holds no slot of this drain
            _give_back(s, free, index, generation)
        else:
            out.active += 1
        out.started[entry.run_id] = outcome
        _dequeue(s, entry)
    out.waiting = len(queue) - len(out.started) - len(out.errors)
    return out


def _take_slot(s: Settings, free: dict[int, int], entry: Queued) -> tuple[int | None, int]:
    """Take one of the free slots for `entry` (a concurrent drain may take any of them first)."""
    body = {"pair": entry.pair, "run_id": entry.run_id, "claimed_at": time.time()}
    for index in sorted(free):
        generation = _swap(s, index, body, free.pop(index))
        if generation is not None:
            return index, generation
    return None, 0


def _give_back(s: Settings, free: dict[int, int], index: int, generation: int) -> None:
    freed = _swap(s, index, {"free": True, "freed_at": time.time()}, generation)
    if freed is not None:
        free[index] = freed


def _dequeue(s: Settings, entry: Queued) -> None:
    try:
        storage.bucket(s, s.staging_bucket).blob(entry.name).delete()
    except Exception as exc:  # noqa: BLE001 - a request already dequeued; a leftover is dequeued by the next drain
        log.debug(f"dequeue {entry.name}: {exc}")
