"""Exactly-once job launches on GCS preconditions.

1. create the claim object with if_generation_match=0: the one writer that succeeds owns the launch;
2. the owner launches the job, then records the execution in the claim (if_generation_match=<its gen>);
   If the launch fails, the owner deletes its claim (generation precondition) and raises for redelivery.
3. anyone else reading the claim: execution recorded -> nothing to do; claim fresh -> ClaimHeld (raise, so
   the event comes back later); claim older than the lease with no execution -> its owner died between
   claiming and launching: take it over with a generation precondition, so exactly one taker launches.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from bqx import storage
from bqx.config import Settings
from bqx.errors import ClaimHeld
from bqx.logs import Log

log = Log("bqx.claims")


@dataclass(frozen=True)
class Outcome:
    launched: bool
    execution: str | None
    took_over: bool = False


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def launch_once(
    settings: Settings,
    name: str,
    launch: Callable[[], str],
    context: dict[str, object],
    on_claimed: Callable[[], None] | None = None,
) -> Outcome:
    """Run `launch` (which returns an execution name) at most once per claim object `name`."""
    bucket = settings.staging_bucket
    body = {"owner": _owner(), "claimed_at": time.time(), "execution": None, **context}
    generation = storage.create_json(settings, bucket, name, body)
    took_over = False
    if generation is None:
        current = storage.read_json(settings, bucket, name)
        if current is None:
            raise ClaimHeld(f"claim {name} vanished while being read")
        state, current_gen = current
        if state.get("execution"):
            return Outcome(False, state["execution"])
        age = time.time() - float(state.get("claimed_at") or 0)
        if age < settings.claim_lease_seconds:
            raise ClaimHeld(f"claim {name} held by {state.get('owner')} for {age:.1f}s, launch not yet recorded")
        body = {**body, "took_over_from": state}
        generation = storage.replace_json(settings, bucket, name, body, current_gen)
        if generation is None:
            raise ClaimHeld(f"claim {name} was taken over by another instance")
        took_over = True
        log.warning("took over a stale claim", claim=name, age_seconds=round(age, 1), **context)
    if on_claimed is not None:
        on_claimed()  # test hook point: an instance may die right here
    try:
        execution = launch()
    except BaseException:
        # Give the claim back so a redelivery can try at once; if this fails too, the lease frees it.
        try:
            storage.delete_if_generation(settings, bucket, name, generation)
        except storage.TRANSIENT as exc:
            log.warning("could not release the claim; it frees itself after the lease", claim=name, error=str(exc))
        raise
    recorded = storage.replace_json(
        settings, bucket, name, {**body, "execution": execution, "launched_at": time.time()}, generation
    )
    if recorded is None:
        log.error("claim changed under us after launching; another launch may follow", claim=name, **context)
    return Outcome(True, execution, took_over)
