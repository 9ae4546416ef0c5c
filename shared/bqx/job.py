"""What both job entrypoints share: arguments, settings, the run a task works on, and the exit-code contract.

Arguments: `<pair> [--force]` (extract), `<pair> [<run_id>] [--force]` (merge); `gcloud run jobs execute JOB
--args=eurusd,--force` gives the container exactly those. The trigger and the completion function launch the jobs
with `<pair>` and BQX_RUN_ID; started by hand (no BQX_RUN_ID), the jobs apply the same exactly-once rules
themselves (see bqx.extract.job and bqx.merge.job).

Exit codes (Cloud Run marks an execution failed, and retries the task, on any non-zero exit):
  0  done; or nothing to do (a duplicate launch whose run another execution owns).
  1  transient failure (5xx, timeout, a claim held by someone else): the retried task resumes where this one
     stopped. The last attempt (CLOUD_RUN_TASK_ATTEMPT >= BQX_TASK_MAX_RETRIES) records it in error.json.
  2  terminal failure: retrying cannot help. A failure of this execution's run (bad data, a broken invariant) is
     logged and recorded in runs/<pair>/<run>/error.json with this execution and the command to retry; a retried
     attempt (CLOUD_RUN_TASK_ATTEMPT > 0) that finds the error its own execution recorded exits 2 at once, without
     redoing any work. A refusal (bad arguments; a start by hand that the rules forbid: another active run of the
     pair, a merge already claimed or published, no complete run) is only logged — the run it names is someone
     else's, or never started — and a retried attempt decides again from the buckets (a few small reads).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bqx import ids, layout, logs, runs
from bqx.config import Settings
from bqx.errors import BadRequest, Refused, TerminalError, TransientError
from bqx.gcp import storage
from bqx.logs import Log
from bqx.pairs import validate_pair

DONE, TRANSIENT, TERMINAL = 0, 1, 2
FORCE = "--force"
USAGE = {"extract": "<pair> [--force]", "merge": "<pair> [<run_id>] [--force]"}


@dataclass(frozen=True)
class JobContext:
    settings: Settings
    pair: str
    run_id: str
    task_index: int
    task_count: int
    execution: str  # CLOUD_RUN_EXECUTION: the execution's id, '' outside Cloud Run
    log: Log
    attempt: int = 0  # CLOUD_RUN_TASK_ATTEMPT
    force: bool = False  # --force
    named_run: str | None = None  # a run id given as an argument (merge)
    launched_for: str = ""  # BQX_RUN_ID: the run the trigger or the completion function launched this for
    job: str = ""  # CLOUD_RUN_JOB, else the configured job name

    @property
    def by_hand(self) -> bool:
        """Started by hand (gcloud run jobs execute, or a process) rather than by the trigger or completion."""
        return not self.launched_for

    @property
    def execution_name(self) -> str:
        """The execution's resource name as the functions record it in claims (outside Cloud Run: host and pid)."""
        if not self.execution:
            return f"local:{socket.gethostname()}:{os.getpid()}"
        s = self.settings
        return f"projects/{s.project}/locations/{s.region}/jobs/{self.job}/executions/{self.execution}"

    def owns(self, recorded: object) -> bool:
        """Whether an execution recorded in a claim or an error is this one."""
        if not isinstance(recorded, str) or not recorded:
            return False
        if self.execution:
            return recorded.rsplit("/", 1)[-1] == self.execution  # recorded as a resource name or as the id
        return recorded == self.execution_name

    def gcloud(self, *args: str) -> str:
        """The command that starts this job by hand with `args`."""
        return f"gcloud run jobs execute {self.job} --args={','.join(args)} --region={self.settings.region}"


def parse_args(component: str, argv: list[str]) -> tuple[str, str | None, bool]:
    """(pair, run id or None, force) from the container's args."""
    args = [a.strip() for a in argv if a.strip()]
    words = [a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    most = 2 if component == "merge" else 1
    if any(f != FORCE for f in flags) or not 1 <= len(words) <= most:
        raise BadRequest(f"usage: {component} {USAGE[component]}; got {argv!r}")
    return validate_pair(words[0]), (words[1] if len(words) > 1 else None), FORCE in flags


def default_run_id(ctx: JobContext) -> str:
    """BQX_RUN_ID, else one run per execution (every task and attempt of it shares it), else an ad hoc id."""
    if ctx.launched_for:
        return ctx.launched_for
    return ids.run_id_for_execution(ctx.execution) if ctx.execution else ids.adhoc_run_id()


def context(component: str, argv: list[str], resolve: Callable[[JobContext], str] = default_run_id,
            settings: Settings | None = None) -> JobContext:
    """The task's context, bound to the run it works on (`resolve` picks it; the merge's looks at the buckets)."""
    logs.setup(component)  # before the settings: a bad setting is logged as a JSON line too
    settings = settings or Settings.from_env()
    logs.setup(component, settings)
    pair, named_run, force = parse_args(component, argv)
    if named_run is not None:
        layout.run_prefix(pair, named_run)  # validates the id
    task = settings.task
    ctx = JobContext(
        settings, pair, "", task.index, task.count, task.execution,
        Log(f"bqx.{component}", pair=pair, stage=component),
        attempt=task.attempt,
        force=force,
        named_run=named_run,
        launched_for=settings.run_id,
        job=task.job or (settings.merge_job if component == "merge" else settings.extract_job),
    )
    run_id = resolve(ctx)
    layout.run_prefix(pair, run_id)  # validates the id
    return replace(ctx, run_id=run_id, log=ctx.log.bind(run_id=run_id))


def run_main(component: str, body: Callable[[JobContext], None], argv: list[str] | None = None,
             resolve: Callable[[JobContext], str] = default_run_id, settings: Settings | None = None) -> int:
    """Run one task of a job with the exit-code contract above; returns the exit code. `settings`: those the
    entrypoint already read (the merge's reads them before pyarrow loads), else read here."""
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    ctx: JobContext | None = None  # set once the run is known: failures from then on are recorded against it
    try:
        ctx = context(component, argv, resolve, settings)
        earlier = recorded_failure(ctx, component)
        if earlier is not None:
            ctx.log.error(f"{component} failed permanently on an earlier attempt of this execution: "
                          f"{earlier.get('error')}; exiting without redoing the work (retry: {earlier.get('retry')})",
                          attempt=ctx.attempt, error_type=earlier.get("error_type"))
            return TERMINAL
        body(ctx)
        return DONE
    except Refused as exc:
        log = ctx.log if ctx else Log(f"bqx.{component}")
        log.error(f"{component} refused: {exc}", error_type=type(exc).__name__)
        return TERMINAL
    except TerminalError as exc:
        log = ctx.log if ctx else Log(f"bqx.{component}")
        log.error(f"{component} failed permanently: {exc}", error_type=type(exc).__name__)
        if ctx is not None:
            record_error(ctx, component, exc, started)
        return TERMINAL
    except Exception as exc:  # noqa: BLE001 - anything else: let Cloud Run retry the task
        log = ctx.log if ctx else Log(f"bqx.{component}")
        attempt = ctx.attempt if ctx else 0
        final = ctx is not None and attempt >= ctx.settings.task_max_retries
        log.error(f"{component} failed{' on its last attempt' if final else ', task will be retried'}: {exc}",
                  exc_info=True, attempt=attempt)
        if final and ctx is not None:
            record_error(ctx, component, exc, started)
        return TRANSIENT


def claim_start(ctx: JobContext, stage: str) -> bool:
    """Claim the run's `stage` for this execution as the job starts: runs/<pair>/<run>/<stage>.started, created once
    with CLOUD_RUN_EXECUTION. True: this execution holds it (just created, or another task or an earlier attempt of
    it did). False: another execution holds it, so this one is a second launch for the same run and must do nothing
    (exit 0): a function instance that died after Cloud Run accepted `run_job` and before it recorded the execution
    leaves a claim that a later delivery takes over and launches again (docs/EXACTLY-ONCE.md). Whichever execution
    starts first does the work, whatever the launch claim records. `--force` (by hand) takes it over under a
    generation precondition. Outside Cloud Run (no CLOUD_RUN_EXECUTION) there is no execution to claim with."""
    if not ctx.execution:
        return True
    s = ctx.settings
    name = layout.started(ctx.pair, ctx.run_id, stage)
    body = {"pair": ctx.pair, "run_id": ctx.run_id, "stage": stage, "execution": ctx.execution_name,
            "task": ctx.task_index, "attempt": ctx.attempt, "at": time.time()}
    if storage.create_json(s, s.staging_bucket, name, body) is not None:
        return True
    found = storage.read_json(s, s.staging_bucket, name)
    if found is None:
        raise TransientError(f"{name} vanished while being read")
    holder = found[0].get("execution")
    if ctx.owns(holder):
        return True
    if ctx.force and ctx.by_hand:
        if storage.replace_json(s, s.staging_bucket, name, {**body, "took_over_from": found[0]}, found[1]) is None:
            raise TransientError(f"{name} changed while being taken over")
        ctx.log.warning(f"forced: took the run's {stage} over from the execution that started it", holder=holder)
        return True
    ctx.log.warning(f"another execution already started this run's {stage}: a second launch for the same run; "
                    "exiting without doing anything", holder=holder)
    return False


def start_launched(ctx: JobContext, stage: str) -> bool:
    """For a job a function launched (BQX_RUN_ID): whether this execution does the stage's work. No, if the run's
    launch claim records another execution (a duplicate launch that started after the record). Else the start claim
    decides (claim_start): of two launches neither of which was recorded yet when it started, the first to start.
    The record is read first and only once: an execution that won the start claim must not then defer to a record
    written after it started (each would defer to the other, and neither would work)."""
    s = ctx.settings
    claim = storage.read_json(s, s.staging_bucket, layout.claim(ctx.pair, ctx.run_id, stage))
    recorded = (claim[0].get("execution") or "") if claim else ""
    if ctx.execution and recorded and not ctx.owns(recorded):
        ctx.log.warning(f"another execution owns this run's {stage}; exiting", owner=recorded)
        return False
    return claim_start(ctx, stage)


def recorded_failure(ctx: JobContext, stage: str) -> dict[str, object] | None:
    """On a retried attempt: the terminal error this execution already recorded for its run's `stage`, if any."""
    if ctx.attempt <= 0:
        return None
    found = storage.read_json(ctx.settings, ctx.settings.staging_bucket, layout.run_error(ctx.pair, ctx.run_id))
    if found is None or found[0].get("stage") != stage or not ctx.owns(found[0].get("execution")):
        return None
    return found[0]


def record_error(ctx: JobContext, stage: str, exc: BaseException, started: float) -> None:
    """Record the failure in the run's error.json (bqx.runs.record_failure: the first error of a run wins)."""
    retry = getattr(exc, "retry", None) or (
        f"bqx merge {ctx.pair} --run-id {ctx.run_id}" if stage == "merge" else f"bqx run {ctx.pair}")
    try:
        recorded = runs.record_failure(ctx.settings, ctx.pair, ctx.run_id, stage, str(exc), type(exc).__name__, retry,
                                       table=getattr(exc, "table", None), seconds=round(time.time() - started, 3),
                                       execution=ctx.execution_name, attempt=ctx.attempt)
    except Exception as write_exc:  # noqa: BLE001 - the log line above already carries the error
        ctx.log.error(f"could not record the error: {write_exc}")
        return
    if not recorded:
        ctx.log.warning("the run's error.json already records an earlier failure; kept (the first error wins)")
