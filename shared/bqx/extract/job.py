"""Job 1 entrypoint: extract one pair's tables to checkpoints (see bqx.extract.run).

Launched by the trigger (BQX_RUN_ID set, the run's extract claim recording this execution) it just extracts.
Started by hand (`gcloud run jobs execute bqx-ml-extract --args=eurusd[,--force]`) its run id comes from the
execution, and it first registers the run exactly as the trigger does (bqx.runs.register: latest.json swapped with
a generation precondition, the extract claim recording this execution), so `bqx status`, the "already running" rule
and the completion function see it. While the pair has another active run it refuses (exit 2) unless `--force`.
Outside Cloud Run (no CLOUD_RUN_EXECUTION: tests, resuming a run by hand with BQX_RUN_ID) nothing is registered.
"""

from __future__ import annotations

import sys
import time

from bqx import layout, runs
from bqx.errors import AlreadyRunning, Refused, TransientError
from bqx.extract import run as extract
from bqx.gcp import storage
from bqx.job import JobContext, claim_start, run_main

POLL_SECONDS = 0.5


def register(ctx: JobContext) -> bool:
    """Make sure the run is registered with this execution as its extract (see the module docstring). False: a
    duplicate launch by the trigger (the run's claim records another execution): nothing to do."""
    if not ctx.execution:
        return True
    s = ctx.settings
    claim_name = layout.claim(ctx.pair, ctx.run_id, "extract")
    # A claim not recorded yet is being launched (by the trigger for this very execution, or by a sibling task);
    # past the lease, runs.register takes it over. Waiting a little longer than that covers both.
    deadline = time.time() + s.claim_lease_seconds + 5
    while True:
        found = storage.read_json(s, s.staging_bucket, claim_name)
        holder = found[0].get("execution") if found else None
        if holder:
            if ctx.owns(holder):
                return True  # the trigger, another task or an earlier attempt of this execution registered it
            if ctx.force:
                ctx.log.warning("forced: extracting a run whose extract another execution owns", owner=holder)
                return True
            if ctx.launched_for:
                ctx.log.warning("another execution owns this run's extract; exiting", owner=holder)
                return False
            raise Refused(f"run {ctx.run_id} of {ctx.pair} is extracted by execution {holder}, not this one; "
                          f"to extract it anyway: {ctx.gcloud(ctx.pair, '--force')}")
        try:
            outcome = runs.register(s, ctx.pair, ctx.run_id, lambda: ctx.execution_name,
                                    {"origin": "execution", "execution": ctx.execution_name}, force=ctx.force)
        except AlreadyRunning as busy:
            again = storage.read_json(s, s.staging_bucket, claim_name)
            if again and ctx.owns(again[0].get("execution")):
                return True  # another task of this execution registered the run meanwhile
            raise Refused(f"{busy}: not starting another; to start one anyway: "
                          f"{ctx.gcloud(ctx.pair, '--force')}") from None
        except TransientError as exc:  # a claim being launched, or another run swapped the pointer first
            if time.time() > deadline:
                raise
            ctx.log.debug(f"registering the run: {exc}; trying again")
            time.sleep(POLL_SECONDS)
            continue
        if outcome.launched:
            ctx.log.info("run registered as the pair's latest, with this execution as its extract",
                         execution=outcome.execution, took_over=outcome.took_over, force=ctx.force)
            return True
        # the claim was recorded meanwhile: look at it again


def body(ctx: JobContext) -> None:
    # register: the run's launch claim (an execution it records that is not this one: exit); claim_start: of two
    # launches for one run in the launch window (neither recorded yet), the first to start extracts
    if register(ctx) and claim_start(ctx, "extract"):
        extract.run(ctx.settings, ctx.pair, ctx.run_id, ctx.task_index, ctx.task_count)


def main(argv: list[str] | None = None) -> int:
    return run_main("extract", body, argv)


if __name__ == "__main__":
    sys.exit(main())
