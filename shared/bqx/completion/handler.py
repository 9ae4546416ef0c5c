"""The completion function's decision: validate each arriving checkpoint; when the extract reports its end and
every manifest checkpoint is present and validated, start the merge job once."""

from __future__ import annotations

from typing import Any

from bqx import events, layout, runs
from bqx.config import Settings
from bqx.errors import BadRequest, LaunchRefused
from bqx.gcp import claims
from bqx.gcp.launch import run_job
from bqx.logs import Log

log = Log("bqx.functions")
SWEEP_EVENT = "bqx.sweep"
"""The CloudEvent type Cloud Scheduler posts to this function (deploy/sweeper.tf): sweep every pair's active run."""


def _get(event: Any, key: str) -> Any:
    try:
        return event[key]
    except (KeyError, TypeError):
        return None


def handle(s: Settings, cloud_event: Any) -> claims.Outcome | None:
    """A checkpoint arrived (validate it: a bad one is set aside and reported) or the extract reported its end
    (sweep the run); when every manifest checkpoint is present and validated, start the merge once.

    Whether the run is complete is asked only on the event of an extract task's report, which each task writes
    after its last checkpoint: a checkpoint's event only validates that checkpoint (listing 668 objects on each of
    668 events made the handoff quadratic). The last task's report finds every checkpoint present; the sweep
    validates any whose own event has not been handled yet, and a failed launch is retried by the report's
    redelivery."""
    from bqx.completion import validate  # pyarrow and numpy: only the completion function pays for them at cold start

    if _get(cloud_event, "type") == SWEEP_EVENT:  # Cloud Scheduler's sweep (deploy/sweeper.tf)
        from bqx import sweeper

        sweeper.sweep(s)
        return None
    ev = events.parse(cloud_event)
    if not isinstance(ev, events.ObjectEvent):
        raise BadRequest("completion expects storage events, got a plain Pub/Sub message")
    if ev.bucket != s.staging_bucket or ev.kind != "finalize":
        return None
    if (ended := layout.parse_run_end(ev.name)) is not None:  # done.json or error.json: the run's end, for run events
        from bqx import notify

        notify.run_ended(s, *ended)
        return None
    if ev.name.startswith(layout.CHECKPOINTS):
        cp = layout.parse_checkpoint(ev.name)
        pair, run_id, table = cp.pair, cp.run_id, cp.table
    elif (finished := layout.parse_extract_report(ev.name)) is not None:
        (pair, run_id), table = finished, None
    else:
        return None
    rlog = log.bind(pair=pair, run_id=run_id, stage="completion", table=table)
    manifest = runs.load_manifest(s, pair, run_id)
    if manifest is None:
        raise BadRequest(f"object {ev.name} belongs to no run with a manifest")
    if table is not None:
        if not validate.arrival(s, manifest, ev.name, int(ev.generation), ev):
            # that generation is gone (overwritten, set aside, or re-stamped by a metadata patch on the emulator)
            rlog.debug("that checkpoint generation is gone", generation=ev.generation)
        return None  # the extract's report, written after its last checkpoint, is what asks for the merge
    if not validate.extract_finished(s, pair, run_id):
        return None
    return handoff(s, manifest)


def handoff(s: Settings, manifest: Any) -> claims.Outcome | None:
    """The extract has finished: sweep the run (validate checkpoints whose events were lost, report missing ones), and
    when every manifest checkpoint is present and validated, start the merge once (its claim). What a report's event
    asks, and what the sweeper re-drives when that event was lost (bqx.sweeper)."""
    from bqx.completion import validate

    pair, run_id = manifest.pair, manifest.run_id
    rlog = log.bind(pair=pair, run_id=run_id, stage="completion")
    validate.sweep(s, manifest)
    expected = manifest.expected_objects()
    done, valid, missing = validate.complete(s, manifest)
    if not done:
        rlog.debug("run not complete yet", present=len(expected) - missing, expected=len(expected))
        return None
    blocking = validate.blocking_error(s, manifest, valid)
    if blocking is not None:
        rlog.error("all checkpoints present, but the run has a recorded error: merge not started",
                   error=blocking.get("error"), error_stage=blocking.get("stage"))
        return None
    try:
        outcome = claims.launch_once(
            s, layout.claim(pair, run_id, "merge"),
            lambda: run_job(s, s.merge_job, [pair], {"BQX_RUN_ID": run_id}),
            {"pair": pair, "run_id": run_id},
        )
    except LaunchRefused as exc:  # Cloud Run said no (a 4xx): record it, or `bqx status` would say "handoff" forever
        runs.record_failure(s, pair, run_id, "handoff", str(exc), type(exc).__name__,
                            f"fix the cause, then: bqx merge {pair} --run-id {run_id}")
        raise
    if outcome.launched:
        rlog.info("all checkpoints present: merge job started", checkpoints=len(expected),
                  execution=outcome.execution, took_over=outcome.took_over)
    return outcome
