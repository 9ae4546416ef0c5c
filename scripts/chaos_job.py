#!/usr/bin/env python
"""The merge job as scripts/chaos.py's Run API runs it: the real start of a merge a function launched
(bqx.job.run_main, bqx.job.start_launched: the launch claim's record, then the run's start claim), and then, instead
of merging, one line that the harness counts: every run must have exactly one execution that gets this far."""

from __future__ import annotations

import sys

from bqx import job

WORKED = "chaos: this execution does the run's merge"


def body(ctx: job.JobContext) -> None:
    if job.start_launched(ctx, "merge"):
        print(WORKED, flush=True)


if __name__ == "__main__":
    sys.exit(job.run_main("merge", body))
