"""The key column (interval_time): every reader of checkpoints converts it and checks its order here.

`key_micros` turns a key column into int64 microseconds since the epoch and checks that it is non-null and strictly
increasing (sorted and unique); `check_row_group_order` checks the same across row groups from their statistics
alone. The extract (while streaming), the validator, and every merge method call them, so a bad key is reported
the same way wherever it is found: a repeat is DuplicateKeys naming the table and the key, anything else a
BadCheckpoint naming the table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.errors import BadCheckpoint, DuplicateKeys
from bqx.parquet.conventions import KEY, KEY_TYPE  # (the column model is catalog's, pending its move here)


def key_micros(table: str, keys: pa.Array | pa.ChunkedArray, previous: int | None = None) -> np.ndarray:
    """`keys` as int64 microseconds UTC, checked: no nulls, strictly increasing, and above `previous` (the last
    key of the rows before these, when they are read in pieces). A key of another timestamp unit is converted by
    its declared unit, never reinterpreted."""
    if keys.null_count:
        raise BadCheckpoint(f"table {table!r} has null {KEY} values")
    if keys.type != KEY_TYPE:
        if not pa.types.is_timestamp(keys.type):
            raise BadCheckpoint(f"{table}: {KEY} is {keys.type}, expected {KEY_TYPE}")
        keys = keys.cast(KEY_TYPE)
    k = np.asarray(keys.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    if previous is not None and k.size and k[0] <= previous:
        _refuse(table, previous, int(k[0]), 0)
    if k.size > 1:
        d = np.diff(k)
        if (d <= 0).any():
            i = int(np.flatnonzero(d <= 0)[0])
            _refuse(table, int(k[i]), int(k[i + 1]), i + 1)
    return k


def _refuse(table: str, before: int, key: int, row: int) -> None:
    if key == before:
        raise DuplicateKeys(table, np.datetime64(key, "us"))
    raise BadCheckpoint(f"table {table!r} is not sorted by {KEY} (row {row})")


def check_row_group_order(table: str, md: pq.FileMetaData, key_index: int) -> None:
    """Row groups in key order by their min/max statistics (no data read), so disorder is caught even in rows
    that are never decoded. Row groups without statistics or rows are passed over."""
    last = None
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        st = rg.column(key_index).statistics
        if not rg.num_rows or st is None or not st.has_min_max:
            continue
        if st.has_null_count and st.null_count:
            raise BadCheckpoint(f"table {table!r} has null {KEY} values")
        if last is not None and st.min <= last:
            if st.min == last:
                raise DuplicateKeys(table, st.min)
            raise BadCheckpoint(f"table {table!r}: row group {r} keys overlap the previous row group's")
        last = st.max
