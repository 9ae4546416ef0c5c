"""The completion stage: checkpoint inspection on arrival and the decision to launch the merge.

Public: `handler` (the completion function's handle), `validate` (arrival, complete, is_marked, blocking_error: what
the merge and bqx.runs ask about a run's checkpoints). Private: `inspect` (one checkpoint against its manifest entry,
used by validate).
"""

__all__ = ["handler", "validate"]
