"""The merge stage: every method (stream, polars, bigquery) side by side, the shared types and sizing, and
the one run that dispatches, verifies and publishes. Nothing here imports pyarrow at package import: the merge job
tunes Arrow's allocator (allocator.py) before pyarrow loads."""
