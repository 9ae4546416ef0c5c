"""Job 2 entrypoint: merge one run's checkpoints into training_<pair>.parquet (see bqx.publish)."""

from __future__ import annotations

import sys

from bqx import layout, storage
from bqx.catalog import Manifest
from bqx.errors import BadCheckpoint
from bqx.jobs.common import JobContext, run_main
from bqx.publish import merge_run


def body(ctx: JobContext) -> None:
    s = ctx.settings
    claim = storage.read_json(s, s.staging_bucket, layout.claim(ctx.pair, ctx.run_id, "merge"))
    recorded = (claim[0].get("execution") or "") if claim else ""
    if ctx.execution and recorded and not recorded.endswith("/" + ctx.execution):
        ctx.log.warning("another execution owns this run's merge; exiting", owner=recorded)
        return
    found = storage.read_json(s, s.staging_bucket, layout.manifest(ctx.pair, ctx.run_id))
    if found is None:
        raise BadCheckpoint(f"run {ctx.run_id} of {ctx.pair} has no manifest")
    merge_run(s, Manifest.from_json(found[0]), s.merge_method, ctx.execution)


def main(argv: list[str] | None = None) -> int:
    return run_main("merge", body, argv)


if __name__ == "__main__":
    sys.exit(main())
