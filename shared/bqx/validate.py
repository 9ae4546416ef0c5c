"""Checkpoint validation on arrival: a bad checkpoint is set aside and reported before any merge can use it.

For each finalized checkpoint the completion function reads the object's Parquet footer with one small ranged
read of its tail (pinned to the event's generation), then checks, against the run manifest's entry:
  - the file is whole: footer magic and length, every column chunk inside the data area, row counts add up;
  - the schema: the manifest's column names in order, their types, `interval_time` as timestamp[us, tz=UTC];
  - the keys: non-null, strictly increasing (sorted and unique). Only the key column is read (8 bytes a row,
    a few ranged reads); past KEY_READ_LIMIT compressed bytes the row groups' statistics are used instead.
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
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc

from bqx import events, layout, storage
from bqx.catalog import KEY, Manifest, TableEntry
from bqx.clients import storage_client
from bqx.config import Settings
from bqx.errors import BadCheckpoint, DuplicateKeys, ObjectGone, TerminalError, TransientError
from bqx.logs import Log
from bqx.objectfile import TAIL, ObjectFile, download
from bqx.parquet_io import KEY_TYPE, type_name

WHOLE_BELOW = 1 << 20  # a checkpoint up to this size is read whole, in the request that reads its footer
KEY_READ_LIMIT = 32 * 1024 * 1024  # compressed key-column bytes read to check every key; above: statistics only
VALIDATED = "bqx_validated"  # custom metadata key: the crc32c of the content that passed validation
INLINE_VALIDATIONS = 64  # unmarked checkpoints one event validates when the run looks complete (else: their events,
#                          or the extract report's sweep, do it) — keeps one delivery well inside its ack deadline
STAGE = "validate"
_REPORT_RE = re.compile(r"^runs/([a-z]{6})/([a-z0-9][a-z0-9-]{0,62})/extract/task-(\d{4})-attempt-(\d{2})\.json$")

log = Log("bqx.validate")


class UnexpectedCheckpoint(BadCheckpoint):
    """An object under a run's checkpoint prefix that its manifest does not list."""


class MissingCheckpoints(BadCheckpoint):
    """The extract finished, but some of the manifest's tables have no checkpoint."""


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    error_type: str = ""
    reads: int = 0  # ranged reads it took (cost: one for the footer, one or a few for the keys)


def inspect(blob: Any, size: int, entry: TableEntry) -> Verdict:
    """Validate one checkpoint object generation against its manifest entry. Never raises for bad content."""
    if size < 12:
        return Verdict(False, f"truncated: {size} bytes is not a Parquet file", "BadCheckpoint")
    # The footer, in one read up to ~1,000 columns; a small checkpoint (most, at 2,000 rows) whole in that read.
    tail = download(blob, 0 if size <= WHOLE_BELOW else max(0, size - TAIL), size)
    reads = 1
    if tail[-4:] != b"PAR1":
        return Verdict(False, f"truncated or not Parquet: no footer magic in the last bytes ({size} bytes)",
                       "BadCheckpoint", reads)
    footer = int.from_bytes(tail[-8:-4], "little")
    if footer + 12 > size:
        return Verdict(False, f"truncated: footer of {footer} bytes does not fit in {size} bytes", "BadCheckpoint",
                       reads)
    if footer + 8 > len(tail):
        tail = download(blob, size - footer - 8, size)
        reads += 1
    # Only the key column is read past the footer: exactly the ranges asked for, no read-ahead, never whole.
    f = ObjectFile(blob, size, whole_below=0, chunk=0, tail_data=tail)
    try:
        pf = pq.ParquetFile(f)
        meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        return Verdict(False, f"unreadable Parquet footer: {exc}", "BadCheckpoint", reads)
    reason = _check_layout(meta, size - footer - 8) or _check_schema(schema, entry)
    if reason:
        return Verdict(False, reason, "BadCheckpoint", reads)
    try:
        bad = _check_keys(pf, meta, entry.name)
    except TransientError:  # ObjectGone among them
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        return Verdict(False, f"unreadable row group: {exc}", "BadCheckpoint", reads + f.fetches)
    if bad:
        return Verdict(False, bad[1], bad[0], reads + f.fetches)
    return Verdict(True, reads=reads + f.fetches)


def _check_layout(meta: pq.FileMetaData, data_end: int) -> str:
    rows = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        rows += rg.num_rows
        if rg.num_rows == 0:
            continue  # a table without rows is written as one empty row group whose chunks point nowhere
        for j in range(rg.num_columns):
            col = rg.column(j)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            if start is None or start < 4 or start + col.total_compressed_size > data_end:
                return (f"truncated: row group {i} column {col.path_in_schema!r} lies outside the data "
                        f"({start}+{col.total_compressed_size} > {data_end})")
    if rows != meta.num_rows:
        return f"row groups hold {rows} rows but the footer says {meta.num_rows}"
    return ""


def _check_schema(schema: pa.Schema, entry: TableEntry) -> str:
    want = [c.name for c in entry.columns]
    got = list(schema.names)
    if got != want:
        missing = [n for n in want if n not in got]
        extra = [n for n in got if n not in want]
        if missing or extra:
            return (f"schema differs from the manifest: missing columns {missing[:5]}, unexpected columns "
                    f"{extra[:5]}")
        return f"schema differs from the manifest: column order {got[:5]}... instead of {want[:5]}..."
    if KEY not in got:
        return f"no {KEY} column"
    key_type = schema.field(KEY).type
    if key_type != KEY_TYPE:
        return (f"{KEY} is {key_type}; checkpoints must hold timestamp[us, tz=UTC] "
                f"(microseconds, UTC — never milliseconds or naive times)")
    for c in entry.columns:
        t = type_name(schema.field(c.name).type)
        if t != c.type:
            return f"column {c.name!r} is {t}; the manifest says {c.type}"
    return ""


def _check_keys(pf: pq.ParquetFile, meta: pq.FileMetaData, table: str) -> tuple[str, str] | None:
    """(error_type, reason) when keys are null, unsorted or duplicated; None when fine."""
    idx = pf.schema_arrow.get_field_index(KEY)
    key_bytes = sum(meta.row_group(i).column(idx).total_compressed_size for i in range(meta.num_row_groups))
    if key_bytes > KEY_READ_LIMIT:  # too big to read on every arrival: row group statistics must be ordered
        last = None
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(idx).statistics
            if st is None or not st.has_min_max:
                continue
            if st.null_count:
                return "BadCheckpoint", f"table {table!r} has null {KEY} values"
            lo, hi = st.min, st.max
            if last is not None and lo <= last:
                return "BadCheckpoint", f"table {table!r}: row group {i} keys overlap the previous row group's"
            last = hi
        return None
    keys = pf.read(columns=[KEY]).column(KEY)
    if keys.null_count:
        return "BadCheckpoint", f"table {table!r} has null {KEY} values"
    k = keys.cast(pa.int64()).to_numpy()
    d = np.diff(k)
    if d.size and (d <= 0).any():
        i = int(np.flatnonzero(d <= 0)[0])
        if d[i] == 0:
            return "DuplicateKeys", str(DuplicateKeys(table, np.datetime64(int(k[i + 1]), "us")))
        return "BadCheckpoint", f"table {table!r} is not sorted by {KEY} (row {i + 1})"
    return None


# ---------------------------------------------------------------- arrival, quarantine, report


def arrival(s: Settings, manifest: Manifest, name: str, generation: int,
            known: events.ObjectEvent | None = None) -> bool:
    """Validate a finalized checkpoint. True: valid (now marked). False: stale event (object replaced or gone).
    Raises BadCheckpoint (terminal) after setting a bad object aside and recording why. `known`: the event, whose
    object resource (size, crc32c, metadata of this generation) saves reading the object's metadata."""
    cp = layout.parse_checkpoint(name)
    entry = next((t for t in manifest.tables if t.checkpoint == name), None)
    bucket = storage.bucket(s, s.staging_bucket)
    if known is not None and known.size is not None and known.crc32c and known.metadata is not None:
        blob = bucket.blob(name, generation=generation)
        # as the client fills a blob from a listing's resource (nothing marked changed, so a patch sends only
        # what is set afterwards)
        blob._set_properties({"name": name, "bucket": s.staging_bucket, "generation": str(generation),
                              "size": str(known.size), "crc32c": known.crc32c, "metadata": known.metadata})
    else:
        try:
            blob = bucket.get_blob(name, generation=generation)
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
        verdict = inspect(storage.bucket(s, s.staging_bucket).blob(name, generation=generation), int(blob.size or 0),
                          entry)  # type: ignore[arg-type]
    except ObjectGone:
        return False
    except DuplicateKeys as exc:
        verdict = Verdict(False, str(exc), "DuplicateKeys")
    if not verdict.ok:
        reject(s, manifest.pair, manifest.run_id, cp.table, name, generation,
               f"checkpoint of table {cp.table!r} rejected: {verdict.reason}", verdict.error_type)
    blob.metadata = {**(blob.metadata or {}), VALIDATED: str(blob.crc32c)}
    try:
        blob.patch(if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        return False
    except storage.TRANSIENT as exc:
        raise TransientError(f"marking {name} validated: {exc}") from exc
    return True


_ERRORS = {"BadCheckpoint": BadCheckpoint, "DuplicateKeys": BadCheckpoint,
           "UnexpectedCheckpoint": UnexpectedCheckpoint, "MissingCheckpoints": MissingCheckpoints}


def reject(s: Settings, pair: str, run_id: str, table: str, name: str | None, generation: int | None,
           reason: str, error_type: str) -> None:
    """Set the object aside (copy to quarantine, then delete that generation), record the run's error, raise."""
    bucket = storage.bucket(s, s.staging_bucket)
    kept = None
    try:
        if name is not None and generation is not None:
            kept = layout.quarantine(pair, run_id, table)
            src = bucket.blob(name, generation=generation)
            try:
                bucket.copy_blob(src, bucket, kept, source_generation=generation)
            except gexc.NotFound:
                kept = kept if storage.exists(s, s.staging_bucket, kept) else None
        record(s, pair, run_id, table, reason, error_type, quarantined=kept, generation=generation)
        if name is not None and generation is not None:
            storage.delete_if_generation(s, s.staging_bucket, name, generation)
    except storage.TRANSIENT as exc:
        raise TransientError(f"setting {name} aside: {exc}") from exc
    log.error(reason, pair=pair, run_id=run_id, table=table, stage=STAGE, quarantined=kept, error_type=error_type)
    raise _ERRORS.get(error_type, BadCheckpoint)(reason)


def record(s: Settings, pair: str, run_id: str, table: str | None, reason: str, error_type: str,
           **extra: Any) -> bool:
    """Write runs/<pair>/<run>/error.json (same shape as the jobs' record_error) unless one is there already."""
    body = {"pair": pair, "run_id": run_id, "stage": STAGE, "error": reason, "error_type": error_type,
            "table": table, "at": time.time(), "retry": f"bqx run {pair}", **extra}
    return storage.create_json(s, s.staging_bucket, layout.run_error(pair, run_id), body) is not None


def validated(s: Settings, manifest: Manifest) -> set[str]:
    """The run's checkpoints whose current content passed validation (one listing)."""
    return listing(s, manifest)[1]


def listing(s: Settings, manifest: Manifest) -> tuple[set[str], set[str]]:
    """(present, validated): the objects under the run's checkpoint prefix, and those marked valid (one listing)."""
    present, valid = set(), set()
    for b in storage_client(s).list_blobs(s.staging_bucket,
                                          prefix=layout.checkpoints_prefix(manifest.pair, manifest.run_id)):
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
            blob = storage.bucket(s, s.staging_bucket).get_blob(name)
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


def report_run(name: str) -> tuple[str, str] | None:
    """(pair, run_id) when `name` is an extract task report (built by layout), else None."""
    m = _REPORT_RE.match(name)
    if not m:
        return None
    try:
        if layout.extract_report(m.group(1), m.group(2), int(m.group(3)), int(m.group(4))) != name:
            return None
    except TerminalError:
        return None
    return m.group(1), m.group(2)


def extract_finished(s: Settings, pair: str, run_id: str) -> bool:
    """Every task of the run's extract has a report that did not fail."""
    bucket = storage.bucket(s, s.staging_bucket)
    done: set[int] = set()
    count = None
    for b in storage_client(s).list_blobs(s.staging_bucket, prefix=layout.extract_reports_prefix(pair, run_id)):
        try:
            body = json.loads(bucket.blob(b.name).download_as_bytes())
        except gexc.NotFound:
            continue
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
        blob = storage.bucket(s, s.staging_bucket).get_blob(name)
        if blob is not None:
            arrival(s, manifest, name, int(blob.generation))
