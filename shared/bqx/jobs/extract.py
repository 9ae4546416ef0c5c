"""Job 1 entrypoint: extract one pair's tables to checkpoints (see bqx.extract)."""

from __future__ import annotations

import sys

from bqx import extract
from bqx.jobs.common import JobContext, run_main


def body(ctx: JobContext) -> None:
    extract.run(ctx.settings, ctx.pair, ctx.run_id, ctx.task_index, ctx.task_count)


def main(argv: list[str] | None = None) -> int:
    return run_main("extract", body, argv)


if __name__ == "__main__":
    sys.exit(main())
