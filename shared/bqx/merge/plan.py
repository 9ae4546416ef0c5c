"""What every merge method shares: the contract (a MergeJob in, MergeStats out), the inputs, the output's schema,
the row-group sizing, and the targets' row count.

A method is a function `run(job, sink) -> MergeStats`: it writes the whole training file to `sink` (columns: the
key, the targets' columns, then each feature table's, prefixed with layout.prefix_of, in manifest order; the
targets' rows in key order; key-value metadata `bqx.rows` plus `job.metadata`) holding at most `job.budget` bytes.
bqx.merge.publish picks the method, gives it the sink, then verifies and publishes what it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from bqx import layout
from bqx.catalog import KEY, Manifest
from bqx.config import Settings
from bqx.errors import BadCheckpoint, TerminalError
from bqx.pairs import PAIRS

if TYPE_CHECKING:
    import pyarrow as pa

    from bqx.merge.stitch import FileRange

# ---------------------------------------------------------------------------------------------- sizing

BYTES_PER_CELL = 8  # a decoded value (double, int64, timestamp) in Arrow's buffers, validity bits aside
# Copies of a row group's cells a method holds at once, each BYTES_PER_CELL a cell:
STREAM_COPIES = 8  # stream: decoded input (two row groups), aligned copy, encoder, output, allocator slack
STITCH_COPIES = 5  # polars / bigquery: decoded input, re-cut copy, encoder buffers, compressed output
MIN_GROUP_ROWS, MAX_GROUP_ROWS = 1_024, 1 << 17
MIN_SLICE_COLUMNS = 8  # stream: the narrowest slice of columns a worker reads at once
# Two shares of the budget the stream merge sets aside from its workers' estimate (STREAM_COPIES is an upper bound
# of what a slice holds, so its slack pays for them): encoded chunks that wait for their table's turn, and the
# targets' encoded key chunks kept to recognise aligned checkpoints byte for byte. Each is small next to the
# decoded data it comes from (compressed, one column), so 1/16 of the budget is plenty.
HELD_ENCODED_SHARE = 16
MIN_HELD_ENCODED = 1 << 20  # ... but never less than one typical column chunk


def even_rows(cap: int, rows: int) -> int:
    """Rows per group for `rows` rows in groups of at most `cap`, evened out so the last group is not a sliver."""
    cap = int(min(max(cap, MIN_GROUP_ROWS), MAX_GROUP_ROWS))
    groups = max(1, -(-rows // cap))
    return -(-rows // groups) if rows else cap


@dataclass(frozen=True)
class StreamSizing:
    """How the stream merge cuts its budget. Every fraction of it is here, with why."""

    group_rows: int  # most rows of an output row group
    worker_budget: int  # each worker's share: `workers` tables are decoded at once, each within its share
    targets_budget: int  # the targets are encoded alone, before any worker starts: the whole budget
    held_encoded: int  # encoded bytes held for their turn (Stitcher's reorder limit), and the targets' key chunks
    governor_limit: int  # past this growth of the process, free allocator pages go back to the OS (allocator.py)


def stream_sizing(budget: int, workers: int, rows: int) -> StreamSizing:
    from bqx.merge.allocator import GOVERNOR_SHARE

    worker_budget = budget // max(workers, 1)
    # An output row group must fit the narrowest slice a worker reads (MIN_SLICE_COLUMNS) within its share.
    cap = worker_budget // (MIN_SLICE_COLUMNS * STREAM_COPIES * BYTES_PER_CELL)
    return StreamSizing(group_rows=even_rows(cap, rows), worker_budget=worker_budget, targets_budget=budget,
                        held_encoded=max(budget // HELD_ENCODED_SHARE, MIN_HELD_ENCODED),
                        governor_limit=int(budget * GOVERNOR_SHARE))


def stitch_group_rows(budget: int, widest: int, rows: int) -> int:
    """polars / bigquery: rows per output row group so that one group of the widest column group they collect at
    once fits the budget."""
    return even_rows(budget // max(widest * STITCH_COPIES * BYTES_PER_CELL, 1), rows)


def upload_chunk(budget: int) -> int:
    """The output's resumable-upload piece, held outside the method's budget: few large pieces (each is a request,
    and on fake-gcs-server a copy of everything uploaded so far: a 276 MB file took 15.6 s of its CPU in 16 MiB
    pieces, 4.7 s in 128 MiB ones), at most 1/8 of the budget, in the 256 KiB multiples GCS requires."""
    return max(1 << 20, min(UPLOAD_CHUNK_MAX, budget // 8)) // (256 << 10) * (256 << 10)


UPLOAD_CHUNK_MAX = 128 * 1024 * 1024

# ---------------------------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class MergeJob:
    """What a method is given besides its sink."""

    settings: Settings
    manifest: Manifest
    budget: int  # bytes the method may hold (the upload's piece is already taken out)
    metadata: dict[str, str] = field(default_factory=dict)  # key-values for the output's footer
    progress: Callable[[int, int], None] | None = None  # (feature tables written, of how many)
    versions: dict[str, tuple[int, int]] | None = None  # checkpoint -> (size, generation) to read


@dataclass
class MergeStats:
    rows: int = 0
    columns: int = 0
    tables: int = 0
    row_groups: int = 0
    bytes: int = 0
    seconds: float = 0.0
    group_rows: int = 0
    workers: int = 1
    copied_tables: int = 0  # tables whose column chunks were copied as they are (already aligned)
    memory_releases: int = 0  # times the process reached its budget and gave the allocator's free pages back
    bytes_read: int = 0  # of the checkpoints, when the method counts them (compose: their footers)
    footers_indexed: int = 0  # compose: footers taken from the extract's footer indexes, not read from checkpoints
    table_seconds: dict[str, float] = field(default_factory=dict)


Method = Callable[[MergeJob, BinaryIO], MergeStats]


class CountingWriter:
    """Counts what passes through to the real sink. The output is not hashed here: GCS computes its CRC32C and
    MD5 on upload, and publishing records those (hashing 2-3 GB in Python cost ~20% of the merge's CPU)."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.size = sink, 0

    def write(self, data: bytes | memoryview) -> int:
        n = self.sink.write(data)
        n = len(memoryview(data).cast("B")) if n is None else n
        self.size += n
        return n

    def copy_range(self, r: FileRange) -> None:
        """Write `r`'s bytes: between two local files with copy_file_range (the kernel moves page-cache pages, the
        bytes never enter Python), otherwise read and written in pieces."""
        done = 0
        try:
            src, dst = r.f.fileno(), self.sink.fileno()
            self.sink.flush()
            while done < r.length:
                n = os.copy_file_range(src, dst, r.length - done, r.start + done)
                if not n:
                    break
                done += n
        except (AttributeError, OSError, ValueError):  # not two OS files, or the kernel declines: plain copy
            pass
        self.size += done
        if done < r.length:  # (a seek is a system call: each costs a GIL handoff, ~0.2 ms next to a busy worker)
            for piece in r.read_from(done):
                self.write(piece)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class MergeInput:
    table: str
    prefix: str  # "" for the targets: its columns keep their names
    open: Callable[[], BinaryIO | str]
    remote: bool = False  # in an object store: footers are read many at once (latency); locally, one at a time


def gcs_inputs(settings: Settings, manifest: Manifest,
               versions: dict[str, tuple[int, int]] | None = None) -> tuple[MergeInput, list[MergeInput]]:
    """The run's checkpoints as merge inputs, each read at the size and generation it was listed with."""
    from bqx.gcp import storage

    if versions is None:
        from bqx.merge.publish import verify_checkpoints

        versions = verify_checkpoints(settings, manifest)
    bucket = storage.bucket(settings, settings.staging_bucket)
    t = manifest.targets
    targets = MergeInput(t.name, "", object_opener(bucket, t.checkpoint, *versions[t.checkpoint]), remote=True)
    features = [MergeInput(f.name, layout.prefix_of(manifest.pair, f.name),
                           object_opener(bucket, f.checkpoint, *versions[f.checkpoint]), remote=True)
                for f in manifest.features]
    return targets, features


def object_opener(bucket: Any, name: str, size: int, generation: int) -> Callable[[], BinaryIO]:
    from bqx.gcp.objectfile import ObjectFile

    return lambda: ObjectFile(bucket.blob(name, generation=generation), size)  # type: ignore[return-value]


def local_inputs(directory: Path, targets: str | None = None,
                 pair: str | None = None) -> tuple[MergeInput, list[MergeInput]]:
    """DIR with one Parquet file per table -> (targets, features). Targets: the file named `targets*`. Columns are
    prefixed as in the pipeline's file (layout.prefix_of: the table's name less the pair), the pair being `pair` or
    the one a `targets_<pair>` file names; files of no known pair keep their whole name as prefix."""
    files = sorted(p for p in Path(directory).glob("*.parquet") if p.is_file())
    if not files:
        raise TerminalError(f"no .parquet files in {directory}")
    chosen = [p for p in files if (p.stem == targets if targets else p.stem.startswith("targets"))]
    if len(chosen) != 1:
        raise TerminalError(
            f"need exactly one targets file in {directory} (matching {targets or 'targets*'}), found {len(chosen)}"
        )
    t = chosen[0]
    if pair is None:
        named = t.stem.split("_", 1)[1] if "_" in t.stem else ""
        pair = named if named in PAIRS else None
    features = [MergeInput(p.stem, layout.prefix_of(pair, p.stem) if pair else p.stem, (lambda p=p: str(p)))
                for p in files if p != t]
    return MergeInput(t.stem, "", lambda: str(t)), features


def targets_rows(settings: Settings, manifest: Manifest) -> int:
    """The targets checkpoint's row count, from its footer (the rows every method must write)."""
    import pyarrow.parquet as pq

    from bqx.gcp import storage

    blob = storage.bucket(settings, settings.staging_bucket).blob(manifest.targets.checkpoint)
    with blob.open("rb", chunk_size=READ_CHUNK) as f:
        pf = pq.ParquetFile(f)
        if KEY not in pf.schema_arrow.names:
            raise BadCheckpoint(f"{manifest.targets.name}: no {KEY}")
        return pf.metadata.num_rows


READ_CHUNK = 4 * 1024 * 1024

# ---------------------------------------------------------------------------------------------- the output schema


def assemble_schema(targets: Iterable[pa.Field], features: Iterable[tuple[str, Iterable[pa.Field]]]) -> pa.Schema:
    """The merged file's schema: the key, the targets' value columns, then each feature table's value columns
    named `<prefix>_<column>`, in the order given. Names that collide are a terminal error."""
    import pyarrow as pa

    from bqx.parquet.conventions import KEY_TYPE

    fields = [pa.field(KEY, KEY_TYPE), *(f for f in targets if f.name != KEY)]
    for prefix, columns in features:
        fields += [pa.field(f"{prefix}_{f.name}", f.type) for f in columns if f.name != KEY]
    schema = pa.schema(fields)
    if len(set(schema.names)) != len(schema.names):
        raise TerminalError("merged column names collide; table prefixes must be unique")
    return schema


def output_schema(manifest: Manifest) -> pa.Schema:
    """The merged file's schema from the manifest's column types (polars, bigquery; the stream merge reads the
    same from the checkpoints' footers)."""
    import pyarrow as pa

    from bqx.parquet.conventions import from_type_name

    def typed(t: Any) -> list[pa.Field]:
        return [pa.field(c.name, from_type_name(c.type)) for c in t.value_columns]

    return assemble_schema(typed(manifest.targets),
                           ((layout.prefix_of(manifest.pair, t.name), typed(t)) for t in manifest.features))
