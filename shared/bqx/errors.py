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
    """A request object or message that cannot be understood."""


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
    """The Cloud Run Admin API refused or timed out; the event should be redelivered."""
