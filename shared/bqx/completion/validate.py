"""Checkpoint validation on arrival: a bad checkpoint is set aside and reported before any merge can use it.

Each finalized checkpoint is inspected (bqx.completion.inspect) against the run manifest's entry.
A checkpoint that passes is marked in its custom metadata (`bqx_validated=<crc32c of its content>`: a metadata
patch keeps the content hash, and fake-gcs-server even gives a patched object a new generation); completion
counts only marked checkpoints, so a run whose checkpoint is bad is never complete and its merge never starts.
A repeated event for a marked object costs one metadata read and no validation.

A bad checkpoint (or an object under the run's prefix that the manifest does not list) is:
  1. copied to quarantine/<pair>/<run>/<table>.parquet — kept aside, never deleted by bqx;
  2. reported in runs/<pair>/<run>/error.json (the first error of the run wins; `bqx status` shows it);
  3. deleted from checkpoints/ (only that generation), so a rerun of the extract for the same run id writes
     the table again — if the new checkpoint validates, the run completes and merges; otherwise it stays stuck
     and reported. An unexpected (extra) table blocks the run for good: start a new run.

The extract job's per-task report (runs/<pair>/<run>/extract/task-*.json) is a second trigger: once every task
reported success, the run is swept — a manifest table without a checkpoint is reported as missing, and any
checkpoint whose own event was lost is validated then — so a lost finalize event cannot leave a run hanging.
"""

from __future__ import annotations

import json
from typing import Any

from bqx import events, layout, runs
from bqx.catalog import Manifest
from bqx.completion.inspect import Verdict, inspect
from bqx.config import Settings
from bqx.errors import BadCheckpoint, DuplicateKeys, ObjectGone, TransientError
from bqx.gcp import storage
from bqx.logs import Log

VALIDATED = "bqx_validated"  # custom metadata key: the crc32c of the content that passed validation
INLINE_VALIDATIONS = 64  # unmarked checkpoints one event validates when the run looks complete (else: their events,
#                          or the extract report's sweep, do it) — keeps one delivery well inside its ack deadline
STAGE = "validate"

log = Log("bqx.completion.validate")


class UnexpectedCheckpoint(BadCheckpoint):
    """An object under a run's checkpoint prefix that its manifest does not list."""


class MissingCheckpoints(BadCheckpoint):
    """The extract finished, but some of the manifest's tables have no checkpoint."""


# ---------------------------------------------------------------- arrival, quarantine, report


def arrival(s: Settings, manifest: Manifest, name: str, generation: int,
            known: events.ObjectEvent | None = None) -> bool:
    """Validate a finalized checkpoint. True: valid (now marked). False: stale event (object replaced or gone).
    Raises BadCheckpoint (terminal) after setting a bad object aside and recording why. `known`: the event, whose
    object resource (size, crc32c, metadata of this generation) saves reading the object's metadata."""
    cp = layout.parse_checkpoint(name)
    entry = next((t for t in manifest.tables if t.checkpoint == name), None)
    if known is not None and known.size is not None and known.crc32c and known.metadata is not None:
        blob = storage.known_blob(s, s.staging_bucket, name, generation, known.size, known.crc32c, known.metadata)
    else:
        try:
            blob = storage.get_blob(s, s.staging_bucket, name, generation)
        except storage.TRANSIENT as exc:
            raise TransientError(f"reading {name}: {exc}") from exc
    if blob is None:
        return False  # overwritten or already quarantined: the newer generation's event speaks for it
    if is_marked(blob):
        return True  # a repeated event: validated already, no read needed
    if entry is None:
        reject(s, manifest.pair, manifest.run_id, cp.table, name, generation,
               f"checkpoint {name} is not in run {manifest.run_id}'s manifest (unexpected table {cp.table!r})",
               UnexpectedCheckpoint.__name__)
    try:
        verdict = inspect(storage.blob(s, s.staging_bucket, name, generation), int(blob.size or 0),
                          entry, manifest.grid)  # type: ignore[arg-type]
    except ObjectGone:
        return False
    except DuplicateKeys as exc:
        verdict = Verdict(False, str(exc), "DuplicateKeys")
    if not verdict.ok:
        reject(s, manifest.pair, manifest.run_id, cp.table, name, generation,
               f"checkpoint of table {cp.table!r} rejected: {verdict.reason}", verdict.error_type)
    try:
        return storage.patch_metadata(blob, {**(blob.metadata or {}), VALIDATED: str(blob.crc32c)}, generation)
    except storage.TRANSIENT as exc:
        raise TransientError(f"marking {name} validated: {exc}") from exc


_ERRORS = {"BadCheckpoint": BadCheckpoint, "DuplicateKeys": BadCheckpoint,
           "UnexpectedCheckpoint": UnexpectedCheckpoint, "MissingCheckpoints": MissingCheckpoints}


def reject(s: Settings, pair: str, run_id: str, table: str, name: str | None, generation: int | None,
           reason: str, error_type: str) -> None:
    """Set the object aside (copy to quarantine, then delete that generation), record the run's error, raise."""
    kept = None
    try:
        if name is not None and generation is not None:
            kept = layout.quarantine(pair, run_id, table)
            if not storage.copy_generation(s, s.staging_bucket, name, generation, kept):
                kept = kept if storage.exists(s, s.staging_bucket, kept) else None  # set aside by another delivery
        record(s, pair, run_id, table, reason, error_type, quarantined=kept, generation=generation)
        if name is not None and generation is not None:
            storage.delete_if_generation(s, s.staging_bucket, name, generation)
    except storage.TRANSIENT as exc:
        raise TransientError(f"setting {name} aside: {exc}") from exc
    log.error(reason, pair=pair, run_id=run_id, table=table, stage=STAGE, quarantined=kept, error_type=error_type)
    raise _ERRORS.get(error_type, BadCheckpoint)(reason)


def record(s: Settings, pair: str, run_id: str, table: str | None, reason: str, error_type: str,
           **extra: Any) -> bool:
    """Record the run's validation failure (bqx.runs.record_failure: the first error of a run wins)."""
    return runs.record_failure(s, pair, run_id, STAGE, reason, error_type, f"bqx run {pair}", table=table, **extra)


def validated(s: Settings, manifest: Manifest) -> set[str]:
    """The run's checkpoints whose current content passed validation (one listing)."""
    return listing(s, manifest)[1]


def listing(s: Settings, manifest: Manifest) -> tuple[set[str], set[str]]:
    """(present, validated): the objects under the run's checkpoint prefix, and those marked valid (one listing)."""
    present, valid = set(), set()
    for b in storage.list_blobs(s, s.staging_bucket, layout.checkpoints_prefix(manifest.pair, manifest.run_id)):
        present.add(b.name)
        if is_marked(b):
            valid.add(b.name)
    return present, valid


def complete(s: Settings, manifest: Manifest) -> tuple[bool, set[str], int]:
    """(every manifest checkpoint present and validated, the validated set, how many are missing).
    When all are present but some are not marked yet (their events are in flight, or were lost), those are
    validated here — a few extra small reads at most, and a lost event cannot leave the run hanging."""
    expected = manifest.expected_objects()
    present, valid = listing(s, manifest)
    if expected <= present and not expected <= valid and len(present - valid) <= INLINE_VALIDATIONS:
        for name in sorted(present - valid):
            blob = storage.get_blob(s, s.staging_bucket, name)
            if blob is not None:
                arrival(s, manifest, name, int(blob.generation))
        present, valid = listing(s, manifest)
    return expected <= valid, valid, len(expected - valid)


def is_marked(blob: Any) -> bool:
    """The object's current content passed validation (its marker names its crc32c)."""
    return bool(blob.crc32c) and (blob.metadata or {}).get(VALIDATED) == str(blob.crc32c)


def blocking_error(s: Settings, manifest: Manifest, valid: set[str]) -> dict[str, Any] | None:
    """The recorded error that must keep this run from merging, if any. A validation error about a table whose
    checkpoint was since rewritten and validated does not block (the run was re-extracted)."""
    found = storage.read_json(s, s.staging_bucket, layout.run_error(manifest.pair, manifest.run_id))
    if found is None:
        return None
    err = found[0]
    if err.get("stage") == STAGE and err.get("error_type") != UnexpectedCheckpoint.__name__:
        entry = next((t for t in manifest.tables if t.name == err.get("table")), None)
        if entry is not None and entry.checkpoint in valid:
            return None
    return err


# ---------------------------------------------------------------- the extract's report: sweep the run


def extract_finished(s: Settings, pair: str, run_id: str) -> bool:
    """Every task of the run's extract has a report that did not fail."""
    done: set[int] = set()
    count = None
    for b in storage.list_blobs(s, s.staging_bucket, layout.extract_reports_prefix(pair, run_id)):
        raw = storage.read_bytes(s, s.staging_bucket, b.name)
        if raw is None:
            continue
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        count = int(body.get("task_count") or 1)
        if not body.get("failed"):
            done.add(int(body.get("task_index") or 0))
    return count is not None and done >= set(range(count))


def sweep(s: Settings, manifest: Manifest) -> None:
    """After the extract finished: report missing tables; validate checkpoints whose events were lost."""
    present = storage.list_names(s, s.staging_bucket, layout.checkpoints_prefix(manifest.pair, manifest.run_id))
    missing = [t for t in manifest.tables if t.checkpoint not in present]
    if missing:
        q = [t for t in missing if storage.exists(s, s.staging_bucket,
                                                   layout.quarantine(manifest.pair, manifest.run_id, t.name))]
        if q and len(q) == len(missing):
            return  # only quarantined tables are absent: already reported
        names = [t.name for t in missing]
        reason = (f"the extract finished but {len(missing)} of {len(manifest.tables)} checkpoints are missing: "
                  f"{names[:5]}{'...' if len(names) > 5 else ''}")
        record(s, manifest.pair, manifest.run_id, names[0], reason, MissingCheckpoints.__name__, missing=names[:50])
        log.error(reason, pair=manifest.pair, run_id=manifest.run_id, stage=STAGE)
        raise MissingCheckpoints(reason)
    valid = validated(s, manifest)
    for name in sorted(set(present) - valid):
        blob = storage.get_blob(s, s.staging_bucket, name)
        if blob is not None:
            arrival(s, manifest, name, int(blob.generation))
