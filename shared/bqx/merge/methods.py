"""Merge methods other than the built-in ones (`auto`, the default here and in deploy/, which composes an aligned
run and streams any other; `stream`; `compose`): `bigquery` (the join done in BigQuery) and `polars`.

`run(method, settings, manifest, temp_blob, metadata)` writes the merged Parquet to the GCS blob `temp_blob`
and returns its MergeStats; bqx.merge.publish checks and publishes it. Every method produces the same file content
as bqx.merge.stream.merge: columns key, targets, then each feature table (prefixed) in manifest order; the targets'
rows in key order.

The `polars` method joins with lazy scans, bounded in memory: the targets' rows are cut into row groups
(sized from the memory budget) and the feature tables into column groups; for each (row group, column
group) the tables are scanned lazily with the row group's key range pushed down to the Parquet row-group
statistics, LEFT JOINed onto the targets' keys, collected and appended to the output as column chunks.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from bqx import layout
from bqx.catalog import KEY, Manifest, TableEntry
from bqx.config import MERGE_METHODS, Settings
from bqx.errors import BadCheckpoint, ConfigError
from bqx.logs import Log
from bqx.merge.stitch import Stitcher
from bqx.merge.stream import CountingWriter, MergeStats
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS

METHODS = ("polars", "bigquery")  # run here; "stream" runs in bqx.merge.publish
WRITE_CHUNK = 16 * 1024 * 1024
POLARS_GROUP_COLUMNS = 1_024  # columns joined per collect
log = Log("bqx.merge.methods")


def check(method: str) -> str:
    """The method, or a clear ConfigError before any work starts."""
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of: {', '.join(MERGE_METHODS)}")
    return method


def run(method: str, settings: Settings, manifest: Manifest, temp_blob: Any, metadata: dict[str, str],
        bigquery_client: Any = None) -> MergeStats:
    check(method)
    if method not in METHODS:
        raise ConfigError(f"merge method {method!r} runs in bqx.merge.publish, not bqx.merge.methods")
    with temp_blob.open("wb", chunk_size=WRITE_CHUNK, ignore_flush=True,
                        content_type="application/vnd.apache.parquet") as sink:
        if method == "bigquery":
            from bqx.merge import bigquery as bigquery_plan

            client = bigquery_client or make_bigquery_client(settings)
            location = getattr(settings, "bigquery_location", "") or None  # None: BigQuery infers it
            return bigquery_plan.run(settings, manifest, sink, client, metadata, location=location)
        return polars_merge(settings, manifest, sink, metadata)


def make_bigquery_client(settings: Settings) -> Any:
    """The BigQuery client: bqx.gcp.clients' unless an API endpoint override is configured (local stand-in)."""
    endpoint = getattr(settings, "bigquery_api_endpoint", "")
    if not endpoint:
        from bqx.gcp.clients import bigquery_client

        return bigquery_client(settings)
    from google.cloud import bigquery

    credentials = None
    if settings.local:
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return bigquery.Client(project=settings.project, credentials=credentials,
                           client_options={"api_endpoint": endpoint})


def gcs_filesystem(settings: Settings) -> Any:
    """pyarrow's GCS filesystem (lazy, ranged reads); the emulator when STORAGE_EMULATOR_HOST is set."""
    import pyarrow.fs as pafs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
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
                 filesystem: Any = None, max_group_columns: int = POLARS_GROUP_COLUMNS) -> MergeStats:
    import polars as pl
    import pyarrow.dataset as ds

    from bqx.merge.bigquery import output_schema, rows_per_group

    started = time.time()
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
    keys = np.asarray(keys_table.column(KEY).cast(KEY_TYPE).cast(pa.int64()).to_numpy(), dtype=np.int64)
    if keys.size > 1 and (np.diff(keys) <= 0).any():
        raise BadCheckpoint(f"{targets.name}: {KEY} not strictly increasing")
    n = int(keys.size)
    groups = column_groups(manifest.features, max_group_columns)
    widest = max([len(targets.columns), *(sum(len(t.value_columns) for t in g) for g in groups)])
    group_rows = rows_per_group(settings.memory_budget, widest, n)
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


def _check_slice(frame: Any, keys: np.ndarray, what: str) -> None:
    """A LEFT JOIN onto unique keys keeps the targets' rows exactly; anything else is a bad checkpoint."""
    got = frame.get_column(KEY).to_arrow()
    k = np.asarray(pa.array(got).cast(KEY_TYPE).cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    if not np.array_equal(k, keys):
        raise BadCheckpoint(f"{what}: join changed the targets' rows ({k.size} rows for {keys.size}); "
                            f"duplicate {KEY} in a checkpoint?")
