"""Deterministic ids: the same input always gives the same id, so retries land on the same run."""

from __future__ import annotations

import hashlib
import time


def digest(*parts: object, length: int = 16) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode())
    return h.hexdigest()[:length]


def run_id_for_object(bucket: str, name: str, generation: int | str) -> str:
    """Run started by a request object: one run per (bucket, name, generation)."""
    return f"r{digest('object', bucket, name, generation)}"


def run_id_for_message(message_id: str) -> str:
    """Run started by a Pub/Sub message: one run per message id."""
    return f"m{digest('message', message_id)}"


def run_id_for_pair_message(message_id: str, pair: str) -> str:
    """One of the runs a message naming several pairs starts: one run per (message id, pair)."""
    return f"m{digest('message', message_id, pair)}"


def run_id_for_execution(execution: str) -> str:
    """Run started directly (gcloud run jobs execute): every task of one execution shares it."""
    return f"x{digest('execution', execution)}"


def adhoc_run_id() -> str:
    return f"a{digest('adhoc', time.time_ns())}"
