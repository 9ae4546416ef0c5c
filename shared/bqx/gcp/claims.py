"""Exactly-once job launches on GCS preconditions.

1. create the claim object with if_generation_match=0: the one writer that succeeds owns the launch;
2. the owner launches the job, then records the execution in the claim (if_generation_match=<its gen>);
   If the launch fails, the owner deletes its claim (generation precondition) and raises for redelivery.
3. anyone else reading the claim: execution recorded -> nothing to do; claim fresh -> ClaimHeld (raise, so
   the event comes back later); claim older than the lease with no execution -> its owner died between
   claiming and launching: take it over with a generation precondition, so exactly one taker launches.
   While launching, a live owner renews the claim every lease/3 (`renewed_at`), so a slow launch is never
   mistaken for a dead owner; the age that counts is since the last renewal.

A job started by hand (`gcloud run jobs execute`) is its own launch: `claim_own` creates the claim recording its own
execution at once, and never takes a claim held by another execution unless forced.

Fault injection (tests, scripts/chaos.py): with BQX_FAILPOINT_AFTER_CLAIM=<dir> (Settings.failpoint_after_claim),
each claim won takes one token file from <dir> if there is one; a token named `exit-*` ends the process on the spot
(os._exit: no cleanup, no reply, like a killed instance), any other token raises InjectedCrash (the claim is left
unrecorded). Unset (as in production), it costs nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bqx.config import Settings
from bqx.errors import ClaimHeld
from bqx.gcp import storage
from bqx.logs import Log

log = Log("bqx.gcp.claims")


class InjectedCrash(RuntimeError):
    """Raised by the after-claim failpoint: an instance 'dying' between claiming and launching."""


@dataclass(frozen=True)
class Outcome:
    launched: bool
    execution: str | None
    took_over: bool = False


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def failpoint_after_claim(settings: Settings, name: str) -> None:
    """See the module docstring: consume one token from settings.failpoint_after_claim and crash as it says."""
    directory = settings.failpoint_after_claim
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


class _Renewal:
    """Keeps a won claim fresh while its owner is alive: every lease/3 it rewrites `renewed_at` with a generation
    precondition. Only a claim whose owner stopped renewing (died) ever looks stale, however slow a launch is."""

    def __init__(self, settings: Settings, name: str, body: dict[str, object], generation: int) -> None:
        self.settings, self.name, self.body, self.generation = settings, name, body, generation
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = settings.claim_lease_seconds / 3
        threading.Thread(target=self._run, name=f"renew {name}", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                if self._stop.is_set():
                    return
                body = {**self.body, "renewed_at": time.time()}
                try:
                    gen = storage.replace_json(self.settings, self.settings.staging_bucket, self.name, body,
                                               self.generation)
                except storage.TRANSIENT as exc:
                    log.warning("could not renew the claim; trying again", claim=self.name, error=str(exc))
                    continue
                if gen is None:
                    self.lost = True
                    log.error("claim taken over while its owner was alive (stalled longer than the lease)",
                              claim=self.name)
                    return
                self.body, self.generation = body, gen

    def stop(self) -> int:
        """Stop renewing (waits for a renewal in flight); returns the claim's current generation."""
        self._stop.set()
        with self._lock:
            return self.generation


def _age(state: dict[str, object]) -> float:
    return time.time() - max(float(state.get("claimed_at") or 0), float(state.get("renewed_at") or 0))


def launch_once(
    settings: Settings,
    name: str,
    launch: Callable[[], str],
    context: dict[str, object],
    on_claimed: Callable[[], None] | None = None,
) -> Outcome:
    """Run `launch` (which returns an execution name) at most once per claim object `name`."""
    bucket = settings.staging_bucket
    body: dict[str, object] = {"owner": _owner(), "claimed_at": time.time(), "execution": None, **context}
    generation = storage.create_json(settings, bucket, name, body)
    took_over = False
    if generation is None:
        current = storage.read_json(settings, bucket, name)
        if current is None:
            raise ClaimHeld(f"claim {name} vanished while being read")
        state, current_gen = current
        if state.get("execution"):
            return Outcome(False, state["execution"])
        age = _age(state)
        if age < settings.claim_lease_seconds:
            raise ClaimHeld(f"claim {name} held by {state.get('owner')} for {age:.1f}s, launch not yet recorded")
        body = {**body, "claimed_at": time.time(), "took_over_from": state}
        generation = storage.replace_json(settings, bucket, name, body, current_gen)
        if generation is None:
            raise ClaimHeld(f"claim {name} was taken over by another instance")
        took_over = True
        log.warning("took over a stale claim", claim=name, age_seconds=round(age, 1), **context)
    renewal = _Renewal(settings, name, body, generation)
    try:
        failpoint_after_claim(settings, name)  # an instance may die right here: tests make it
        if on_claimed is not None:
            on_claimed()
        if renewal.lost:
            raise ClaimHeld(f"claim {name} was taken over before the launch")
    except BaseException:
        renewal.stop()  # a crash leaves the claim behind, no longer renewed: it goes stale after the lease
        raise
    try:
        execution = launch()
    except BaseException:
        generation = renewal.stop()
        # Give the claim back so a redelivery can try at once; if this fails too, the lease frees it.
        try:
            storage.delete_if_generation(settings, bucket, name, generation)
        except storage.TRANSIENT as exc:
            log.warning("could not release the claim; it frees itself after the lease", claim=name, error=str(exc))
        raise
    generation = renewal.stop()
    recorded = storage.replace_json(
        settings, bucket, name, {**renewal.body, "execution": execution, "launched_at": time.time()}, generation
    )
    if recorded is None:
        log.error("claim changed under us after launching; another launch may follow", claim=name, **context)
    return Outcome(True, execution, took_over)


def claim_own(
    settings: Settings,
    name: str,
    execution: str,
    is_mine: Callable[[str], bool],
    context: dict[str, object],
    force: bool = False,
) -> Outcome:
    """For a job started by hand, which is its own launch: create claim `name` recording `execution` (create-once).
    Outcome(True, execution): this execution holds the claim (just created, already its own, or — with `force` —
    taken over from its holder with a generation precondition). Outcome(False, holder): another execution holds it
    (holder None: its launcher has not recorded the execution yet)."""
    bucket = settings.staging_bucket
    now = time.time()
    body: dict[str, object] = {"owner": _owner(), "claimed_at": now, "execution": execution, "launched_at": now,
                               "by_hand": True, **context}
    if storage.create_json(settings, bucket, name, body) is not None:
        return Outcome(True, execution)
    current = storage.read_json(settings, bucket, name)
    if current is None:
        raise ClaimHeld(f"claim {name} vanished while being read")
    state, generation = current
    holder = state.get("execution") or None
    if holder is not None and is_mine(str(holder)):
        return Outcome(True, execution)  # an earlier attempt (or another task) of this execution claimed it
    if not force:
        return Outcome(False, holder)
    if storage.replace_json(settings, bucket, name, {**body, "forced": True, "took_over_from": state},
                            generation) is None:
        raise ClaimHeld(f"claim {name} changed while being taken over")
    log.warning("forced: took the claim over from its holder", claim=name, holder=holder, **context)
    return Outcome(True, execution, took_over=True)
