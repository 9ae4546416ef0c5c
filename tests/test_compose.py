"""The compose merge (issue 19, bqx.merge.compose): aligned checkpoints laid end to end plus one new footer.

Aligned checkpoints are built here as the extract writes them (LEFT-JOINed onto the targets' keys, row groups at the
grid's boundaries, WRITER_OPTIONS, the grid's digest in the file's and the object's metadata). The composed file must
read back, in pyarrow, DuckDB and Polars, exactly as the stream merge of the same checkpoints does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.client import HTTPConnection
from http.server import ThreadingHTTPServer
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bqx import footer_index, layout
from bqx.catalog import GRID_FILE_KEY, GRID_OBJECT_KEY, KEY, Column, Grid, Manifest, TableEntry
from bqx.cli import main as cli
from bqx.errors import TerminalError
from bqx.gcp import storage
from bqx.local.servers import KeepAliveHandler
from bqx.merge import compose, publish
from bqx.merge.plan import MergeInput, local_inputs
from bqx.merge.stream import merge
from bqx.parquet.chunks import row_groups
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS, type_name, write_checkpoint
from bqx.parquet.tails import FooterIndex, KeptFooter, KeptFooters, TailKeeper, parse_index

from fakes import apply_env, create_buckets, fake_gcs_server, gcs_env, local_settings, validate_all

PAIR = "eurusd"
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ checkpoints
def _targets(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00", "us").astype(np.int64)
    keys = start + np.cumsum(rng.integers(1, 4, rows)) * 60_000_000
    a = rng.normal(size=rows)
    a[::17] = np.nan
    return pa.table({KEY: pa.array(keys, pa.int64()).cast(KEY_TYPE),
                     "target_bqx45_h15": pa.array(a, mask=(np.arange(rows) % 23 == 5)),
                     "target_bqx90_h30": pa.array(rng.normal(size=rows))})


def _feature(keys: pa.Array, seed: int) -> pa.Table:
    """A feature table with rows for some of the keys only, and NaNs, nulls, ints, strings and booleans."""
    rng = np.random.default_rng(seed)
    n = len(keys)
    have = np.sort(rng.choice(n, size=max(1, int(n * 0.8)), replace=False))
    m = len(have)
    x = rng.normal(size=m)
    x[rng.integers(0, m, max(1, m // 20))] = np.nan
    return pa.table({KEY: keys.take(pa.array(have)),
                     "value": pa.array(x, mask=rng.random(m) < 0.05),
                     "count": pa.array(rng.integers(-5, 5, m), pa.int64()),
                     "label": pa.array([f"s{v}" for v in rng.integers(0, 9, m)], mask=rng.random(m) < 0.1),
                     "up": pa.array(rng.random(m) < 0.5)})


def _aligned(keys: pa.Table, table: pa.Table) -> pa.Table:
    """LEFT JOIN onto the targets' keys, in their order (what the aligned extract writes)."""
    joined = keys.join(table, KEY, join_type="left outer").sort_by(KEY)
    return joined.select(table.column_names).cast(table.schema)


def _write(path: Path, table: pa.Table, row_group: int, digest: str | None, stored_schema: bool = False) -> None:
    meta = {"bqx.pair": PAIR, "bqx.table": path.stem}
    if digest is not None:
        meta[GRID_FILE_KEY] = digest
    table = table.replace_schema_metadata(meta)
    if stored_schema:  # as the extract wrote them before checkpoints stopped storing the Arrow schema
        pq.write_table(table, path, row_group_size=row_group, **WRITER_OPTIONS)
    else:
        write_checkpoint(table, path, row_group)


def build(directory: Path, tables: int, rows: int, row_group: int, seed: int = 1,
          misaligned: dict[int, str] | None = None, stored_schema: bool = False) -> tuple[Grid, list[Path]]:
    """Aligned checkpoints of `tables` feature tables in `directory` (targets first in the returned list), written
    as the extract writes them (no stored Arrow schema, unless `stored_schema`: an earlier version's checkpoints).
    `misaligned`: feature index -> 'row_groups' | 'digest' | 'no_digest' for a checkpoint that is not."""
    directory.mkdir(parents=True, exist_ok=True)
    t = _targets(rows, seed)
    digest = compose.keys_digest(t.column(KEY).cast(pa.int64()).to_numpy())
    groups = tuple(min(row_group, rows - s) for s in range(0, rows, row_group))
    grid = Grid(rows, groups, digest)
    paths = [directory / f"targets_{PAIR}.parquet"]
    _write(paths[0], t, row_group, digest, stored_schema)
    keys = t.select([KEY])
    for i in range(tables):
        p = directory / f"f{i % 7}_{PAIR}_t{i:03d}.parquet"
        f = _aligned(keys, _feature(t.column(KEY).combine_chunks(), seed * 1000 + i))
        how = (misaligned or {}).get(i)
        _write(p, f, row_group + 1 if how == "row_groups" else row_group,
               {"digest": "0" * 64, "no_digest": None}.get(how or "", digest), stored_schema)  # type: ignore[arg-type]
        paths.append(p)
    return grid, [paths[0], *sorted(paths[1:])]  # the order bqx merge --from takes them in (names)


def stream_reference(directory: Path, metadata: dict[str, str] | None = None) -> bytes:
    t, features = local_inputs(directory, pair=PAIR)
    sink = io.BytesIO()
    merge(t, features, sink, memory_budget=64 << 20, workers=1, metadata=metadata)
    return sink.getvalue()


def composed_local(directory: Path) -> bytes:
    t, features = local_inputs(directory, pair=PAIR)
    grid = compose.local_grid(t)
    assert grid is not None
    sink = io.BytesIO()
    compose.merge_local(t, features, sink, grid)
    return sink.getvalue()


def assert_same_values(a: pa.Table, b: pa.Table) -> None:
    """Every column, value, null and NaN (pa.Table.equals treats NaN as unequal to NaN)."""
    assert a.schema.names == b.schema.names
    assert a.num_rows == b.num_rows
    for name in a.schema.names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        assert x.type == y.type, name
        assert x.is_null().equals(y.is_null()), name
        if pa.types.is_floating(x.type):
            xs, ys = x.fill_null(0).to_numpy(), y.fill_null(0).to_numpy()
            assert np.array_equal(np.isnan(xs), np.isnan(ys)), name
            assert np.array_equal(xs, ys, equal_nan=True), name
        else:
            assert x.equals(y), name


# ------------------------------------------------------------------------------------------------ local
@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("aligned")
    grid, paths = build(d, tables=12, rows=2000, row_group=700)
    return {"dir": d, "grid": grid, "paths": paths, "composed": composed_local(d), "stream": stream_reference(d)}


def test_composed_file_is_the_checkpoints_laid_end_to_end_plus_a_footer(local: dict) -> None:
    data = local["composed"]
    body = b"".join(p.read_bytes() for p in local["paths"])
    assert data[: len(body)] == body  # not one checkpoint byte changed, none left out
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    footer_len = int.from_bytes(data[-8:-4], "little")
    assert len(data) == len(body) + footer_len + 8


def test_composed_file_reads_as_the_stream_merge_in_pyarrow(local: dict) -> None:
    composed, stream = pq.read_table(io.BytesIO(local["composed"])), pq.read_table(io.BytesIO(local["stream"]))
    assert composed.schema == stream.schema  # names (the naming rule), types and the stored Arrow schema
    assert_same_values(composed, stream)
    assert composed.num_columns == 1 + 2 + 12 * 4
    assert "cnt" not in composed.column_names and "f3_t003_label" in composed.column_names
    nulls = composed.column("f0_t000_value").null_count
    assert nulls > 2000 * 0.2  # the rows the feature lacks are null (the LEFT JOIN), besides its own nulls
    assert np.isnan(composed.column("f0_t000_value").to_numpy(zero_copy_only=False)).any()


def test_composed_file_reads_the_same_in_duckdb_and_polars(local: dict, tmp_path: Path) -> None:
    import duckdb
    import polars as pl

    path = tmp_path / "composed.parquet"
    path.write_bytes(local["composed"])
    reference = pq.read_table(io.BytesIO(local["stream"]))
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    from_duckdb = con.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_table()
    from_polars = pl.read_parquet(path).to_arrow()
    for other in (from_duckdb, from_polars):
        assert other.column_names == reference.column_names
        assert other.num_rows == reference.num_rows
        cast = pa.table({n: other.column(n).cast(reference.schema.field(n).type) for n in reference.column_names})
        assert_same_values(cast, reference)
    # DuckDB also reads row groups by themselves (the footer's offsets, not just a sequential scan)
    n = con.execute(f"SELECT count(*) FROM read_parquet('{path}') WHERE {KEY} > "
                    f"(SELECT min({KEY}) FROM read_parquet('{path}')) + INTERVAL 1 DAY").fetchone()[0]
    assert n == pa.compute.sum(pa.compute.greater(reference.column(KEY),
                                                  pa.scalar(reference.column(KEY)[0].as_py() +
                                                            __import__("datetime").timedelta(days=1),
                                                            KEY_TYPE))).as_py()


def test_composed_metadata_row_groups_statistics_and_sizes(local: dict) -> None:
    data = local["composed"]
    c = pq.ParquetFile(io.BytesIO(data)).metadata
    s = pq.ParquetFile(io.BytesIO(local["stream"])).metadata
    grid = local["grid"]
    assert c.num_rows == s.num_rows == grid.rows
    assert [c.row_group(r).num_rows for r in range(c.num_row_groups)] == list(grid.row_groups)
    assert c.metadata == s.metadata  # key-value metadata: the Arrow schema and bqx.rows, as the stream merge's
    assert c.schema.equals(s.schema)
    # Each column chunk is its checkpoint's, moved: same sizes, statistics and encodings; its data page where the
    # checkpoint's landed in the file.
    paths = local["paths"]
    starts = np.cumsum([0, *(p.stat().st_size for p in paths)])
    out_col = 0
    for k, p in enumerate(paths):
        m = pq.ParquetFile(p).metadata
        names = [m.schema.column(i).name for i in range(m.num_columns)]
        keep = [i for i, n in enumerate(names) if k == 0 or n != KEY]
        if k == 0:
            keep = [names.index(KEY), *(i for i in keep if names[i] != KEY)]
        for r in range(c.num_row_groups):
            src, dst = m.row_group(r), c.row_group(r)
            for j, i in enumerate(keep):
                sc, cc = src.column(i), dst.column(out_col + j)
                assert cc.path_in_schema == (names[i] if k == 0 else f"{layout.prefix_of(PAIR, p.stem)}_{names[i]}")
                assert (cc.total_compressed_size, cc.total_uncompressed_size, cc.encodings, cc.compression) == \
                       (sc.total_compressed_size, sc.total_uncompressed_size, sc.encodings, sc.compression)
                assert cc.statistics == sc.statistics
                assert cc.data_page_offset == sc.data_page_offset + starts[k]
                assert data[cc.data_page_offset : cc.data_page_offset + cc.total_compressed_size] == \
                       p.read_bytes()[sc.data_page_offset : sc.data_page_offset + sc.total_compressed_size]
        out_col += len(keep)
    assert out_col == c.num_columns
    for r in range(c.num_row_groups):
        rg = c.row_group(r)
        assert rg.total_byte_size == sum(rg.column(i).total_uncompressed_size for i in range(rg.num_columns))
        key = rg.column(0)
        assert key.path_in_schema == KEY and key.statistics.has_min_max and key.statistics.min <= key.statistics.max


def test_cli_merges_aligned_files_by_compose_and_others_by_stream(local: dict, tmp_path: Path) -> None:
    out = tmp_path / "training.parquet"
    r = CliRunner().invoke(cli, ["merge", "--from", str(local["dir"]), "--to", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == local["composed"]
    assert json.loads(r.output)["copied_tables"] == 13
    r = CliRunner().invoke(cli, ["merge", "--from", str(local["dir"]), "--to", str(out), "--method", "stream"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == local["stream"]


# The composed bytes of fixed inputs before the light footer walk (issue 19, making the compose merge fast): the walk
# must encode byte for byte what the pyarrow + Chunk.prepare reading did. Recorded with pyarrow 26.0.1 (its version
# is in the checkpoints' and the output's created_by).
COMPOSED_SHA256 = {
    (12, 2000, 700, 1): "4a409ca3362c3c4c6ecf6bd93e3d7bfd767d6c106dd2f7e6fcb24ec59bfe9c0f",
    (40, 3000, 1000, 7): "27b1facb4a2814629400564014885cfe61913e9087928cffbee745dc15331de0",
}


@pytest.mark.skipif(pa.__version__ != "26.0.1", reason="the recorded bytes were written by pyarrow 26.0.1")
@pytest.mark.parametrize("shape", sorted(COMPOSED_SHA256))
def test_composed_bytes_are_those_recorded_before_the_light_footer_walk(shape: tuple, tmp_path: Path) -> None:
    tables, rows, row_group, seed = shape
    # the inputs as they were recorded: checkpoints with a stored Arrow schema (the light walk reads both kinds)
    build(tmp_path, tables=tables, rows=rows, row_group=row_group, seed=seed, stored_schema=True)
    data = composed_local(tmp_path)
    assert hashlib.sha256(data).hexdigest() == COMPOSED_SHA256[shape]


@pytest.mark.parametrize("options", [{}, {"write_statistics": True}, {"write_page_index": True},
                                     {"use_dictionary": True, "write_statistics": True}])
def test_light_footer_walk_encodes_what_chunk_prepare_does(options: dict, tmp_path: Path) -> None:
    """Every column chunk moved by the light walk is byte for byte bqx.parquet.chunks' Chunk.prepare(name).at(delta),
    whatever the writer put in it (statistics of every column, page indexes, dictionary pages)."""
    t = _targets(1500, 3)
    f = _aligned(t.select([KEY]), _feature(t.column(KEY).combine_chunks(), 9))
    path = tmp_path / "f.parquet"
    pq.write_table(f, path, row_group_size=400, **{**WRITER_OPTIONS, **options})
    src = compose.local_source(MergeInput("f", "p", lambda: str(path)))
    fp = compose.read_footer(src)
    assert fp.elements, "read by the light walk, not the general one"
    data = path.read_bytes()
    footer = data[-8 - int.from_bytes(data[-8:-4], "little") : -8]
    reference = row_groups(footer)
    assert [len(g) for g in fp.groups] == [len(g) for g in reference] == [5, 5, 5, 5]
    for mine, theirs in zip(fp.groups, reference, strict=True):
        for c, chunk in zip(mine, theirs, strict=True):
            assert (c.path, c.start, c.uncompressed, c.compressed) == \
                   (chunk.path, chunk.start, chunk.uncompressed, chunk.compressed)
            for name, delta in (("p_" + c.path, 123_456_789), (c.path, 0), ("x" * 200, 7)):
                assert c.encode(name, delta) == chunk.prepare(name).at(delta)


@pytest.mark.parametrize("stored_schema", [False, True])
def test_the_light_walk_and_pyarrows_reading_give_the_same_footer(tmp_path: Path, stored_schema: bool) -> None:
    """Checkpoints with no stored Arrow schema (as the extract writes them) or with one (an earlier version's) are
    read by the light footer walk; any other writer's shape is read by pyarrow (the general way). Both readings
    give the same schemas, row groups, key statistics and the same training file footer."""
    grid, paths = build(tmp_path, tables=3, rows=500, row_group=200, stored_schema=stored_schema)
    assert (b"ARROW:schema" in (pq.read_metadata(paths[1]).metadata or {})) == stored_schema
    t, features = local_inputs(tmp_path, pair=PAIR)
    sources = [compose.local_source(i) for i in [t, *features]]
    light = [compose.read_footer(src) for src in sources]
    assert all(fp.elements for fp in light)  # the light walk read every one
    general = []
    for src in sources:
        data = src.read(0, src.size)
        n = struct.unpack("<I", data[-8:-4])[0]
        general.append(compose._general_footer(src, data[-8 - n : -8], n + 8))
    assert not any(fp.elements for fp in general)
    for a, b in zip(light, general, strict=True):
        assert (a.schema.names, a.schema.types) == (b.schema.names, b.schema.types)
        assert a.schema.field(KEY).type == KEY_TYPE
        assert (a.rows, a.grid) == (b.rows, b.grid)
        assert [s is not None for s in a.key_stats] == [s is not None for s in b.key_stats]
    assert compose.plan(light[0], light[1:], grid).tail == compose.plan(general[0], general[1:], grid).tail
    composed = pq.read_table(io.BytesIO(composed_local(tmp_path)))
    assert_same_values(composed, pq.read_table(io.BytesIO(stream_reference(tmp_path))))


@pytest.mark.parametrize("how", ["row_groups", "digest", "no_digest"])
def test_a_misaligned_checkpoint_is_refused_and_named(tmp_path: Path, how: str) -> None:
    build(tmp_path, tables=4, rows=900, row_group=300, misaligned={2: how})
    t, features = local_inputs(tmp_path, pair=PAIR)
    grid = compose.local_grid(t)
    assert grid is not None
    sink = io.BytesIO()
    with pytest.raises(compose.Misaligned, match=f"f2_{PAIR}_t002") as exc:
        compose.merge_local(t, features, sink, grid)
    assert exc.value.table == f"f2_{PAIR}_t002"
    assert sink.getvalue() == b""  # refused before a byte is written
    # the CLI: --method compose says which table; auto merges by stream instead (the same content)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "out.parquet"
    r = CliRunner().invoke(cli, ["merge", "--from", str(tmp_path), "--to", str(out), "--method", "compose"])
    assert r.exit_code != 0 and f"f2_{PAIR}_t002" in r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, ["merge", "--from", str(tmp_path), "--to", str(out)])
    assert r.exit_code == 0, r.output
    assert not list((tmp_path / "o").glob("*.partial"))
    assert_same_values(pq.read_table(out), pq.read_table(io.BytesIO(stream_reference(tmp_path))))


def test_targets_whose_digest_is_not_their_keys_name_no_grid(tmp_path: Path) -> None:
    build(tmp_path, tables=2, rows=300, row_group=100)
    t = pq.read_table(tmp_path / f"targets_{PAIR}.parquet")
    _write(tmp_path / f"targets_{PAIR}.parquet", t, 100, "1" * 64)
    assert compose.local_grid(local_inputs(tmp_path, pair=PAIR)[0]) is None


def test_feature_keys_other_than_the_targets_are_refused(tmp_path: Path) -> None:
    """Same row counts and digest, but its own keys (statistics in the footer say so): refused, not composed."""
    grid, paths = build(tmp_path, tables=2, rows=300, row_group=100)
    f = pq.read_table(paths[1])
    shifted = f.set_column(0, KEY, pa.array(f.column(KEY).cast(pa.int64()).to_numpy() + 1).cast(KEY_TYPE))
    _write(paths[1], shifted, 100, grid.keys_sha256)
    t, features = local_inputs(tmp_path, pair=PAIR)
    with pytest.raises(compose.Misaligned, match=paths[1].stem):
        compose.merge_local(t, features, io.BytesIO(), grid)


# ------------------------------------------------------------------------------------------------ GCS
class ComposeGate:
    """An HTTP proxy in front of fake-gcs-server that counts bytes of object reads and can hold compose calls."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlparse(upstream)
        self.media_bytes = self.media_requests = 0
        self.composes = 0
        self.hold_after: int | None = None  # compose calls let through before the rest are held
        self.held = threading.Event()
        self.release = threading.Event()
        self.refuse = ""  # requests whose (unquoted) path holds this are answered 403 Forbidden
        # called with each request's (unquoted) path before it is passed on, and once the server has answered it
        self.before: Callable[[str], None] | None = None
        self.answered: Callable[[str], None] | None = None
        self.stall = threading.Event()  # while set, every request waits (a server busy composing a large object)
        self.unstalled = threading.Event()
        gate = self

        class Handler(KeepAliveHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if gate.stall.is_set():
                    gate.unstalled.wait(60)
                path = urllib.parse.unquote(self.path)
                if gate.before:
                    gate.before(path)
                if gate.refuse and gate.refuse in path:
                    data = b'{"error": {"code": 403, "message": "Forbidden"}}'
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if "/compose" in self.path:
                    gate.composes += 1
                    if gate.hold_after is not None and gate.composes > gate.hold_after:
                        gate.held.set()
                        gate.release.wait(60)
                conn = HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if gate.answered:
                    gate.answered(path)
                if "alt=media" in self.path:
                    gate.media_bytes += len(data)
                    gate.media_requests += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fake_gcs_server(tmp_path_factory.mktemp("compose-gcs")) as endpoint:
        yield endpoint


def kept_footer(path: Path) -> KeptFooter:
    """The footer the extract's TailKeeper keeps of a checkpoint file, written through it as the extract writes."""
    keeper = TailKeeper(io.BytesIO())
    data = path.read_bytes()
    for i in range(0, len(data), 100_000):
        keeper.write(data[i : i + 100_000])
    kept = keeper.footer()
    assert kept is not None
    return kept


def upload_run(settings, directory: Path, paths: list[Path], grid: Grid | None, run_id: str,  # type: ignore[no-untyped-def]
               tag: bool = True) -> Manifest:
    """The run as the extract leaves it: checkpoints (with their grid tag) and a manifest, validated."""
    entries = []
    bucket = storage.bucket(settings, settings.staging_bucket)
    for p in paths:
        name = p.stem
        schema = pq.read_schema(p)
        entry = TableEntry(name, "targets" if name.startswith("targets") else "feature",
                           tuple(Column(f.name, type_name(f.type)) for f in schema),
                           layout.checkpoint(PAIR, run_id, name))
        blob = bucket.blob(entry.checkpoint)
        tags = {GRID_OBJECT_KEY: grid.keys_sha256} if tag and grid else {}
        blob.metadata = {"run_id": run_id, "table": name, **tags}
        blob.upload_from_filename(str(p), content_type="application/vnd.apache.parquet")
        entries.append(entry)
    entries.sort(key=lambda e: e.role != "targets")
    manifest = Manifest(PAIR, run_id, tuple(entries), "test", 0, 1.0, {}, grid)
    storage.write_json(settings, settings.staging_bucket, layout.manifest(PAIR, run_id), manifest.to_json())
    validate_all(settings, manifest)
    return manifest


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """70 feature tables: 72 sources to compose (targets, 70 features, the footer), more than 2 x 32."""
    d = tmp_path_factory.mktemp("wide")
    grid, paths = build(d, tables=70, rows=600, row_group=250, seed=3)
    return {"dir": d, "grid": grid, "paths": paths, "stream": pq.read_table(io.BytesIO(stream_reference(d)))}


@pytest.fixture
def gate(gcs: str) -> Iterator[ComposeGate]:
    """A ComposeGate in front of the module's fake-gcs-server, released and closed after the test."""
    proxy = ComposeGate(gcs)
    try:
        yield proxy
    finally:
        proxy.unstalled.set()
        proxy.release.set()
        proxy.close()


def _settings(tmp_path: Path, endpoint: str, suffix: str):  # type: ignore[no-untyped-def]
    apply_env(gcs_env(endpoint))
    s = local_settings(tmp_path, endpoint, staging_bucket=f"st-{suffix}", output_bucket=f"out-{suffix}")
    create_buckets(s, s.staging_bucket, s.output_bucket)
    return s


def test_run_of_70_tables_is_composed_in_a_tree_and_published(gate: ComposeGate, wide: dict, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(tmp_path, gate.endpoint, "tree")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rtree")
    checkpoint_bytes = sum(p.stat().st_size for p in wide["paths"])
    gate.media_bytes = gate.media_requests = 0
    with caplog.at_level("INFO", logger="bqx.merge.publish"):
        summary = publish.merge_run(s, manifest, "auto")
    assert summary["method"] == "compose"
    assert gate.composes == 4  # 72 sources: 3 parts of at most 32, then one compose of the 3
    published = [r for r in caplog.records if r.getMessage() == "training file published"]
    assert len(published) == 1 and published[0].fields["peak_rss_mib"] > 50  # type: ignore[attr-defined]
    out = storage.bucket(s, s.output_bucket).get_blob(layout.output(PAIR))
    data = out.download_as_bytes()
    # GCS's checksum of the composed object (real GCS keeps no MD5 of a composite: crc32c is the one recorded)
    crc = base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()
    assert summary["crc32c"] == out.crc32c == crc
    assert_same_values(pq.read_table(io.BytesIO(data)), wide["stream"])
    assert pq.ParquetFile(io.BytesIO(data)).metadata.metadata[b"bqx.method"] == b"compose"
    assert storage.list_names(s, s.staging_bucket, layout.compose_prefix(PAIR, "rtree")) == {}  # cleaned up
    # The job read footers, not data: one tail request per checkpoint (the targets' also read by publishing's
    # row count check, up to 64 KiB), the tail sized from the manifest's column names.
    footers = sum(int.from_bytes(p.read_bytes()[-8:-4], "little") + 8 for p in wide["paths"])
    assert gate.media_requests <= len(wide["paths"]) + 3, gate.media_requests
    assert gate.media_bytes <= 1.3 * footers + (64 << 10), (gate.media_bytes, footers, checkpoint_bytes)


def test_footers_the_extract_kept_spare_the_merge_its_tail_reads(gate: ComposeGate, wide: dict,
                                                                 tmp_path: Path) -> None:
    s = _settings(tmp_path, gate.endpoint, "kept")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rkept")
    names = [t.checkpoint for t in manifest.tables]
    by_name = {layout.checkpoint(PAIR, "rkept", p.stem): p for p in wide["paths"]}
    first, second = FooterIndex(), FooterIndex()  # two tasks' indexes
    for i, name in enumerate(names[:-2]):  # the last two kept by no index (an attempt killed before saving)
        (first if i % 2 else second).add(name, kept_footer(by_name[name]))
    # a stale entry: another table's footer under this name (its size and crc32c are not the object's)
    first.footers[names[3]] = kept_footer(by_name[names[4]])
    footer_index.save(s, PAIR, "rkept", 0, first)
    footer_index.save(s, PAIR, "rkept", 1, second)
    storage.bucket(s, s.staging_bucket).blob(layout.extract_footers(PAIR, "rkept", 2, 0)).upload_from_string(
        b"{not json")  # an index that does not parse is passed over
    gate.media_bytes = gate.media_requests = 0
    summary = publish.merge_run(s, manifest, "auto")
    assert summary["method"] == "compose"
    assert summary["stats"]["footers_indexed"] == len(names) - 3
    # the three indexes, the three footers no index matched, publishing's row count check of the targets
    assert gate.media_requests <= 3 + 3 * 2 + 2, gate.media_requests
    out = storage.bucket(s, s.output_bucket).blob(layout.output(PAIR)).download_as_bytes()
    assert_same_values(pq.read_table(io.BytesIO(out)), wide["stream"])
    # what the merge says it read: the indexes and the three tails, not 1 % of the checkpoints
    indexes = sum(storage.list_names(s, s.staging_bucket, layout.extract_footers_prefix(PAIR, "rkept")).values())
    assert indexes <= summary["stats"]["bytes_read"] <= indexes + 3 * 64 * 1024


def test_footer_indexes_that_cannot_be_read_cost_tail_reads_not_the_merge(gate: ComposeGate, wide: dict,
                                                                         tmp_path: Path) -> None:
    s = _settings(tmp_path, gate.endpoint, "noidx")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rnoidx")
    index = FooterIndex()
    for p in wide["paths"]:
        index.add(layout.checkpoint(PAIR, "rnoidx", p.stem), kept_footer(p))
    footer_index.save(s, PAIR, "rnoidx", 0, index)
    gate.refuse = "/footers/"  # the indexes cannot be listed or read (a permission the deploy lacks)
    summary = publish.merge_run(s, manifest, "auto")
    assert summary["method"] == "compose" and summary["stats"]["footers_indexed"] == 0
    out = storage.bucket(s, s.output_bucket).blob(layout.output(PAIR)).download_as_bytes()
    assert_same_values(pq.read_table(io.BytesIO(out)), wide["stream"])


def test_the_kept_footer_is_the_files_tail_size_and_crc32c(tmp_path: Path) -> None:
    table = _targets(3000, 9)
    path = tmp_path / "cp.parquet"
    write_checkpoint(table, str(path), row_group_size=1000)
    data = path.read_bytes()
    kept = kept_footer(path)
    assert kept.tail == data[-len(kept.tail) :] and kept.size == len(data)
    assert int.from_bytes(data[-8:-4], "little") + 8 == len(kept.tail)
    assert kept.crc32c == base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()
    found = KeptFooters()
    found.update({"a": kept, "b": kept})
    found.update({"a": KeptFooter(kept.size + 1, "other", kept.tail)})  # another attempt's footer of "a"
    assert found.find("a", len(data), kept.crc32c) == kept and found.find("a", kept.size + 1, "other") is not None
    assert found.find("a", len(data) + 1, kept.crc32c) is None and found.find("a", len(data), None) is None
    assert found.find("c", len(data), kept.crc32c) is None
    small = TailKeeper(io.BytesIO(), keep=64)  # a footer longer than what is kept: none, the merge reads it
    small.write(data)
    assert small.footer() is None
    with pytest.raises(ValueError):
        KeptFooter(kept.size, kept.crc32c, kept.tail[1:])

    index = FooterIndex()
    index.add("a", kept)
    index.add("b", KeptFooter(kept.size + 5, "x", kept.tail))
    index.add("c", None)  # nothing kept: no entry
    raw = index.encode()
    assert parse_index(raw) == {"a": kept, "b": KeptFooter(kept.size + 5, "x", kept.tail)}
    assert parse_index(raw[: len(raw) - 3]) == {"a": kept}  # cut short: what can still be placed
    assert parse_index(b"{not an index") == {} and parse_index(raw[:10]) == {}


def test_compose_tree_keeps_order_at_every_level(gcs: str, tmp_path: Path) -> None:
    s = _settings(tmp_path, gcs, "order")
    bucket = storage.bucket(s, s.staging_bucket)
    pieces = [f"piece {i:03d};".encode() for i in range(71)]
    blobs = []
    for i, p in enumerate(pieces):
        b = bucket.blob(f"src/{i:03d}")
        b.upload_from_string(p)
        blobs.append(bucket.blob(b.name, generation=b.generation))
    parts: list[str] = []
    heard: list[int] = []
    out = compose.compose_tree(bucket, blobs, "composed", lambda lv, i: f"parts/{lv}-{i}", parts, fan_in=4,
                               on_call=heard.append)
    assert bucket.blob(out.name).download_as_bytes() == b"".join(pieces)
    assert len(parts) == 18 + 5 + 2  # 71 -> 18 -> 5 -> 2 -> 1
    # progress hears of every call, and the count it is told to expect is the count made
    assert sorted(heard) == list(range(1, 18 + 5 + 2 + 2)) == list(range(1, compose.compose_calls(71, 4) + 1))
    assert [compose.compose_calls(n) for n in (1, 32, 33, 669, 1024, 1025)] == [1, 1, 3, 22, 33, 36]


def test_compose_merge_reports_footers_read_then_compose_calls(gcs: str, wide: dict, tmp_path: Path) -> None:
    s = _settings(tmp_path, gcs, "prog")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rprog")
    listed: dict = {}
    publish.verify_checkpoints(s, manifest, listed=listed)
    heard: list[tuple[str, int, int]] = []
    composed = compose.merge_gcs(s, manifest, listed, progress=lambda d, t, step: heard.append((step, d, t)))
    footers = [(d, t) for step, d, t in heard if step == "footers read"]
    calls = [(d, t) for step, d, t in heard if step == "compose calls"]
    assert sorted(footers) == [(i, len(wide["paths"])) for i in range(1, len(wide["paths"]) + 1)]
    assert sorted(calls) == [(i, 4) for i in range(1, 5)]  # 72 sources: 3 parts, then the file
    assert heard.index(("compose calls", 1, 4)) > max(heard.index(("footers read", *f)) for f in footers)
    assert int(composed.blob.size) == composed.plan.size


def test_following_a_run_never_goes_quiet_while_storage_stalls(gate: ComposeGate, tmp_path: Path) -> None:
    """fake-gcs-server answers nothing while it composes or copies a large object (one lock for every write):
    `bqx run` still hears of the run's last state every second, so its clock line keeps moving."""
    from bqx import runs

    s = _settings(tmp_path, gate.endpoint, "stall")
    heard: list[tuple[float, str]] = []

    rs_seen: list = []

    def stall_after_first(rs) -> None:  # type: ignore[no-untyped-def]
        heard.append((time.monotonic(), rs.state, rs.storage_wait))
        rs_seen.append(rs)
        if len(heard) == 1:
            gate.stall.set()
            threading.Timer(3.5, gate.unstalled.set).start()

    with pytest.raises(TerminalError, match="still requested after 5s"):
        runs.follow(s, PAIR, "rstall", timeout=5, on_update=stall_after_first, poll=0.2)
    during = [t for t, _, _ in heard if heard[0][0] < t < heard[0][0] + 3.4]
    assert len(during) >= 3, heard  # once a second while the poll waited, not silent for 3.5 s
    assert {state for _, state, _ in heard} == {"requested"}
    assert max(w for _, _, w in heard) >= 2.0, heard  # each hears how long the poll has been waiting
    assert heard[0][2] == 0.0  # a state just read: no wait
    # what `bqx run` shows once a poll has waited 5 s: the last state, and that storage is not answering
    from bqx.cli import _progress_line

    line = _progress_line(replace(rs_seen[0], storage_wait=7.2), time.time() - 12)
    assert line == f"{PAIR}: requested; storage busy, no answer for 5s", line
    merging = replace(rs_seen[0], state="merging", storage_wait=11.0, merge_execution="x/bqx-ml-merge-1",
                      merge_progress={"done": 22, "total": 22, "step": "compose calls"})
    line = _progress_line(merging, time.time() - 12)
    assert line == f"{PAIR}: merging 22/22 compose calls (bqx-ml-merge-1) (10s); storage busy, no answer for 10s"
    assert "storage busy" not in _progress_line(rs_seen[0], time.time())


def test_following_a_run_reads_again_when_an_object_changes_while_being_read(gate: ComposeGate,
                                                                             tmp_path: Path) -> None:
    """A run's state objects (claims, error.json) are replaced while `bqx run` polls them: a read that finds the
    object it just listed gone (replaced: a claim taken over, deleted and created again) is asked again, not the
    end of following the run."""
    from bqx import runs

    s = _settings(tmp_path, gate.endpoint, "flaky")
    name = layout.run_error(PAIR, "rflaky")
    quoted = urllib.parse.quote(name, safe="")
    body = json.dumps({"error": "the extract failed"}).encode()
    storage.write_json(s, s.staging_bucket, name, json.loads(body))
    metadata_reads, gone = [], []

    def upstream(method: str, path: str, data: bytes | None = None) -> None:
        conn = HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=10)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.close()

    def back_before_the_next_read(path: str) -> None:
        if name in path and "alt=media" not in path and gone:
            upstream("POST", f"/upload/storage/v1/b/{s.staging_bucket}/o?uploadType=media&name={quoted}", body)
            gone.clear()

    def gone_once_its_metadata_is_read(path: str) -> None:  # so the download of that generation finds nothing
        if name in path and "alt=media" not in path:
            metadata_reads.append(path)
            if len(metadata_reads) in (1, 3):  # the first poll of `bqx status`, then of `bqx run`
                upstream("DELETE", f"/storage/v1/b/{s.staging_bucket}/o/{quoted}")
                gone.append(path)

    gate.before, gate.answered = back_before_the_next_read, gone_once_its_metadata_is_read
    rs = runs.state(s, PAIR, "rflaky")  # `bqx status`: read again
    assert len(metadata_reads) == 2 and rs.state == "failed" and rs.error == {"error": "the extract failed"}
    rs = runs.follow(s, PAIR, "rflaky", timeout=30, poll=0.1)  # `bqx run`
    assert len(metadata_reads) == 4 and rs.state == "failed" and rs.error == {"error": "the extract failed"}


def test_a_file_larger_than_the_gcs_can_compose_is_refused_before_any_compose(gate: ComposeGate, wide: dict,
                                                                              tmp_path: Path) -> None:
    s = _settings(tmp_path, gate.endpoint, "big")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rbig")
    total = sum(p.stat().st_size for p in wide["paths"])
    small = replace(s, compose_max_bytes=total - 1)
    with pytest.raises(TerminalError, match=r"BQX_COMPOSE_MAX_BYTES=.*bqx merge --from") as refused:
        publish.merge_run(small, manifest, "auto")
    assert f"checkpoints/{PAIR}/rbig/" in str(refused.value)
    assert refused.value.retry.startswith(f"bqx merge --from $BQX_HOME/gcs/{s.staging_bucket}/checkpoints/")
    assert gate.composes == 0
    assert storage.bucket(s, s.output_bucket).get_blob(layout.output(PAIR)) is None
    summary = publish.merge_run(replace(s, compose_max_bytes=total + 4096), manifest, "auto")  # room for the footer
    assert summary["method"] == "compose" and gate.composes == 4


def test_auto_merges_an_unaligned_run_by_stream_and_compose_refuses_it(gcs: str, tmp_path: Path) -> None:
    grid, paths = build(tmp_path / "cp", tables=3, rows=400, row_group=150, seed=5)
    s = _settings(tmp_path, gcs, "unal")
    manifest = upload_run(s, tmp_path / "cp", paths, grid, "runal", tag=False)  # no object metadata tag
    with pytest.raises(TerminalError, match="not aligned"):
        publish.merge_run(s, manifest, "compose")
    summary = publish.merge_run(s, manifest, "auto")
    assert summary["method"] == "stream"
    no_grid = replace(manifest, grid=None)
    assert publish.choose_method("auto", no_grid, {}) == "stream"


def test_a_merge_killed_mid_compose_leaves_no_output_and_the_rerun_publishes(gate: ComposeGate, wide: dict,
                                                                             tmp_path: Path) -> None:
    s = _settings(tmp_path, gate.endpoint, "kill")
    manifest = upload_run(s, wide["dir"], wide["paths"], wide["grid"], "rkill")
    gate.hold_after = 1  # the first part is composed; the job dies during the second
    script = (
        "import json, sys\n"
        "from bqx.catalog import Manifest\n"
        "from bqx.merge import publish\n"
        "from fakes import local_settings\n"
        "s = local_settings(*sys.argv[1:3], staging_bucket=sys.argv[3], output_bucket=sys.argv[4])\n"
        "m = Manifest.from_json(json.loads(sys.argv[5]))\n"
        "publish.merge_run(s, m, 'auto')\n"
    )
    env = {**os.environ, **gcs_env(gate.endpoint), "PYTHONPATH": f"{REPO / 'tests'}:{REPO / 'shared'}"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), gate.endpoint, s.staging_bucket,
                             s.output_bucket, json.dumps(manifest.to_json())], env=env, start_new_session=True)
    try:
        assert gate.held.wait(60), "the merge never reached its second compose call"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    gate.release.set()
    out = storage.bucket(s, s.output_bucket)
    assert out.get_blob(layout.output(PAIR)) is None and out.get_blob(layout.summary(PAIR)) is None
    left = storage.list_names(s, s.staging_bucket, layout.compose_prefix(PAIR, "rkill"))
    assert left and layout.compose_output(PAIR, "rkill") not in left  # parts, no composed file
    gate.hold_after = None
    summary = publish.merge_run(s, manifest, "auto")
    assert summary["method"] == "compose"
    assert_same_values(pq.read_table(io.BytesIO(out.blob(layout.output(PAIR)).download_as_bytes())),
                       wide["stream"])
    assert storage.list_names(s, s.staging_bucket, layout.compose_prefix(PAIR, "rkill")) == {}
