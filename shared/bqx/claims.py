"""Exactly-once job launches on GCS preconditions.

1. create the claim object with if_generation_match=0: the one writer that succeeds owns the launch;
2. the owner launches the job, then records the execution in the claim (if_generation_match=<its gen>);
   If the launch fails, the owner deletes its claim (generation precondition) and raises for redelivery.
3. anyone else reading the claim: execution recorded -> nothing to do; claim fresh -> ClaimHeld (raise, so
   the event comes back later); claim older than the lease with no execution -> its owner died between
   claiming and launching: take it over with a generation precondition, so exactly one taker launches.

Fault injection (tests, scripts/chaos.py): with BQX_FAILPOINT_AFTER_CLAIM=<dir>, each claim won takes one token
file from <dir> if there is one; a token named `exit-*` ends the process on the spot (os._exit: no cleanup, no
reply, like a killed instance), any other token raises InjectedCrash (the claim is left unrecorded). Unset (as in
production), it costs one environment lookup per claim.
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
FAILPOINT_ENV = "BQX_FAILPOINT_AFTER_CLAIM"


class InjectedCrash(RuntimeError):
    """Raised by the after-claim failpoint: an instance 'dying' between claiming and launching."""


@dataclass(frozen=True)
class Outcome:
    launched: bool
    execution: str | None
    took_over: bool = False


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def failpoint_after_claim(name: str) -> None:
    """See the module docstring: consume one token from $BQX_FAILPOINT_AFTER_CLAIM and crash as it says."""
    directory = os.environ.get(FAILPOINT_ENV)
    if not directory:
        return
    try:
        tokens = sorted(os.listdir(directory))
    except OSError:
        return
    for token in tokens:
        try:
            os.unlink(os.path.join(directory, token))  # atomic: exactly one instance gets each token
        except FileNotFoundError:
            continue
        log.warning("failpoint: crashing right after claiming", claim=name, token=token)
        if token.startswith("exit"):
            os._exit(137)
        raise InjectedCrash(f"failpoint {token} after claiming {name}")


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
    failpoint_after_claim(name)  # an instance may die right here: tests make it
    if on_claimed is not None:
        on_claimed()
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
