"""Merge a run's checkpoints from GCS and publish training_<pair>.parquet with its summary: the one place that
picks the method (METHODS), gives it the output's sink, verifies what it wrote and publishes it.

The output is written to a temporary object, checked (rows == targets rows, columns == manifest), then
copied to its final name in one server-side rewrite, so readers never see it half-written.

Publishing (`publish`, docs/EXACTLY-ONCE.md "Publishing"): only while the run is still the pair's newest
(runs/<pair>/latest.json names it), the file replaced only if it is still the generation read before that check, and
the summary replaced only if it is still the generation read first. The summary is the commit point: it names the
file's generation (`output_generation`), and readers (bqx.runs.published_output) read the file at that generation,
so a reader sees the file and the summary of one run, or is told to read again; never half of two runs.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc

from bqx import layout
from bqx import versions as kept
from bqx.catalog import Manifest
from bqx.config import Settings, check_merge_method
from bqx.errors import BadCheckpoint, ConfigError, TerminalError, TransientError
from bqx.gcp import storage
from bqx.logs import Log, peak_rss_mib
from bqx.merge.plan import MergeJob, MergeStats, Method, targets_rows, upload_chunk

READ_CHUNK = 4 * 1024 * 1024
log = Log("bqx.merge.publish")

# The merge methods that write the output to a sink, by name: their module's `run(job, sink)` (bqx.merge.plan's
# contract). Imported when chosen: polars and the BigQuery client load only for their method. `compose` builds the
# output in the staging bucket from the checkpoints themselves (no sink), and `auto` picks compose or stream:
# merge_run handles both (choose_method).
METHODS = {"stream": "bqx.merge.stream", "polars": "bqx.merge.polars", "bigquery": "bqx.merge.bigquery"}


def method(name: str) -> Method:
    """The sink method called `name`, or a clear ConfigError before any work starts."""
    import importlib

    check_merge_method(name)
    if name not in METHODS:
        raise ConfigError(f"merge method {name!r} writes no sink: bqx.merge.publish.merge_run runs it")
    return importlib.import_module(METHODS[name]).run  # type: ignore[no-any-return]


def write_output(name: str, job: MergeJob, blob: Any) -> MergeStats:
    """Run method `name` into the GCS object `blob`. The upload's piece is held outside the method: `job.budget`
    less it is what the method is given."""
    run = method(name)
    chunk = upload_chunk(job.budget)
    with blob.open("wb", chunk_size=chunk, ignore_flush=True, content_type="application/vnd.apache.parquet") as sink:
        return run(replace(job, budget=job.budget - chunk), sink)


def expected_columns(manifest: Manifest) -> int:
    return 1 + sum(len(t.value_columns) for t in manifest.tables)


def verify_checkpoints(settings: Settings, manifest: Manifest, validated: bool = False,
                       listed: dict[str, Any] | None = None) -> dict[str, tuple[int, int]]:
    """Every expected checkpoint is there: name -> (size, generation) of each, from one listing (the merge reads
    exactly these generations). `validated`: each must also be the generation the completion function validated
    (its marker names the content's crc32c); one that is not (replaced after it was checked, or not checked yet)
    fails the merge transiently, so it is merged only once a validated generation is there. `listed`, if given,
    receives each listed blob by name (its metadata says whether it is aligned: bqx.merge.compose)."""
    from bqx.completion.validate import is_marked
    from bqx.gcp.clients import storage_client

    present, unchecked = {}, []
    for b in storage_client(settings).list_blobs(settings.staging_bucket,
                                                 prefix=layout.checkpoints_prefix(manifest.pair, manifest.run_id)):
        present[b.name] = (int(b.size or 0), int(b.generation))
        if listed is not None:
            listed[b.name] = b
        if validated and not is_marked(b):
            unchecked.append(f"{b.name}#{b.generation}")
    missing = sorted(manifest.expected_objects() - present.keys())
    if missing:
        raise BadCheckpoint(f"{len(missing)} checkpoints missing, e.g. {missing[:3]}")
    unchecked = [u for u in unchecked if u.split("#")[0] in manifest.expected_objects()]
    if unchecked:
        log.warning("checkpoints not (or no longer) the validated generation; the merge will be retried",
                    pair=manifest.pair, run_id=manifest.run_id, unchecked=unchecked[:10], count=len(unchecked))
        raise TransientError(f"{len(unchecked)} checkpoints are not the generation that was validated, e.g. "
                             f"{unchecked[:3]}: replaced after validation, or not validated yet")
    return present


class Progress:
    """The merge's progress where `bqx run` and `bqx status` read it (runs/<pair>/<run>/merge-progress.json):
    tables written, then the phase. At most one write every PROGRESS_SECONDS (GCS: one write per object per second),
    best effort: a progress write that fails never fails the merge."""

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.s, self.m = settings, manifest
        self.name = layout.merge_progress(manifest.pair, manifest.run_id)
        self.last = 0.0
        self.lock = threading.Lock()  # called from the compose merge's reader threads: one write at a time

    def __call__(self, done: int, total: int, phase: str = "merging", force: bool = False,
                 step: str = "") -> None:
        """`step`: what is being counted when it is not tables written (the compose merge: "footers read",
        "compose calls"); `bqx run` shows it."""
        if not self.lock.acquire(blocking=force):
            return  # another thread is writing the progress right now
        try:
            self._write(done, total, phase, force, step)
        finally:
            self.lock.release()

    def _write(self, done: int, total: int, phase: str, force: bool, step: str) -> None:
        now = time.time()
        if not force and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        body: dict[str, Any] = {"phase": phase, "tables_written": done, "tables": total, "at": now}
        if step:  # no table is written until the whole file is composed
            body.update(step=step, done=done, total=total, tables_written=0, tables=len(self.m.features))
        try:
            storage.write_json(self.s, self.s.staging_bucket, self.name, body)
        except Exception as exc:  # noqa: BLE001
            log.warning(f"could not write merge progress: {exc}", pair=self.m.pair, run_id=self.m.run_id)


PROGRESS_SECONDS = 2.0


def merge_run(settings: Settings, manifest: Manifest, method: str, execution: str = "",
              accept_drift: bool | None = None) -> dict[str, Any]:
    """Merge the run and publish it. `accept_drift`: publish even if it falls short of the pair's published file
    (None: as the run's request said, recorded in its extract claim)."""
    pair, run_id = manifest.pair, manifest.run_id
    started = time.time()
    check_merge_method(method)
    rows = targets_rows(settings, manifest)
    if rows == 0:
        raise TerminalError(f"run {run_id}'s targets table {manifest.targets.name} has 0 rows (a table being "
                            "refreshed?): nothing merged, the pair's published training file is left as it is")
    if accept_drift is None:
        claim = storage.read_json(settings, settings.staging_bucket, layout.claim(pair, run_id, "extract"))
        accept_drift = bool(claim and claim[0].get("accept_drift"))
    if not accept_drift:
        check_drift(settings, manifest, rows, expected_columns(manifest))
    check_newest(settings, manifest)  # an older run is not even merged (publish checks again)
    listed: dict[str, Any] = {}
    versions = verify_checkpoints(settings, manifest, validated=True, listed=listed)
    method = choose_method(method, manifest, listed)
    out_bucket = storage.bucket(settings, settings.output_bucket)
    temp = out_bucket.blob(layout.output_temp(pair, run_id))
    md = {"bqx.pair": pair, "bqx.run_id": run_id, "bqx.method": method}
    progress = Progress(settings, manifest)
    features_total = len(manifest.features)
    if method == "compose":
        progress(0, len(manifest.tables), force=True, step="footers read")
    else:
        progress(0, features_total, force=True)
    composed = None
    if method == "compose":
        from bqx.merge import compose

        # Built in the staging bucket from the checkpoints themselves; published from there like a temp object.
        composed = compose.merge_gcs(settings, manifest, listed, md, progress)
        stats, temp = composed.stats, composed.blob
    else:
        stats = write_output(method, MergeJob(settings, manifest, settings.memory_budget, md, progress, versions),
                             temp)
    progress(features_total, features_total, "publishing", force=True)
    temp.reload()
    if temp.size != stats.bytes:
        raise TransientError(f"merged object has {temp.size} bytes, the merge wrote {stats.bytes}; not published")
    if composed is not None:  # its footer is the one just written (the object is its sources, pinned, and it)
        meta = pq.ParquetFile(pa.BufferReader(composed.plan.tail)).metadata
    else:
        with temp.open("rb", chunk_size=READ_CHUNK) as f:
            meta = pq.ParquetFile(f).metadata
    if meta.num_rows != rows or meta.num_columns != expected_columns(manifest):
        raise TerminalError(
            f"merged file has {meta.num_rows} rows x {meta.num_columns} columns; expected "
            f"{rows} x {expected_columns(manifest)} - not published"
        )
    summary = build_summary(settings, manifest, stats, method, execution, started)
    # GCS's own checksums of what it stored (base64, as `gcloud storage hash` prints them): the merge does not hash.
    summary["crc32c"], summary["md5"] = temp.crc32c, temp.md5_hash
    summary["cost"], summary["reused"] = _cost(settings, manifest, summary["seconds"])
    summary["ignored_tables"] = [{"name": t.name, "reason": t.reason} for t in manifest.ignored_tables]
    schema = kept.schema_of(manifest)  # 17,000 columns: built once for the drift and both copies
    summary["drift"] = kept.drift_since_published(settings, manifest, summary, schema)
    kept.keep_schema(settings, manifest, schema)  # by run, before the summary commits the run
    publish(settings, manifest, temp, summary)
    kept.keep_published(settings, manifest, summary, schema)  # schema beside the file; this run kept (bqx history)
    record_done(settings, summary)
    if composed is not None:
        from bqx.merge import compose

        compose.cleanup(settings, pair, run_id)  # the parts, the footer, and whatever a killed attempt left
    log.info("training file published", pair=pair, run_id=run_id, rows=stats.rows, columns=stats.columns,
             seconds=round(stats.seconds, 2), output=summary["output"], peak_rss_mib=peak_rss_mib())
    return summary


class Superseded(TerminalError):
    """A newer run of the pair was started since this one: it is not published (the newer one will be)."""


PUBLISH_TRIES = 5


def publish(settings: Settings, manifest: Manifest, temp: Any, summary: dict[str, Any]) -> int:
    """Make the checked `temp` the pair's training file and `summary` its summary, as one unit; returns the file's
    generation. Each try reads the summary's and the file's generations, then checks that the run is still the pair's
    newest, then replaces the file and then the summary each under the generation read. A write that loses a race
    (412: another run published meanwhile) tries again from the start, and the newest check then refuses an older
    run (Superseded). Because the generations are read before the check, a newer run that published before the check
    is seen by it, and one that publishes after makes our precondition fail: an older run never replaces it."""
    pair, run_id = manifest.pair, manifest.run_id
    out_bucket = storage.bucket(settings, settings.output_bucket)
    for attempt in range(PUBLISH_TRIES):
        current = storage.read_json(settings, settings.output_bucket, layout.summary(pair))
        summary_gen = current[1] if current is not None else 0
        existing = out_bucket.get_blob(layout.output(pair))
        output_gen = int(existing.generation) if existing is not None else 0
        check_newest(settings, manifest)
        final = out_bucket.blob(layout.output(pair))
        try:
            token, _, _ = final.rewrite(temp, if_generation_match=output_gen)
            while token is not None:
                token, _, _ = final.rewrite(temp, token=token, if_generation_match=output_gen)
        except gexc.PreconditionFailed:
            log.info("the training file changed while publishing; deciding again", pair=pair, run_id=run_id,
                     attempt=attempt)
            continue
        if final.crc32c != temp.crc32c:  # the rewrite response carries the new object's checksum
            raise TransientError(f"published object's crc32c {final.crc32c} != merged {temp.crc32c}; not trusted")
        body = {**summary, "output_generation": int(final.generation)}
        if storage.replace_json(settings, settings.output_bucket, layout.summary(pair), body, summary_gen) is None:
            log.info("the summary changed while publishing; deciding again", pair=pair, run_id=run_id,
                     attempt=attempt)
            continue
        kept.keep_file(settings, pair, run_id, temp)  # every published run stays reachable (bqx history)
        temp.delete()
        summary.update(body)
        return int(final.generation)
    raise TransientError(f"run {run_id} of {pair}: another run kept publishing meanwhile ({PUBLISH_TRIES} tries)")


def check_newest(settings: Settings, manifest: Manifest) -> None:
    """Raise Superseded unless the run is the pair's newest: runs/<pair>/latest.json names it, or names a run
    registered before this run's manifest was written (a run nothing registered: tests, a merge resumed by hand), or
    is absent. Both times are the server's (the objects' creation times), not a local clock."""
    bucket = storage.bucket(settings, settings.staging_bucket)
    pointer = bucket.get_blob(layout.latest(manifest.pair))
    if pointer is None:
        return
    try:
        newest = json.loads(pointer.download_as_bytes(if_generation_match=pointer.generation)).get("run_id")
    except (gexc.PreconditionFailed, gexc.NotFound):
        raise TransientError(f"{pointer.name} changed while being read") from None
    if newest in (None, manifest.run_id):
        return
    ours = bucket.get_blob(layout.manifest(manifest.pair, manifest.run_id))
    if ours is not None and ours.time_created and pointer.time_created and pointer.time_created < ours.time_created:
        return  # the pointer's run was registered before this run existed: this run is the newer
    raise Superseded(f"run {manifest.run_id} of {manifest.pair} not published: run {newest} was started after it "
                     f"and is the pair's newest (its file, not this older one, is the one to publish)")


def choose_method(method: str, manifest: Manifest, listed: dict[str, Any]) -> str:
    """`auto`: compose when the run is aligned (its manifest has a grid and every checkpoint carries its digest),
    else stream. `compose` on a run that is not aligned is refused, saying why."""
    if method not in ("auto", "compose"):
        return method
    from bqx.merge import compose

    why = compose.aligned_run(manifest, listed)
    if not why:
        return "compose"
    if method == "compose":
        raise TerminalError(f"run {manifest.run_id} of {manifest.pair} cannot be composed: {why}; merge it with "
                            "--method stream (or auto)")
    log.info(f"stream merge: {why}", pair=manifest.pair, run_id=manifest.run_id)
    return "stream"


def promote(settings: Settings, pair: str, source: Any) -> Any:
    """Make `source` (a checked blob in the output bucket) training_<pair>.parquet in one server-side copy, trusted
    only if the copy's crc32c is the source's. `bqx restore` publishes a kept run through it."""
    final = storage.bucket(settings, settings.output_bucket).blob(layout.output(pair))
    token, _, _ = final.rewrite(source)
    while token is not None:
        token, _, _ = final.rewrite(source, token=token)
    if final.crc32c != source.crc32c:  # the rewrite response carries the new object's checksum
        raise TransientError(f"published object's crc32c {final.crc32c} != merged {source.crc32c}; not trusted")
    return final


def record_done(settings: Settings, summary: dict[str, Any]) -> None:
    """runs/<pair>/<run>/done.json: the run's end in the staging bucket, whose event the completion function turns
    into a run event (bqx.notify). Best effort: the training file is published either way."""
    try:
        storage.write_json(settings, settings.staging_bucket, layout.run_done(summary["pair"], summary["run_id"]),
                           summary)
    except Exception as exc:  # noqa: BLE001
        log.warning(f"could not record the run's end: {exc}", pair=summary["pair"], run_id=summary["run_id"])


def _cost(settings: Settings, manifest: Manifest, merge_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's cost at list prices, from measured durations, and what it reused (checkpoints copied from earlier
    runs, bqx.report.Timeline.reuse_json). Best effort: never blocks publishing."""
    from bqx import report

    try:
        tl = report.load(settings, manifest.pair, manifest.run_id)
        return replace(tl.cost(), merge_seconds=merge_seconds).to_json(), tl.reuse_json()
    except Exception as exc:  # noqa: BLE001
        log.warning(f"cost estimate unavailable: {exc}", pair=manifest.pair, run_id=manifest.run_id)
        return {}, {}


def check_drift(settings: Settings, manifest: Manifest, rows: int, columns: int) -> None:
    """Refuse (terminal) a run that would replace the pair's published file with one that has lost rows (more
    than BQX_MAX_ROW_DROP of them) or columns; the error says by how much and how to publish it anyway."""
    found = storage.read_json(settings, settings.output_bucket, layout.summary(manifest.pair))
    if found is None or found[0].get("run_id") == manifest.run_id:
        return
    prev = found[0]
    prev_rows, prev_cols = int(prev.get("rows") or 0), int(prev.get("columns") or 0)
    problems = []
    if prev_rows and rows < prev_rows * (1 - settings.max_row_drop):
        problems.append(f"rows fell by {1 - rows / prev_rows:.1%} ({prev_rows} -> {rows}), more than "
                        f"BQX_MAX_ROW_DROP={settings.max_row_drop:g}")
    if columns < prev_cols:
        problems.append(f"{prev_cols - columns} columns fewer ({prev_cols} -> {columns})")
    if problems:
        raise TerminalError(
            f"run {manifest.run_id} of {manifest.pair} not published: against the published run "
            f"{prev.get('run_id')}, {'; '.join(problems)}. If that is intended: bqx merge {manifest.pair} "
            f"--run-id {manifest.run_id} --accept-drift (or request with \"accept_drift\": true)")


def build_summary(settings: Settings, manifest: Manifest, stats: MergeStats, method: str, execution: str,
                  started: float) -> dict[str, Any]:
    return {
        "pair": manifest.pair,
        "run_id": manifest.run_id,
        "output": f"gs://{settings.output_bucket}/{layout.output(manifest.pair)}",
        "rows": stats.rows,
        "columns": stats.columns,
        "checkpoints": len(manifest.tables),
        "bytes": stats.bytes,
        "seconds": round(time.time() - started, 3),
        "merge_seconds": round(stats.seconds, 3),
        "method": method,
        "execution": execution,
        "manifest_created_at": manifest.created_at,
        "published_at": time.time(),
        "stats": {k: v for k, v in asdict(stats).items() if k != "table_seconds"},
        "slowest_tables": sorted(stats.table_seconds.items(), key=lambda kv: -kv[1])[:10],
    }
