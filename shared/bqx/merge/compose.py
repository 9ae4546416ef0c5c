"""The zero-copy merge (issue 19): the training file is the run's checkpoints laid end to end plus one new footer.

A Parquet file may hold bytes no footer points at. When every checkpoint is aligned to the run's grid (the
extract LEFT-JOINed it onto the targets' keys: exactly the targets' rows, in their order, in row groups of the same
sizes), row group i of the training file is the key and target column chunks of the targets' row group i followed
by every feature column chunk of each checkpoint's row group i. So the file is

    targets checkpoint | feature checkpoint 1 | ... | feature checkpoint 667 | footer, length, PAR1

whose first four bytes ("PAR1") are the targets checkpoint's own. The merge reads only footers (one tail request
per checkpoint), checks alignment, and encodes the new footer: each column chunk's metadata is kept as encoded
Thrift (bqx.parquet.chunks), renamed by the pipeline's one naming rule (`<layout.prefix_of(table)>_<column>`, as
the stream merge names them) and its offsets shifted by where its checkpoint starts. Every feature checkpoint's
own key column and footer become dead bytes. Page indexes are not carried over: an OffsetIndex holds absolute page
offsets inside the data bytes, which a footer cannot shift (the stream merge drops them too); bloom filters, which
hold no offsets, are kept and their offsets shifted.

In GCS the concatenation is made by compose (32 sources a call, in a tree, in the staging bucket; the footer is
an object of its own), so no checkpoint byte passes through the job; locally (`bqx merge --from`) by appending
the files (copy_file_range). The schema and key-value metadata are the stream merge's: the same file, read back,
is value for value the stream merge's output of the same checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bqx import layout
from bqx.catalog import GRID_FILE_KEY, GRID_OBJECT_KEY, KEY, Grid, Manifest
from bqx.errors import BadCheckpoint, TerminalError
from bqx.logs import Log
from bqx.merge.plan import CountingWriter, MergeInput, MergeStats
from bqx.merge.stitch import MAGIC, FileRange, FooterGroup, column_signature, encode_footer, footer_template
from bqx.parquet.chunks import Chunk
from bqx.parquet.chunks import row_groups as chunks_of
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS

log = Log("bqx.merge.compose")

COMPOSE_SOURCES = 32  # GCS: sources per compose call
MAX_COMPONENTS = 1024  # GCS: components of one composite object
FOOTER_THREADS = 16  # footers read at once from an object store (latency-bound)
COMPOSE_THREADS = 8  # compose calls of one tree level at once
# The output's footer as the stream merge's Stitcher writes it (no page index; the Arrow schema stored).
FOOTER_OPTIONS = {**WRITER_OPTIONS, "write_page_index": False, "store_schema": False}


class Misaligned(BadCheckpoint):
    """A checkpoint that is not cut to the run's grid: the compose merge cannot use it (it names the table)."""

    def __init__(self, table: str, reason: str) -> None:
        super().__init__(f"checkpoint of table {table!r} is not aligned to the run's grid: {reason}")
        self.table = table


def keys_digest(keys: np.ndarray) -> str:
    """The grid's keys_sha256 of int64 microsecond keys (little-endian, in order)."""
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ footers
@dataclass(frozen=True)
class Source:
    """One checkpoint as the compose merge reads it: `read(start, end)` returns its bytes [start, end)."""

    table: str
    prefix: str  # "" for the targets: their columns keep their names
    size: int
    read: Callable[[int, int], bytes]
    tail_guess: int = 0  # bytes of the first tail request (0: the last 8 bytes, then exactly the footer)
    tag: str | None = None  # its object metadata GRID_OBJECT_KEY (None: a local file, which has none)


@dataclass
class Footer:
    """What the compose merge needs of one checkpoint's footer."""

    source: Source
    schema: pa.Schema
    signatures: list[tuple]
    rows: list[int]  # per row group
    key_stats: list[tuple[Any, Any] | None]  # (min, max) of the key per row group, if recorded
    grid: str  # its GRID_FILE_KEY
    groups: list[list[Chunk]]
    bytes_read: int


def read_footer(src: Source) -> Footer:
    """`src`'s footer, in one tail request when `tail_guess` covers it (else one more for the rest)."""
    n = min(src.size, src.tail_guess or 8)
    tail = src.read(src.size - n, src.size)
    got = len(tail)
    if src.size < 12 or tail[-4:] != MAGIC:
        raise BadCheckpoint(f"{src.table}: not a Parquet file")
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 12 > src.size:
        raise BadCheckpoint(f"{src.table}: footer length {length} exceeds the file ({src.size} bytes)")
    if length + 8 > len(tail):
        more = src.read(src.size - 8 - length, src.size - len(tail))
        got += len(more)
        tail = more + tail
    footer = tail[len(tail) - 8 - length : len(tail) - 8]
    try:
        pf = pq.ParquetFile(pa.BufferReader(footer + tail[-8:]))  # the footer alone is a readable "file" of it
        meta, schema, pschema = pf.metadata, pf.schema_arrow, pf.schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadCheckpoint(f"{src.table}: unreadable Parquet footer ({exc})") from exc
    if KEY not in schema.names:
        raise BadCheckpoint(f"{src.table}: no {KEY} column")
    k = schema.get_field_index(KEY)
    stats = []
    for r in range(meta.num_row_groups):
        st = meta.row_group(r).column(k).statistics
        stats.append((st.min, st.max) if st is not None and st.has_min_max else None)
    kv = meta.metadata or {}
    return Footer(src, schema, [column_signature(pschema, i) for i in range(len(pschema))],
                  [meta.row_group(r).num_rows for r in range(meta.num_row_groups)], stats,
                  kv.get(GRID_FILE_KEY.encode(), b"").decode(), chunks_of(footer), got)


def check_aligned(fp: Footer, grid: Grid, targets: Footer | None = None) -> None:
    """Refuse (Misaligned, naming the table) a checkpoint that is not cut to `grid`: its digests (object and file
    metadata) must be the grid's, its row groups exactly the grid's, its key statistics the targets'."""
    table = fp.source.table
    if fp.source.tag is not None and fp.source.tag != grid.keys_sha256:
        raise Misaligned(table, f"object metadata {GRID_OBJECT_KEY}={fp.source.tag[:16] or '(none)'}..., "
                                f"the grid's is {grid.keys_sha256[:16]}...")
    if fp.grid != grid.keys_sha256:
        raise Misaligned(table, f"Parquet metadata {GRID_FILE_KEY}={fp.grid[:16] or '(none)'}..., "
                                f"the grid's is {grid.keys_sha256[:16]}...")
    if tuple(fp.rows) != grid.row_groups:
        raise Misaligned(table, f"row groups of {_sizes(fp.rows)} rows, the grid's are {_sizes(grid.row_groups)}")
    if fp.schema.field(KEY).type != KEY_TYPE:
        raise Misaligned(table, f"{KEY} is {fp.schema.field(KEY).type}, not {KEY_TYPE}")
    if targets is not None:
        for r, (mine, theirs) in enumerate(zip(fp.key_stats, targets.key_stats, strict=True)):
            if mine is not None and theirs is not None and mine != theirs:
                raise Misaligned(table, f"row group {r} spans keys {mine[0]}..{mine[1]}, the targets' "
                                        f"{theirs[0]}..{theirs[1]}")


def _sizes(rows: Any) -> str:
    rows = list(rows)
    return str(rows) if len(rows) <= 6 else f"[{', '.join(map(str, rows[:5]))}, ... ({len(rows)} groups)]"


# ------------------------------------------------------------------------------------------------ the footer
@dataclass
class Plan:
    """The training file as the concatenation of the checkpoints (in this order) and `tail` (footer, length,
    PAR1)."""

    sources: list[Source]
    tail: bytes
    schema: pa.Schema
    rows: int
    row_groups: int
    bytes_read: int

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sources) + len(self.tail)


def output_schema(targets: pa.Schema, features: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """The stream merge's output schema (bqx.merge.stream._output_schema): the key, the targets' columns, then each
    feature table's value columns named `<prefix>_<column>`."""
    fields = [pa.field(KEY, KEY_TYPE), *(f for f in targets if f.name != KEY)]
    for prefix, schema in features:
        fields += [pa.field(f"{prefix}_{f.name}", f.type) for f in schema if f.name != KEY]
    out = pa.schema(fields)
    if len(set(out.names)) != len(out.names):
        raise TerminalError("merged column names collide; table prefixes must be unique")
    return out


def plan(targets: Footer, features: list[Footer], grid: Grid, metadata: dict[str, str] | None = None) -> Plan:
    """Check every footer against `grid` and encode the training file's footer."""
    for fp in [targets, *features]:
        check_aligned(fp, grid, targets)
    schema = output_schema(targets.schema, [(f.source.prefix, f.schema) for f in features])
    expected = _expected_signatures(schema)
    out_signature = dict(zip(schema.names, expected, strict=True))
    # Each table's encoded chunks must be exactly what the output's schema declares for these columns.
    for fp in [targets, *features]:
        for name, sig in zip(fp.schema.names, fp.signatures, strict=True):
            if fp.source.prefix and name == KEY:
                continue  # not carried over
            out = f"{fp.source.prefix}_{name}" if fp.source.prefix else name
            if out_signature[out] != sig:
                raise Misaligned(fp.source.table, f"column {name} is encoded as {sig}, the output declares "
                                                  f"{out_signature[out]}")
    groups = []
    base = targets.source.size
    offsets = [0]
    for fp in features:
        offsets.append(base)
        base += fp.source.size
    for g, rows in enumerate(grid.row_groups):
        if not rows:
            continue
        encoded: list[bytes] = []
        sizes = [0, 0]
        by_path = {c.path: c for c in targets.groups[g]}
        key = by_path.get(KEY)
        if key is None or len(by_path) != len(targets.schema):
            raise BadCheckpoint(f"{targets.source.table}: row group {g}'s column chunks do not match its schema")
        for name in [KEY, *(n for n in targets.schema.names if n != KEY)]:
            c = by_path[name]
            encoded.append(c.prepare(name).at(0))
            sizes[0] += c.uncompressed
            sizes[1] += c.compressed
        for fp, delta in zip(features, offsets[1:], strict=True):
            by_path = {c.path: c for c in fp.groups[g]}
            if len(by_path) != len(fp.schema) or set(by_path) != set(fp.schema.names):
                raise Misaligned(fp.source.table, f"row group {g}'s column chunks do not match its schema")
            for name in fp.schema.names:
                if name == KEY:
                    continue  # the targets' key leads the row group: this one is dead bytes
                c = by_path[name]
                encoded.append(c.prepare(f"{fp.source.prefix}_{name}").at(delta))
                sizes[0] += c.uncompressed
                sizes[1] += c.compressed
        groups.append(FooterGroup(encoded, rows, key.start, sizes[0], sizes[1]))
    footer = encode_footer(footer_template(schema, FOOTER_OPTIONS), groups,
                           {"bqx.rows": str(grid.rows), **(metadata or {})})
    return Plan([targets.source, *(f.source for f in features)], footer + struct.pack("<I", len(footer)) + MAGIC,
                schema, grid.rows, len(groups), sum(f.bytes_read for f in [targets, *features]))


_SIGNATURES: dict[tuple, tuple] = {}


def _expected_signatures(schema: pa.Schema) -> list[tuple]:
    """column_signature of each column as the output's writer declares it (by type: names change nothing)."""
    todo = {(f.type, f.nullable) for f in schema} - _SIGNATURES.keys()
    if todo:
        probe = pa.schema([pa.field(f"c{i}", t, n) for i, (t, n) in enumerate(sorted(todo, key=str))])
        buf = pa.BufferOutputStream()
        pq.write_table(probe.empty_table(), buf, **FOOTER_OPTIONS)  # type: ignore[arg-type]
        ps = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
        for i, tn in enumerate(sorted(todo, key=str)):
            _SIGNATURES[tn] = column_signature(ps, i)
    return [_SIGNATURES[(f.type, f.nullable)] for f in schema]


def _footers(sources: list[Source], threads: int, progress: Callable[[int, int], None] | None = None
             ) -> list[Footer]:
    done = [0]

    def one(src: Source) -> Footer:
        fp = read_footer(src)
        done[0] += 1
        if progress:
            progress(done[0], len(sources))
        return fp

    if threads <= 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(threads, thread_name_prefix="compose-footers") as pool:
        return list(pool.map(one, sources))


def _stats(p: Plan, started: float) -> MergeStats:
    return MergeStats(rows=p.rows, columns=len(p.schema), tables=len(p.sources), row_groups=p.row_groups,
                      bytes=p.size, seconds=time.time() - started, group_rows=max(p.rows // max(p.row_groups, 1), 1),
                      copied_tables=len(p.sources), bytes_read=p.bytes_read)


# ------------------------------------------------------------------------------------------------ local files
def local_source(inp: MergeInput) -> Source:
    path = inp.open()
    if not isinstance(path, str | os.PathLike):
        raise TerminalError(f"{inp.table}: the local compose merge needs a file path")
    size = os.path.getsize(path)

    def read(start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    return Source(inp.table, inp.prefix, size, read)


def local_grid(targets: MergeInput) -> Grid | None:
    """The grid a local targets file is cut to: its row groups, and the digest it carries when that is the digest
    of its keys (which it reads: the key column only). None: the file names no grid, or one it does not hold."""
    pf = pq.ParquetFile(os.fspath(targets.open()))  # type: ignore[arg-type]
    try:
        tag = (pf.metadata.metadata or {}).get(GRID_FILE_KEY.encode(), b"").decode()
        if not tag or not pf.metadata.num_rows or KEY not in pf.schema_arrow.names:
            return None
        keys = pf.read(columns=[KEY]).column(KEY)
        if keys.null_count or keys.type != KEY_TYPE:
            return None
        if keys_digest(keys.cast(pa.int64()).to_numpy()) != tag:
            return None
        return Grid(pf.metadata.num_rows, tuple(pf.metadata.row_group(r).num_rows
                                                for r in range(pf.metadata.num_row_groups)), tag)
    finally:
        pf.close()


def local_aligned(targets: MergeInput, features: list[MergeInput]) -> Grid | None:
    """The grid, when the targets file holds one and every feature file names it (their file metadata, read from
    the footers); else None (the stream merge)."""
    grid = local_grid(targets)
    if grid is None:
        return None
    for inp in features:
        md = pq.read_metadata(os.fspath(inp.open()))  # type: ignore[arg-type]
        if (md.metadata or {}).get(GRID_FILE_KEY.encode(), b"").decode() != grid.keys_sha256:
            return None
    return grid


def merge_local(targets: MergeInput, features: list[MergeInput], sink: BinaryIO, grid: Grid,
                metadata: dict[str, str] | None = None,
                progress: Callable[[int, int], None] | None = None) -> MergeStats:
    """The compose merge of local checkpoint files into `sink`: the files appended as they are (copy_file_range
    between two local files), then the new footer."""
    started = time.time()
    sources = [local_source(i) for i in [targets, *features]]
    fps = _footers(sources, 1)
    p = plan(fps[0], fps[1:], grid, metadata)
    out = CountingWriter(sink)
    for i, src in enumerate(p.sources):
        with open(os.fspath([targets, *features][i].open()), "rb") as f:  # type: ignore[arg-type]
            if os.fstat(f.fileno()).st_size != src.size:
                raise BadCheckpoint(f"{src.table}: changed while being merged")
            out.copy_range(FileRange(f, 0, src.size))
        if progress:
            progress(i + 1, len(p.sources))
    out.write(p.tail)
    stats = _stats(p, started)
    stats.bytes = out.size
    return stats


# ------------------------------------------------------------------------------------------------ GCS
def tail_guess(columns: list[str], row_groups: int) -> int:
    """Bytes that most likely hold a checkpoint's whole footer (one request): per column its schema element, its
    ColumnChunk in each row group and its Arrow schema entry, each mostly its name; a footer longer than this
    costs one more request, a shorter one reads a few bytes of data for nothing."""
    return 1024 + sum((3 + row_groups) * len(c) + 60 + 60 * row_groups for c in columns)


def object_grid_tag(blob: Any) -> str:
    return (blob.metadata or {}).get(GRID_OBJECT_KEY, "") if blob is not None else ""


def aligned_run(manifest: Manifest, blobs: dict[str, Any]) -> str:
    """Why the run's checkpoints cannot be composed ("" if they can): the manifest has no grid, or a checkpoint
    (listed in `blobs`, name -> blob) does not carry the grid's digest."""
    if manifest.grid is None:
        return "the manifest has no grid (an unaligned run)"
    if not manifest.grid.rows:
        return "the grid has no rows"
    for t in manifest.tables:
        tag = object_grid_tag(blobs.get(t.checkpoint))
        if tag != manifest.grid.keys_sha256:
            return f"checkpoint of table {t.name!r} is not aligned ({GRID_OBJECT_KEY}={tag[:16] or '(none)'})"
    return ""


def gcs_sources(settings: Any, manifest: Manifest, blobs: dict[str, Any]) -> list[Source]:
    """The run's checkpoints (targets first, then the features in manifest order), each pinned to the generation
    it was listed with."""
    from bqx.gcp import storage
    from bqx.gcp.objectfile import download

    bucket = storage.bucket(settings, settings.staging_bucket)
    groups = len(manifest.grid.row_groups) if manifest.grid else 1
    out = []
    for t in [manifest.targets, *manifest.features]:
        b = blobs[t.checkpoint]
        pinned = bucket.blob(t.checkpoint, generation=int(b.generation))
        prefix = "" if t.role == "targets" else layout.prefix_of(manifest.pair, t.name)
        out.append(Source(t.name, prefix, int(b.size or 0), lambda s, e, blob=pinned: download(blob, s, e),
                          tail_guess(["ARROW:schema", *(c.name for c in t.columns)], groups), object_grid_tag(b)))
    return out


@dataclass
class Composed:
    stats: MergeStats
    blob: Any  # the composed training file (staging bucket), to be published
    plan: Plan


def merge_gcs(settings: Any, manifest: Manifest, blobs: dict[str, Any], metadata: dict[str, str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Composed:
    """Compose the run's training file in the staging bucket (layout.compose_output); nothing is published here.
    `blobs`: the run's checkpoints as listed (name -> blob with size, generation, metadata)."""
    from bqx.gcp import storage

    started = time.time()
    grid = manifest.grid
    if grid is None:
        raise TerminalError(f"run {manifest.run_id} has no grid: its checkpoints cannot be composed")
    pair, run_id = manifest.pair, manifest.run_id
    sources = gcs_sources(settings, manifest, blobs)
    for src in sources:  # cheap checks first: a checkpoint that says it is not aligned is refused before reading
        if src.tag != grid.keys_sha256:
            raise Misaligned(src.table, f"object metadata {GRID_OBJECT_KEY}={(src.tag or '(none)')[:16]}, the "
                                        f"grid's is {grid.keys_sha256[:16]}...")
    components = sum(int(getattr(blobs[t.checkpoint], "component_count", None) or 1) for t in manifest.tables) + 1
    if components > MAX_COMPONENTS:
        raise TerminalError(f"run {run_id}: {components} components, over GCS's {MAX_COMPONENTS} for one object")
    fps = _footers(sources, FOOTER_THREADS, progress)
    p = plan(fps[0], fps[1:], grid, metadata)
    bucket = storage.bucket(settings, settings.staging_bucket)
    footer = bucket.blob(layout.compose_footer(pair, run_id))
    footer.upload_from_string(p.tail, content_type="application/octet-stream")
    parts: list[str] = []
    try:
        srcs = [bucket.blob(t.checkpoint, generation=int(blobs[t.checkpoint].generation))
                for t in [manifest.targets, *manifest.features]]
        srcs.append(bucket.blob(footer.name, generation=int(footer.generation)))
        out = compose_tree(bucket, srcs, layout.compose_output(pair, run_id),
                           lambda level, i: layout.compose_part(pair, run_id, level, i), parts)
    finally:
        delete_quietly(bucket, [*parts, footer.name])
    if int(out.size) != p.size:
        raise BadCheckpoint(f"composed {out.name} has {out.size} bytes, the plan {p.size}")
    stats = _stats(p, started)
    log.info("training file composed", pair=pair, run_id=run_id, sources=len(srcs), parts=len(parts),
             bytes=p.size, bytes_read=p.bytes_read, seconds=round(stats.seconds, 2))
    return Composed(stats, out, p)


def compose_tree(bucket: Any, sources: list[Any], name: str, part_name: Callable[[int, int], str],
                 parts: list[str], fan_in: int = COMPOSE_SOURCES) -> Any:
    """Compose `sources` (blobs, in order) into object `name`: at most `fan_in` sources a call, so in a tree whose
    intermediate objects (named by part_name(level, index)) are appended to `parts` for the caller to delete."""
    level = 0
    while len(sources) > fan_in:
        level += 1
        batches = [sources[i : i + fan_in] for i in range(0, len(sources), fan_in)]
        names = [part_name(level, i) for i in range(len(batches))]
        parts.extend(names)

        def one(job: tuple[str, list[Any]]) -> Any:
            dest = bucket.blob(job[0])
            dest.content_type = "application/octet-stream"
            dest.compose(job[1])
            return bucket.blob(dest.name, generation=int(dest.generation))

        with ThreadPoolExecutor(min(COMPOSE_THREADS, len(batches)), thread_name_prefix="compose") as pool:
            sources = list(pool.map(one, zip(names, batches, strict=True)))
    dest = bucket.blob(name)
    dest.content_type = "application/vnd.apache.parquet"
    dest.compose(sources)
    return dest


def delete_quietly(bucket: Any, names: list[str]) -> None:
    """Best effort: what is left is cleaned up by the next attempt (cleanup) or is harmless staging data."""
    from google.api_core import exceptions as gexc

    for n in names:
        try:
            bucket.blob(n).delete()
        except gexc.NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            log.warning(f"could not delete {n}: {exc}")


def cleanup(settings: Any, pair: str, run_id: str) -> list[str]:
    """Delete everything the compose merge left for the run (after publishing, or a killed attempt's leftovers)."""
    from bqx.gcp import storage

    names = sorted(storage.list_names(settings, settings.staging_bucket, layout.compose_prefix(pair, run_id)))
    delete_quietly(storage.bucket(settings, settings.staging_bucket), names)
    return names

