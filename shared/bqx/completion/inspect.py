"""Checkpoint inspection: is one object generation a whole, well-formed checkpoint of its manifest entry?

Reads the Parquet footer with one small ranged read of the tail (a small checkpoint whole, in that read), then:
  - the bounds: what the footer declares (its own size, rows, rows per row group, the key chunks' sizes) is within
    what validation reads in a function's memory (MAX_*), checked before anything it describes is read;
  - the file is whole: footer magic and length, every column chunk inside the data area, row counts add up;
  - the schema: the manifest's column names in order, their types, `interval_time` as timestamp[us, tz=UTC];
  - an aligned run's (its manifest has a grid): the footer's bqx.grid names the grid, the row groups are its sizes;
  - the keys: non-null, strictly increasing (sorted and unique). Only the key column is read (8 bytes a row, one
    row group at a time); past KEY_READ_LIMIT compressed bytes the row groups' statistics are used instead.
Pure inspection: what to do with a bad checkpoint (quarantine, error.json) is bqx.completion.validate's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bqx.catalog import GRID_FILE_KEY, KEY, Grid, TableEntry
from bqx.errors import BadCheckpoint, DuplicateKeys, TransientError
from bqx.gcp.objectfile import TAIL, ObjectFile, download
from bqx.parquet.conventions import CHECKPOINT_ROW_GROUP, KEY_TYPE, type_name
from bqx.parquet.footer import NotParquet, footer_length
from bqx.parquet.keys import check_row_group_order, key_micros

WHOLE_BELOW = 1 << 20  # a checkpoint up to this size is read whole, in the request that reads its footer
KEY_READ_LIMIT = 32 * 1024 * 1024  # compressed key-column bytes read to check every key; above: statistics only

# Bounds on what a checkpoint's footer may declare, checked before anything it describes is read: a function has
# 512 MB, and a small file can declare a lot (100 M delta-encoded keys fit in 758 KB; a footer length can claim the
# whole object). What exceeds them is quarantined with the reason. The extract writes row groups of 65,536 rows and
# footers of a few KB per column, so each bound is far above a real checkpoint.
MAX_FOOTER = 4 << 20  # bytes of the footer (the parsed footer costs a multiple of it)
MAX_GROUP_ROWS = 1 << 20  # rows of one row group: the keys are read one row group at a time (~24 bytes a row)
MAX_ROWS = 1 << 26  # rows of the whole checkpoint (the work of reading every key)
MAX_KEY_CHUNK = 64 << 20  # declared uncompressed bytes of one row group's key column chunk (one page read at once)


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    error_type: str = ""
    reads: int = 0  # ranged reads it took (cost: one for the footer, one or a few for the keys)


def inspect(blob: Any, size: int, entry: TableEntry, grid: Grid | None = None) -> Verdict:
    """Validate one checkpoint object generation against its manifest entry (and the run's grid, when the manifest
    has one). Never raises for bad content."""
    if size < 12:
        return Verdict(False, f"truncated: {size} bytes is not a Parquet file", "BadCheckpoint")
    # The footer, in one read up to ~1,000 columns; a small checkpoint (most, at 2,000 rows) whole in that read.
    tail = download(blob, 0 if size <= WHOLE_BELOW else max(0, size - TAIL), size)
    reads = 1
    try:
        footer = footer_length(tail)
    except NotParquet:
        return Verdict(False, f"truncated or not Parquet: no footer magic in the last bytes ({size} bytes)",
                       "BadCheckpoint", reads)
    if footer + 12 > size:
        return Verdict(False, f"truncated: footer of {footer} bytes does not fit in {size} bytes", "BadCheckpoint",
                       reads)
    if footer > MAX_FOOTER:
        return Verdict(False, f"footer of {footer} bytes is over the validation limit of {MAX_FOOTER} bytes "
                              f"(a checkpoint's footer is a few KB per column); not read", "BadCheckpoint", reads)
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
    reason = (_check_bounds(meta, schema) or _check_layout(meta, size - footer - 8) or _check_schema(schema, entry)
              or _check_grid(meta, grid))
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


def _check_bounds(meta: pq.FileMetaData, schema: pa.Schema) -> str:
    """What the footer declares, against the bounds validation reads within (before any data is read)."""
    if meta.num_rows > MAX_ROWS:
        return f"declares {meta.num_rows} rows, over the validation limit of {MAX_ROWS}; not read"
    idx = schema.get_field_index(KEY)
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if rg.num_rows > MAX_GROUP_ROWS:
            return (f"row group {i} declares {rg.num_rows} rows, over the validation limit of {MAX_GROUP_ROWS} "
                    f"(checkpoints are written in row groups of {CHECKPOINT_ROW_GROUP}); not read")
        if idx >= 0 and idx < rg.num_columns:
            col = rg.column(idx)
            if col.total_uncompressed_size > MAX_KEY_CHUNK or col.num_values > rg.num_rows:
                return (f"row group {i}'s {KEY} chunk declares {col.num_values} values, "
                        f"{col.total_uncompressed_size} bytes uncompressed, for {rg.num_rows} rows (limit "
                        f"{MAX_KEY_CHUNK} bytes); not read")
    return ""


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


def _check_grid(meta: pq.FileMetaData, grid: Grid | None) -> str:
    """An aligned run's checkpoint holds the grid's rows: its footer names the grid, its row groups are the grid's."""
    if grid is None:
        return ""
    named = (meta.metadata or {}).get(GRID_FILE_KEY.encode(), b"").decode(errors="replace")
    if named != grid.keys_sha256:
        return f"not aligned to the run's grid: bqx.grid is {named[:16] or 'absent'!r}, not {grid.keys_sha256[:16]!r}"
    sizes = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if sizes != grid.row_groups:
        return f"row groups of {list(sizes)[:8]} rows; the run's grid has {list(grid.row_groups)[:8]}"
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
    try:
        if key_bytes > KEY_READ_LIMIT:  # too big to read on every arrival: row group statistics must be ordered
            check_row_group_order(table, meta, idx)
        else:  # one row group at a time (_check_bounds bounds its rows), each after the previous one's last key
            previous = None
            for i in range(meta.num_row_groups):
                keys = key_micros(table, pf.read_row_group(i, columns=[KEY]).column(KEY), previous)
                previous = int(keys[-1]) if keys.size else previous
                del keys
    except DuplicateKeys as exc:
        return "DuplicateKeys", str(exc)
    except BadCheckpoint as exc:
        return "BadCheckpoint", str(exc)
    return None
