"""What both job entrypoints share: settings, run id, task index, and the exit-code contract.

Exit 0: done, or a terminal failure that was logged and recorded (retrying cannot help).
Exit 1: a transient failure; Cloud Run retries the task, and the rerun resumes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bqx import ids, layout, logs, storage
from bqx.config import Settings
from bqx.errors import TerminalError
from bqx.logs import Log
from bqx.pairs import validate_pair


@dataclass(frozen=True)
class JobContext:
    settings: Settings
    pair: str
    run_id: str
    task_index: int
    task_count: int
    execution: str
    log: Log


def context(component: str, argv: list[str]) -> JobContext:
    logs.setup(component)
    settings = Settings.from_env()
    if len(argv) != 1:
        raise TerminalError(f"usage: {component} <pair>")
    pair = validate_pair(argv[0])
    execution = os.environ.get("CLOUD_RUN_EXECUTION", "")
    run_id = os.environ.get("BQX_RUN_ID") or (ids.run_id_for_execution(execution) if execution else "")
    if not run_id:
        run_id = ids.adhoc_run_id()
    layout.run_prefix(pair, run_id)  # validates the id
    return JobContext(
        settings, pair, run_id,
        int(os.environ.get("CLOUD_RUN_TASK_INDEX", "0")),
        int(os.environ.get("CLOUD_RUN_TASK_COUNT", "1")),
        execution,
        Log(f"bqx.{component}", pair=pair, run_id=run_id, stage=component),
    )


def run_main(component: str, body: Callable[[JobContext], None], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    ctx: JobContext | None = None
    try:
        ctx = context(component, argv)
        body(ctx)
        return 0
    except TerminalError as exc:
        log = ctx.log if ctx else Log(f"bqx.{component}")
        log.error(f"{component} failed permanently: {exc}", error_type=type(exc).__name__)
        if ctx is not None:
            record_error(ctx, component, exc, started)
        return 0
    except Exception as exc:  # noqa: BLE001 - anything else: let Cloud Run retry the task
        log = ctx.log if ctx else Log(f"bqx.{component}")
        attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0") or 0)
        final = ctx is not None and attempt >= ctx.settings.task_max_retries
        log.error(f"{component} failed{' on its last attempt' if final else ', task will be retried'}: {exc}",
                  exc_info=True, attempt=attempt)
        if final and ctx is not None:
            record_error(ctx, component, exc, started)
        return 1


def record_error(ctx: JobContext, stage: str, exc: BaseException, started: float) -> None:
    retry = f"bqx merge {ctx.pair} --run-id {ctx.run_id}" if stage == "merge" else f"bqx run {ctx.pair}"
    try:
        storage.write_json(ctx.settings, ctx.settings.staging_bucket, layout.run_error(ctx.pair, ctx.run_id), {
            "pair": ctx.pair, "run_id": ctx.run_id, "stage": stage, "error": str(exc),
            "error_type": type(exc).__name__, "table": getattr(exc, "table", None),
            "at": time.time(), "seconds": round(time.time() - started, 3), "retry": retry,
        })
    except Exception as write_exc:  # noqa: BLE001 - the log line above already carries the error
        ctx.log.error(f"could not record the error: {write_exc}")
