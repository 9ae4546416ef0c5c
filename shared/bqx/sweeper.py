"""The sweeper: runs whose job died without a word (issue 17.5).

A job killed from outside (out of memory, its task timeout, a lost instance) records nothing: no error.json, and an
extract killed before writing its report never starts the completion function's sweep. `bqx status` would say
"extracting" or "merging" until the active-run cap (6 h) ran out. The sweeper compares each active run's recorded
executions (the start claim's, else the launch claim's: runs/<pair>/<run>/<stage>.started / .claim) with what the
Cloud Run Admin API says of them (`get_execution`), and:

- an execution that ended failed or cancelled (every attempt of a task failed: killed, out of memory, timed out), or
  a merge that ended without its run being published, is recorded as the run's failure (runs.record_failure:
  error.json with the stage, the cause Cloud Run gives, the execution and the command to retry);
- an extract that ended successfully (every task reported) while no merge was launched is a handoff whose event was
  lost: it is re-driven by doing what that event asks of the completion function (bqx.completion.handler.handoff:
  validate what was not validated, then the merge claim, launched once), under the same rules.

It runs on a schedule in the deployment (Cloud Scheduler posts a `bqx.sweep` CloudEvent to the completion function,
which has every permission the sweep needs: deploy/sweeper.tf) and on every `bqx status`. Each decision is taken on
what the buckets and the Run API say at that moment; a run still running, or an execution that cannot be asked about
(a job started outside Cloud Run), is left alone. Recording is create-once, so two sweepers (or a sweeper and the
job's own error writer) record one failure.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from google.api_core import exceptions as gexc

from bqx import layout, runs
from bqx.config import Settings
from bqx.errors import TerminalError, TransientError
from bqx.gcp import storage
from bqx.gcp.clients import TRANSIENT_ERRORS
from bqx.logs import Log
from bqx.pairs import PAIRS

log = Log("bqx.sweeper")


@dataclass(frozen=True)
class ExecutionStatus:
    """What the Run API says of one execution."""

    name: str
    ended: bool
    failed: bool  # a task failed on its last attempt, or the execution was cancelled
    message: str


@dataclass(frozen=True)
class Finding:
    pair: str
    run_id: str
    stage: str  # extract | merge | handoff
    execution: str | None
    action: str  # running | recorded | redriven | left
    cause: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def execution_status(s: Settings, name: str) -> ExecutionStatus | None:
    """The execution as Cloud Run reports it; None if it cannot be asked about (not a Cloud Run execution name).
    An execution Cloud Run does not know (404) counts as failed: it will never record anything."""
    if not name.startswith("projects/") or "/executions/" not in name:
        return None
    from bqx.gcp.clients import executions_client

    try:
        ex = executions_client(s).get_execution(name=name, timeout=30)
    except gexc.NotFound:
        return ExecutionStatus(name, True, True, "Cloud Run does not know this execution (deleted, or never started)")
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"asking Cloud Run about {name}: {exc}") from exc
    ended = bool(ex.completion_time) and ex.running_count == 0
    failed = ex.failed_count > 0 or ex.cancelled_count > 0
    messages = [c.message for c in ex.conditions if c.message and c.type_ in ("Completed", "Ready")]
    summary = (f"{ex.succeeded_count} of {ex.task_count} tasks succeeded, {ex.failed_count} failed, "
               f"{ex.cancelled_count} cancelled")
    return ExecutionStatus(name, ended, failed, "; ".join([*messages, summary]))


def _execution(s: Settings, pair: str, run_id: str, stage: str) -> str | None:
    """The execution doing the run's `stage`: the start claim's (bqx.job.claim_start), else the launch claim's."""
    for name in (layout.started(pair, run_id, stage), layout.claim(pair, run_id, stage)):
        found = storage.read_json(s, s.staging_bucket, name)
        if found is not None and found[0].get("execution"):
            return str(found[0]["execution"])
    return None


def redrive_handoff(s: Settings, pair: str, run_id: str) -> str:
    """Do what the lost event of the extract's report asks of the completion function; returns what happened."""
    from bqx.completion import handler, validate

    manifest = runs.load_manifest(s, pair, run_id)
    if manifest is None:
        return "no manifest"
    if not validate.extract_finished(s, pair, run_id):
        return "not every task reported success"
    outcome = handler.handoff(s, manifest)
    if outcome is None:
        return "not complete"
    return f"merge {'started' if outcome.launched else 'already started'}: {outcome.execution}"


def sweep_run(s: Settings, pair: str, latest: dict[str, Any]) -> Finding | None:
    """Decide about the pair's latest run (its latest.json body) if it is active; None if there is nothing to ask."""
    if runs.active_run(s, pair, latest) is None:
        return None
    run_id = str(latest["run_id"])
    rlog = log.bind(pair=pair, run_id=run_id)
    merge = _execution(s, pair, run_id, "merge")
    stage, execution = ("merge", merge) if merge else ("extract", _execution(s, pair, run_id, "extract"))
    if execution is None:
        return None  # being launched: the claims' lease decides
    status = execution_status(s, execution)
    if status is None:
        return Finding(pair, run_id, stage, execution, "left", "not a Cloud Run execution: cannot ask about it")
    if not status.ended:
        return Finding(pair, run_id, stage, execution, "running")
    if stage == "merge" or status.failed:
        how = "failed" if status.failed else "ended without publishing the run"
        cause = (f"{stage} execution {execution} {how} and recorded nothing (killed from outside: out of memory, "
                 f"task timeout or a lost instance?): {status.message}")
        retry = f"bqx merge {pair} --run-id {run_id}" if stage == "merge" else f"bqx run {pair}"
        if runs.active_run(s, pair, latest) is None:
            return None  # published or failed while we asked: nothing to record
        recorded = runs.record_failure(s, pair, run_id, stage, cause, "ExecutionFailed", retry, execution=execution,
                                       recorded_by="sweeper")
        if recorded:
            rlog.error(f"run failed without a record; recorded: {cause}", stage=stage, execution=execution,
                       retry=retry)
        return Finding(pair, run_id, stage, execution, "recorded" if recorded else "left", cause)
    # The extract ended successfully and no merge was launched: the report's event was lost (or dead-lettered).
    what = redrive_handoff(s, pair, run_id)
    if what.startswith("merge"):
        rlog.warning(f"extract finished but no merge was started: handoff re-driven, {what}", execution=execution)
        return Finding(pair, run_id, "handoff", execution, "redriven", what)
    cause = (f"extract execution {execution} ended successfully, but the run cannot be handed to the merge ({what}); "
             f"{status.message}")
    if runs.active_run(s, pair, latest) is None:
        return None
    recorded = runs.record_failure(s, pair, run_id, "handoff", cause, "ExecutionFailed", f"bqx run {pair}",
                                   execution=execution, recorded_by="sweeper")
    return Finding(pair, run_id, "handoff", execution, "recorded" if recorded else "left", cause)


def sweep(s: Settings, pairs: list[str] | tuple[str, ...] | None = None) -> list[Finding]:
    """Sweep the latest run of each of `pairs` (all pairs by default). A pair whose sweep fails transiently is
    logged and skipped: the next sweep tries again."""
    found = []
    started = time.time()
    for pair in pairs or PAIRS:
        try:
            pointer = storage.read_json(s, s.staging_bucket, layout.latest(pair))
            if pointer is None:
                continue
            finding = sweep_run(s, pair, pointer[0])
        except (TransientError, *TRANSIENT_ERRORS) as exc:
            log.warning(f"could not sweep {pair}; the next sweep tries again: {exc}", pair=pair)
            continue
        except TerminalError as exc:
            log.warning(f"{pair}: not swept: {exc}", pair=pair)
            continue
        if finding is not None:
            found.append(finding)
    log.info("swept", pairs=len(pairs or PAIRS), findings=len(found),
             recorded=sum(f.action == "recorded" for f in found), redriven=sum(f.action == "redriven" for f in found),
             seconds=round(time.time() - started, 2))
    return found
