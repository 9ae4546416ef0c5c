"""The merge stage: every method (stream, compose, polars, bigquery) side by side, the shared types and sizing, and
the one run that dispatches, verifies and publishes. Nothing here imports pyarrow at package import: the merge job
tunes Arrow's allocator (allocator.py) before pyarrow loads.

Public: `job` (the merge job's body, for jobs/merge/main.py), `publish` (merge_run: one run merged, verified and
published; METHODS and method(): the dispatch), `plan` (the methods' contract, MergeJob in and MergeStats out; the
inputs, local_inputs for `bqx merge --from`; the output schema; the sizing), `allocator` (configure, before pyarrow
loads), `stream` (the default method; merge for `bqx merge --from`), `compose` (aligned files laid end to end, for
`bqx merge --from`). Private: the other methods (`bigquery`, `polars`) and `stitch`.
"""

__all__ = ["allocator", "compose", "job", "plan", "publish", "stream"]
