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

Time: a claim's age is the server's (storage.server_age: GCS's `Date` less the generation's `timeCreated`), never
the instances' clocks, which may be skewed; the owner's own view of its lease is its monotonic clock since its last
renewal that GCS accepted. A renewal that fails is logged (WARNING, then ERROR once the lease has passed without
one), and an owner that may have lost its claim (a renewal refused, or none accepted for a whole lease) stops before
launching (ClaimHeld). docs/EXACTLY-ONCE.md says what a GCS brownout or clock skew does.

Fault injection (tests, scripts/chaos.py): with BQX_FAILPOINT_AFTER_CLAIM=<dir> (Settings.failpoint_after_claim),
each claim won takes one token file from <dir> if there is one; a token named `exit-*` ends the process on the spot
(os._exit: no cleanup, no reply, like a killed instance), any other token raises InjectedCrash (the claim is left
unrecorded). BQX_FAILPOINT_AFTER_LAUNCH (Settings.failpoint_after_launch) does the same after Cloud Run accepted
`run_job` and before the execution is recorded (the launch window). Unset (as in production), they cost nothing.
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


def failpoint_after_claim(settings: Settings, name: str, launched: bool = False) -> None:
    """See the module docstring: consume one token from settings.failpoint_after_claim (after_launch if `launched`)
    and crash as it says."""
    directory = settings.failpoint_after_launch if launched else settings.failpoint_after_claim
    where = "launching" if launched else "claiming"
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
        log.warning(f"failpoint: crashing right after {where}", claim=name, token=token)
        if token.startswith("exit"):
            os._exit(137)
        raise InjectedCrash(f"failpoint {token} after {where} {name}")


class _Renewal:
    """Keeps a won claim fresh while its owner is alive: every lease/3 it rewrites `renewed_at` with a generation
    precondition. Only a claim whose owner stopped renewing (died) ever looks stale, however slow a launch is.
    `lost` turns true when the claim may no longer be ours: a renewal refused (412: taken over), or no renewal
    accepted for a whole lease (a GCS brownout: a taker may have judged it stale meanwhile)."""

    def __init__(self, settings: Settings, name: str, body: dict[str, object], generation: int) -> None:
        self.settings, self.name, self.body, self.generation = settings, name, body, generation
        self.taken = False
        self.last_ok = time.monotonic()  # our own clock's rate only: never compared with another clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lease = settings.claim_lease_seconds
        self._interval = self._lease / 3
        threading.Thread(target=self._run, name=f"renew {name}", daemon=True).start()

    @property
    def lost(self) -> bool:
        return self.taken or time.monotonic() - self.last_ok >= self._lease

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                if self._stop.is_set():
                    return
                body = {**self.body, "renewed_at": time.time()}
                try:
                    gen = storage.replace_json(self.settings, self.settings.staging_bucket, self.name, body,
                                               self.generation)
                except Exception as exc:  # noqa: BLE001 - any failure: try again, and say so
                    late = time.monotonic() - self.last_ok
                    (log.error if late >= self._lease else log.warning)(
                        "could not renew the claim"
                        + ("; the lease has passed without a renewal: it may be taken over, and this owner stops"
                           " before launching" if late >= self._lease else "; trying again"),
                        claim=self.name, error=f"{type(exc).__name__}: {exc}", seconds_since_renewal=round(late, 2))
                    continue
                if gen is None:
                    self.taken = True
                    log.error("claim taken over while its owner was alive (stalled longer than the lease)",
                              claim=self.name)
                    return
                self.body, self.generation, self.last_ok = body, gen, time.monotonic()

    def stop(self) -> int:
        """Stop renewing (waits for a renewal in flight); returns the claim's current generation."""
        self._stop.set()
        with self._lock:
            return self.generation


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
        current = storage.server_age(settings, bucket, name)
        if current is None:
            raise ClaimHeld(f"claim {name} vanished while being read")
        state, current_gen, age = current  # age: since its last write (claim or renewal), by GCS's clock
        if state.get("execution"):
            return Outcome(False, state["execution"])
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
    try:
        failpoint_after_claim(settings, name, launched=True)  # the launch window: tests make it
    except BaseException:
        renewal.stop()  # launched, not recorded, no longer renewed: a taker launches again after the lease
        raise
    generation = renewal.stop()
    if renewal.lost:
        log.error("the claim may have been taken over while launching; the job's start claim keeps a second "
                  "launch from working", claim=name, execution=execution, **context)
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
