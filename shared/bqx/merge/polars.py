"""The `polars` merge method: lazy scans and joins, bounded in memory.

The targets' rows are cut into row groups (sized from the memory budget, bqx.merge.plan.stitch_group_rows) and the
feature tables into column groups; for each (row group, column group) the tables are scanned lazily with the row
group's key range pushed down to the Parquet row-group statistics, LEFT JOINed onto the targets' keys, collected
and appended to the output as column chunks (bqx.merge.stitch).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, BinaryIO

from bqx import layout
from bqx.catalog import KEY, Manifest, TableEntry
from bqx.config import Settings
from bqx.errors import BadCheckpoint
from bqx.logs import Log
from bqx.merge.plan import CountingWriter, MergeJob, MergeStats, output_schema, stitch_group_rows
from bqx.merge.stitch import Stitcher
from bqx.parquet.conventions import WRITER_OPTIONS
from bqx.parquet.keys import key_micros

POLARS_GROUP_COLUMNS = 1_024  # columns joined per collect
log = Log("bqx.merge.polars")


def run(job: MergeJob, sink: BinaryIO) -> MergeStats:
    """The method (bqx.merge.plan's contract)."""
    return polars_merge(job.settings, job.manifest, sink, job.metadata, budget=job.budget)


def gcs_filesystem(settings: Settings) -> Any:
    """pyarrow's GCS filesystem (lazy, ranged reads); the emulator when one is configured."""
    import pyarrow.fs as pafs

    emulator = settings.storage_emulator_host
    if emulator:
        scheme, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http",
                                  retry_time_limit=dt.timedelta(seconds=15))
    return pafs.GcsFileSystem()


def column_groups(tables: tuple[TableEntry, ...], max_columns: int) -> list[list[TableEntry]]:
    groups: list[list[TableEntry]] = [[]]
    width = 0
    for t in tables:
        w = len(t.value_columns)
        if groups[-1] and width + w > max_columns:
            groups.append([])
            width = 0
        groups[-1].append(t)
        width += w
    return groups


def polars_merge(settings: Settings, manifest: Manifest, sink: BinaryIO, metadata: dict[str, str] | None = None,
                 filesystem: Any = None, max_group_columns: int = POLARS_GROUP_COLUMNS,
                 budget: int | None = None) -> MergeStats:
    """`budget`: bytes it may hold (default: settings.memory_budget)."""
    import polars as pl
    import pyarrow.dataset as ds

    started = time.time()
    budget = settings.memory_budget if budget is None else budget
    fs = filesystem or gcs_filesystem(settings)
    schema = output_schema(manifest)
    datasets: dict[str, Any] = {}

    def scan(t: TableEntry) -> pl.LazyFrame:
        if t.name not in datasets:
            datasets[t.name] = ds.dataset(f"{settings.staging_bucket}/{t.checkpoint}", filesystem=fs,
                                          format="parquet")
        return pl.scan_pyarrow_dataset(datasets[t.name])

    targets = manifest.targets
    keys_table = datasets.setdefault(
        targets.name, ds.dataset(f"{settings.staging_bucket}/{targets.checkpoint}", filesystem=fs, format="parquet")
    ).to_table(columns=[KEY])
    keys = key_micros(targets.name, keys_table.column(KEY))
    n = int(keys.size)
    groups = column_groups(manifest.features, max_group_columns)
    widest = max([len(targets.columns), *(sum(len(t.value_columns) for t in g) for g in groups)])
    group_rows = stitch_group_rows(budget, widest, n)
    bounds = [(s, min(s + group_rows, n)) for s in range(0, n, group_rows)]
    counting = CountingWriter(sink)
    md = {"bqx.rows": str(n), **(metadata or {})}
    stats = MergeStats(rows=n, columns=len(schema), tables=len(manifest.tables), row_groups=len(bounds),
                       group_rows=group_rows, workers=1)
    if n == 0:
        import pyarrow.parquet as pq

        pq.write_table(schema.empty_table(), counting, **WRITER_OPTIONS)  # type: ignore[arg-type]
    else:
        stitcher = Stitcher(counting, schema, [e - s for s, e in bounds], **WRITER_OPTIONS)  # type: ignore[arg-type]
        for g, (s, e) in enumerate(bounds):
            lo, hi = (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(k))
                      for k in (keys[s], keys[e - 1]))
            in_range = pl.col(KEY).is_between(lo, hi)
            base = scan(targets).filter(in_range)
            part = base.select([c.name for c in targets.columns]).collect()
            _check_slice(part, keys[s:e], targets.name)
            stitcher.add(g, part.to_arrow())
            key_frame = base.select(KEY)
            for group in groups:
                lf = key_frame
                for t in group:
                    prefix = layout.prefix_of(manifest.pair, t.name)
                    cols = [c.name for c in t.value_columns]
                    right = (scan(t).filter(in_range).select([KEY, *cols])
                             .rename({c: f"{prefix}_{c}" for c in cols}))
                    lf = lf.join(right, on=KEY, how="left", maintain_order="left")
                frame = lf.collect()
                _check_slice(frame, keys[s:e], ", ".join(t.name for t in group[:3]))
                stitcher.add(g, frame.drop(KEY).to_arrow())
        stitcher.close(md)
    stats.bytes = counting.size
    stats.seconds = time.time() - started
    return stats


def _check_slice(frame: Any, keys: Any, what: str) -> None:
    """A LEFT JOIN onto unique keys keeps the targets' rows exactly; anything else is a bad checkpoint."""
    import numpy as np
    import pyarrow as pa

    k = key_micros(what, pa.array(frame.get_column(KEY).to_arrow()))
    if not np.array_equal(k, keys):
        raise BadCheckpoint(f"{what}: join changed the targets' rows ({k.size} rows for {keys.size}); "
                            f"duplicate {KEY} in a checkpoint?")
