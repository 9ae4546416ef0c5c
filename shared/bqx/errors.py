"""One family of exceptions. Terminal errors are acknowledged and reported; transient ones are retried."""

from __future__ import annotations


class BqxError(Exception):
    """Base class of every error bqx raises on purpose."""


class TerminalError(BqxError):
    """Retrying cannot help: bad input, a broken invariant. Log, record, acknowledge."""


class TransientError(BqxError):
    """May succeed later: a 5xx, a timeout, a claim held by someone else. Raise so work is redelivered."""


class ObjectGone(TransientError):
    """The object generation being read no longer exists (replaced or set aside since it was listed)."""


class ConfigError(TerminalError):
    """A setting is missing or malformed."""


class UnknownPair(TerminalError):
    def __init__(self, pair: object) -> None:
        from bqx.pairs import PAIRS

        super().__init__(f"unknown pair {pair!r}; valid pairs: {', '.join(PAIRS)}")
        self.pair = pair


class BadRequest(TerminalError):
    """A request object, message or job argument list that cannot be understood."""


class Refused(TerminalError):
    """A job started by hand was asked for what the exactly-once rules forbid (another active run of the pair, a
    merge already claimed or published, a run that is not complete). Logged, exit 2; never recorded in a run's
    error.json: the run it names is someone else's, or was never started."""


class AlreadyRunning(Refused):
    """The pair's latest run is another, active one (docs/EXACTLY-ONCE.md); the trigger acknowledges the request."""

    def __init__(self, pair: str, run_id: str, execution: str | None) -> None:
        super().__init__(f"{pair} already has an active run {run_id} (execution {execution or 'being launched'})")
        self.pair, self.run_id, self.execution = pair, run_id, execution


class OutsideLayout(TerminalError):
    """An object name that is not one bqx writes."""


class BadEvent(TerminalError):
    """A CloudEvent without the fields bqx needs."""


class DuplicateKeys(TerminalError):
    def __init__(self, table: str, key: object) -> None:
        super().__init__(f"table {table!r} has duplicate interval_time keys (first: {key})")
        self.table = table


class BadCheckpoint(TerminalError):
    """A checkpoint that does not match its manifest entry or cannot be read."""


class ClaimHeld(TransientError):
    """Another instance holds a fresh claim and has not recorded its launch yet."""


class LaunchFailed(TransientError):
    """The Cloud Run Admin API failed or timed out (5xx, network); the event should be redelivered."""


class LaunchRefused(TerminalError):
    """The Cloud Run Admin API refused the execution (a 4xx: permission, bad request, no such job): retrying the
    same call cannot help. The run is failed and the refusal recorded where `bqx status` shows it."""
