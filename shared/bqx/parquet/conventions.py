"""Parquet conventions shared by checkpoints and the merged output."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bqx.catalog import KEY, Column
from bqx.errors import TerminalError

KEY_TYPE = pa.timestamp("us", tz="UTC")  # never ms-read-as-ns again: microseconds, UTC, everywhere
COMPRESSION = "snappy"
CHECKPOINT_ROW_GROUP = 65_536
# No dictionary encoding: feature values are continuous (random-walk-like doubles) and rarely repeat, so a
# dictionary never pays; with 64k-row groups it never even falls back to plain and makes chunks bigger and slower.
# Min/max statistics only for the key (row-group pruning by time, the merge's order check): per-column statistics
# of ~17,000 features cost encoding time and footer size, and nobody filters a training file by a feature's range.
WRITER_OPTIONS = {"compression": COMPRESSION, "coerce_timestamps": "us", "allow_truncated_timestamps": False,
                  "use_dictionary": False, "write_statistics": [KEY]}
# A checkpoint stores no Arrow schema: it was half of every footer (1.49 of 2.91 MB over 668 checkpoints at 2,000
# rows), which the completion function and the merge read for each table. Every type a checkpoint holds reads back
# the same from the Parquet schema alone (the key's TIMESTAMP(MICROS, UTC) as timestamp[us, tz=UTC]).
CHECKPOINT_OPTIONS = {**WRITER_OPTIONS, "store_schema": False}


class CheckpointWriter(pq.ParquetWriter):
    """A checkpoint's writer (CHECKPOINT_OPTIONS): without a stored Arrow schema pyarrow would drop the schema's
    metadata (pair, table, grid digest), so it goes into the file's key-value metadata as the footer is written."""

    def __init__(self, sink: Any, schema: pa.Schema, **options: Any) -> None:
        super().__init__(sink, schema, **{**CHECKPOINT_OPTIONS, **options})
        self._key_values = dict(schema.metadata or {})

    def close(self) -> None:
        if self.is_open and self._key_values:
            self.add_key_value_metadata(self._key_values)
        super().close()


def write_checkpoint(table: pa.Table, sink: Any, row_group_size: int = CHECKPOINT_ROW_GROUP) -> None:
    """`table` written as the extract writes a checkpoint (tests, benchmarks, scripts)."""
    with CheckpointWriter(sink, table.schema) as writer:
        writer.write_table(table, row_group_size=row_group_size)

_TYPES = {
    "double": pa.float64(), "float64": pa.float64(), "float": pa.float64(), "real": pa.float32(),
    "bigint": pa.int64(), "int64": pa.int64(), "integer": pa.int32(), "int": pa.int64(),
    "boolean": pa.bool_(), "bool": pa.bool_(), "varchar": pa.string(), "string": pa.string(),
    "timestamp": KEY_TYPE, "timestamp with time zone": KEY_TYPE, "timestamptz": KEY_TYPE,
    "timestamp_ns": KEY_TYPE, "timestamp_ms": KEY_TYPE, "datetime": KEY_TYPE,
}


def arrow_type(warehouse_type: str) -> pa.DataType:
    t = warehouse_type.strip().lower()
    if t.startswith("numeric") or t.startswith("decimal") or t.startswith("bignumeric"):
        return pa.float64()
    try:
        return _TYPES[t]
    except KeyError:
        raise TerminalError(f"unsupported warehouse column type {warehouse_type!r}") from None


def from_type_name(name: str) -> pa.DataType:
    return KEY_TYPE if name == type_name(KEY_TYPE) else pa.type_for_alias(name)


def schema_of(columns: tuple[Column, ...]) -> pa.Schema:
    return pa.schema([pa.field(c.name, KEY_TYPE if c.name == KEY else from_type_name(c.type)) for c in columns])


def type_name(t: pa.DataType) -> str:
    return "timestamp[us, tz=UTC]" if t == KEY_TYPE else str(t)
