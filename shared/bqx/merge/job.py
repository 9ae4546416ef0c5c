"""Job 2 entrypoint: merge one run's checkpoints into training_<pair>.parquet (see bqx.merge.publish).

Launched by the completion function (BQX_RUN_ID set, the run's merge claim recording this execution) it merges that
run; a duplicate launch (the claim records another execution) exits 0 having done nothing.

Started by hand (no BQX_RUN_ID): `gcloud run jobs execute bqx-ml-merge --args=eurusd` merges the pair's newest
complete run (every manifest checkpoint present and validated, as the completion function requires), `--args=eurusd,RUN`
the named run. It takes the run's merge claim (`runs/<pair>/<run>/merge.claim`) create-once for its own execution, so
a run never gets a second merge: a run whose claim another execution holds, whose summary is published, or which has
a recorded error is refused (exit 2) unless `--force` (which takes the claim over). A run that is not complete is
always refused, as is a pair with no complete run.
"""

from __future__ import annotations

import sys

from bqx import layout, runs
from bqx.catalog import Manifest
from bqx.config import Settings
from bqx.errors import BadCheckpoint, BadRequest, Refused
from bqx.gcp import claims, storage
from bqx.job import JobContext, claim_start, run_main, start_launched
from bqx.merge.publish import merge_run


def resolve(ctx: JobContext) -> str:
    """The run to merge: BQX_RUN_ID (launched by the completion function), the run named, or the newest complete."""
    if ctx.launched_for:
        if ctx.named_run not in (None, ctx.launched_for):
            raise BadRequest(f"run {ctx.named_run} named, but BQX_RUN_ID is {ctx.launched_for}")
        return ctx.launched_for
    if ctx.named_run:
        return ctx.named_run
    manifest = runs.newest_complete(ctx.settings, ctx.pair)
    if manifest is None:
        raise Refused(f"{ctx.pair} has no complete run to merge (none with every checkpoint present and validated); "
                      f"see `bqx status {ctx.pair}`")
    ctx.log.info("newest complete run chosen", chosen_run_id=manifest.run_id)
    return manifest.run_id


def claim_by_hand(ctx: JobContext) -> Manifest:
    """The run's manifest once this execution holds its merge claim; Refused when the rules say no."""
    from bqx.completion import validate  # pyarrow: the merge imports it anyway

    s, pair, run_id = ctx.settings, ctx.pair, ctx.run_id
    manifest = runs.load_manifest(s, pair, run_id)
    if manifest is None:
        raise Refused(f"run {run_id} of {pair} has no manifest (never extracted?); see `bqx status {pair}`")
    name = layout.claim(pair, run_id, "merge")
    found = storage.read_json(s, s.staging_bucket, name)
    if found is not None and ctx.owns(found[0].get("execution")):
        return manifest  # an earlier attempt of this execution claimed it
    try:
        done, valid, _ = validate.complete(s, manifest)
    except BadCheckpoint as exc:  # a checkpoint was rejected just now (set aside and recorded)
        raise Refused(f"run {run_id} of {pair} is not complete: {exc}") from exc
    if not done:
        expected = manifest.expected_objects()
        present = expected & set(storage.list_names(s, s.staging_bucket, layout.checkpoints_prefix(pair, run_id)))
        raise Refused(f"run {run_id} of {pair} is not complete: {len(present)} of {len(expected)} checkpoints "
                      f"present, {len(expected & valid)} validated; see `bqx status {pair}`")
    again = f"to merge it again anyway: {ctx.gcloud(pair, run_id, '--force')}"
    if not ctx.force:
        blocking = validate.blocking_error(s, manifest, valid)
        if blocking is not None:
            raise Refused(f"run {run_id} of {pair} has a recorded error ({blocking.get('stage')}: "
                          f"{blocking.get('error')}); {again}")
        summary = storage.read_json(s, s.output_bucket, layout.summary(pair))
        if summary is not None and summary[0].get("run_id") == run_id:
            raise Refused(f"run {run_id} of {pair} is already merged (gs://{s.output_bucket}/{layout.output(pair)}, "
                          f"execution {summary[0].get('execution') or '-'}); {again}")
    outcome = claims.claim_own(s, name, ctx.execution_name, ctx.owns, {"pair": pair, "run_id": run_id},
                               force=ctx.force)
    if not outcome.launched:
        raise Refused(f"run {run_id} of {pair} already has a merge: execution "
                      f"{outcome.execution or '(being launched)'} holds its merge claim; {again}")
    ctx.log.info("merge started by hand: merge claim taken", execution=outcome.execution,
                 took_over=outcome.took_over, force=ctx.force)
    return manifest


def body(ctx: JobContext) -> None:
    s = ctx.settings
    if ctx.by_hand:
        manifest = claim_by_hand(ctx)
        if not claim_start(ctx, "merge"):
            return
    else:
        if not start_launched(ctx, "merge"):  # a second launch for the run (docs/EXACTLY-ONCE.md): nothing to do
            return
        found = runs.load_manifest(s, ctx.pair, ctx.run_id)
        if found is None:
            raise BadCheckpoint(f"run {ctx.run_id} of {ctx.pair} has no manifest")
        manifest = found
    merge_run(s, manifest, s.merge_method, ctx.execution)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """`settings`: those the entrypoint read before pyarrow loaded (jobs/merge/main.py), else read here."""
    return run_main("merge", body, argv, resolve, settings)


if __name__ == "__main__":
    sys.exit(main())
