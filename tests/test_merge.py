"""The memory-bounded merge (issue 9): equals a DuckDB LEFT JOIN, keeps types and order, opens everywhere, rejects
bad checkpoints, and stays inside the memory budget it is given."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx.catalog import KEY
from bqx.errors import BadCheckpoint, DuplicateKeys, TerminalError
from bqx.layout import prefix_of
from bqx.local.warehouse import Shape, feature_arrow, table_specs, targets_arrow
from bqx.merge.plan import local_inputs
from bqx.merge.stream import merge
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS

PAIR = "eurusd"
SHAPE = Shape(rows=3_000, seed=5, table_scale=0.02, column_scale=0.3)


def write_inputs(directory: Path, shape: Shape = SHAPE, row_group: int = 700, columns: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(targets_arrow(PAIR, shape), directory / f"targets_{PAIR}.parquet", row_group_size=row_group,
                   **WRITER_OPTIONS)
    for spec in table_specs(PAIR, shape):
        if columns:
            spec = replace(spec, columns=columns)
        pq.write_table(feature_arrow(PAIR, spec, shape), directory / f"{spec.name}.parquet", row_group_size=row_group,
                       **WRITER_OPTIONS)
    return directory


def run_merge(src: Path, dst: Path, budget: int = 1 << 30, workers: int | None = None):  # type: ignore[no-untyped-def]
    t, features = local_inputs(src)
    features = [replace(f, prefix=prefix_of(PAIR, f.table)) for f in features]
    with open(dst, "wb") as sink:
        return merge(t, features, sink, memory_budget=budget, workers=workers)


def duckdb_reference(src: Path) -> pa.Table:
    import duckdb

    files = sorted(src.glob("*.parquet"))
    targets = next(p for p in files if p.stem.startswith("targets"))
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    sel, joins = ["t.*"], []
    for i, p in enumerate(p for p in files if p != targets):
        cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{p}')").fetchall() if r[0] != KEY]
        pre = prefix_of(PAIR, p.stem)
        sel += [f'f{i}."{c}" AS "{pre}_{c}"' for c in cols]
        joins.append(f"LEFT JOIN read_parquet('{p}') f{i} ON f{i}.{KEY} = t.{KEY}")
    sql = f"SELECT {', '.join(sel)} FROM read_parquet('{targets}') t {' '.join(joins)} ORDER BY t.{KEY}"
    return con.sql(sql).to_arrow_table()


COPY_SHAPE = Shape(rows=40_000, seed=6, table_scale=0.012, column_scale=0.1)


@pytest.fixture(scope="module", params=["decode", "copy"])
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    base = tmp_path_factory.mktemp("merge")
    out = base / "out.parquet"
    if request.param == "decode":
        # A tiny budget: several output row groups, tables read in slices of columns, every row group re-encoded.
        src = write_inputs(base / "in")
        stats = run_merge(src, out, budget=1 << 20)
        assert stats.row_groups > 1 and stats.copied_tables == 0
    else:
        # Checkpoints with the targets' row groups: tables without gaps have their encoded chunks copied.
        src = write_inputs(base / "in", COPY_SHAPE, row_group=20_000)
        stats = run_merge(src, out)
        assert stats.row_groups == 2 and 0 < stats.copied_tables < stats.tables - 1
    return src, out, stats


def test_equals_duckdb_left_join(merged) -> None:  # type: ignore[no-untyped-def]
    src, out, stats = merged
    ours = pq.read_table(out)
    ref = duckdb_reference(src)
    assert ours.column_names == ref.column_names  # column order: key, targets, then tables in name order
    assert ours.schema == ref.schema  # types
    assert ours.num_rows == ref.num_rows == stats.rows
    for name in ours.column_names:
        assert ours.column(name).equals(ref.column(name)), name  # values and row order
    # Gaps and early-start rows really were exercised: some feature cells are null.
    assert sum(ours.column(i).null_count for i in range(50, ours.num_columns)) > 0


def test_kernel_copy_and_plain_copy_write_the_same_bytes(merged) -> None:  # type: ignore[no-untyped-def]
    # Into a file, copied chunks go through copy_file_range; into memory, through read + write.
    src, out, stats = merged
    t, features = local_inputs(src)
    features = [replace(f, prefix=prefix_of(PAIR, f.table)) for f in features]
    buf = io.BytesIO()
    again = merge(t, features, buf, memory_budget=1 << 20 if stats.copied_tables == 0 else 1 << 30)
    assert again.copied_tables == stats.copied_tables
    assert buf.getvalue() == out.read_bytes()


def test_timestamps_microsecond_utc_and_sorted(merged) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = merged
    pf = pq.ParquetFile(out)
    assert pf.schema_arrow.field(KEY).type == KEY_TYPE
    logical = json.loads(pf.schema.column(0).logical_type.to_json())
    assert (logical["Type"], logical["timeUnit"], logical["isAdjustedToUTC"]) == ("Timestamp", "microseconds", True)
    keys = pf.read(columns=[KEY]).column(KEY).cast(pa.int64()).to_numpy()
    assert (np.diff(keys) > 0).all()
    assert keys[0] == np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64)


def test_output_opens_in_pyarrow_polars_duckdb(merged) -> None:  # type: ignore[no-untyped-def]
    import duckdb
    import polars as pl

    _, out, stats = merged
    t = pq.read_table(out)
    assert (t.num_rows, t.num_columns) == (stats.rows, stats.columns)
    df = pl.read_parquet(out)
    assert df.shape == (stats.rows, stats.columns)
    assert df.schema[KEY] == pl.Datetime("us", "UTC")
    last = t.column_names[-1]
    assert df[last].null_count() == t.column(last).null_count
    con = duckdb.connect()
    n, first = con.execute(f"SELECT count(*), min({KEY}) FROM read_parquet('{out}')").fetchone()
    assert n == stats.rows
    assert str(first).startswith("2024-01-01 00:00:00")
    total = con.execute(f'SELECT sum("{last}") FROM read_parquet(\'{out}\')').fetchone()[0]
    assert total == pytest.approx(pa.compute.sum(t.column(last)).as_py())


def _small_dir(tmp_path: Path) -> Path:
    shape = Shape(rows=400, seed=2, table_scale=0.01, column_scale=0.2)
    return write_inputs(tmp_path / "in", shape, row_group=100)


def test_duplicate_keys_name_the_table(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    victim = sorted(p for p in src.glob("*.parquet") if not p.stem.startswith("targets"))[1]
    t = pq.read_table(victim)
    dup = pa.concat_tables([t.slice(0, 150), t.slice(149, 1), t.slice(150)])
    pq.write_table(dup, victim, row_group_size=100, **WRITER_OPTIONS)
    with pytest.raises(DuplicateKeys) as err:
        run_merge(src, tmp_path / "out.parquet")
    assert err.value.table == victim.stem
    assert victim.stem in str(err.value)


def test_unsorted_checkpoint_is_bad(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    victim = sorted(p for p in src.glob("*.parquet") if not p.stem.startswith("targets"))[0]
    t = pq.read_table(victim)
    pq.write_table(pa.concat_tables([t.slice(200), t.slice(0, 200)]), victim, row_group_size=100, **WRITER_OPTIONS)
    with pytest.raises(BadCheckpoint, match=victim.stem):
        run_merge(src, tmp_path / "out.parquet")


def test_empty_targets(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    target = src / f"targets_{PAIR}.parquet"
    pq.write_table(pq.read_table(target).slice(0, 0), target, **WRITER_OPTIONS)
    stats = run_merge(src, tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert stats.rows == out.num_rows == 0
    assert out.num_columns == stats.columns > 50
    assert out.schema.field(KEY).type == KEY_TYPE


def test_feature_without_overlapping_keys_is_all_null(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    victim = sorted(p for p in src.glob("*.parquet") if not p.stem.startswith("targets"))[0]
    t = pq.read_table(victim)
    later = pa.array(t.column(KEY).cast(pa.int64()).to_numpy() + 10**12, type=pa.int64()).cast(KEY_TYPE)
    pq.write_table(t.set_column(0, KEY, later), victim, row_group_size=100, **WRITER_OPTIONS)
    run_merge(src, tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    mine = [c for c in out.column_names if c.startswith(prefix_of(PAIR, victim.stem) + "_")]
    assert len(mine) == t.num_columns - 1
    assert all(out.column(c).null_count == out.num_rows for c in mine)
    assert out.column(mine[0]).type == t.schema.field(1).type


BUDGET = 64 << 20
# The baseline is the RSS after a warm-up merge of two tables (interpreter, libraries' code pages, thread pools);
# this allowance covers what is not live data: allocator slack and per-thread caches.
ALLOWANCE = 16 << 20

CHILD = textwrap.dedent("""
    import sys
    from bqx.merge import allocator
    allocator.configure(int(sys.argv[3]))  # first, as `bqx merge` and the merge job do: before pyarrow loads
    import json, tempfile
    from dataclasses import replace
    from pathlib import Path
    from bqx.layout import prefix_of
    from bqx.merge.plan import local_inputs
    from bqx.merge.stream import merge

    def rss():
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

    src, dst, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    t, features = local_inputs(src)
    features = [replace(f, prefix=prefix_of("eurusd", f.table)) for f in features]
    with tempfile.TemporaryFile() as warm:
        merge(t, features[:2], warm, memory_budget=budget)
    baseline = rss()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with open(dst, "wb") as sink:
        stats = merge(t, features, sink, memory_budget=budget)
    print(json.dumps({"baseline": baseline, "peak": rss()["VmHWM"], "group_rows": stats.group_rows}))
""")

def assert_merges_within_budget(src: Path, out: Path, timeout: int) -> None:
    """Merge `src` into `out` under BUDGET in a child process (CHILD) and assert its peak RSS grew by less than
    BUDGET + ALLOWANCE over its baseline."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(BUDGET)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["baseline"]
    assert growth < BUDGET + ALLOWANCE, (
        f"peak RSS grew {growth / 2**20:.0f} MiB over a {r['baseline'] / 2**20:.0f} MiB baseline; "
        f"budget {BUDGET / 2**20:.0f} MiB (+{ALLOWANCE / 2**20:.0f} MiB allowance)")



def test_peak_memory_stays_under_budget(tmp_path: Path) -> None:
    # ~22 tables x 120 columns x 20k rows in one row group each: ~400 MiB of decoded values, 19 MiB per table.
    # Reading whole row groups or whole tables (two workers) would need about twice the budget.
    shape = Shape(rows=20_000, seed=9, table_scale=0.008)
    src = write_inputs(tmp_path / "in", shape, row_group=20_000, columns=120)
    decoded = sum(pq.ParquetFile(p).metadata.num_rows * pq.ParquetFile(p).metadata.num_columns * 8
                  for p in src.glob("*.parquet"))
    assert decoded > 2 * BUDGET  # an unbounded merge could not pass
    assert_merges_within_budget(src, tmp_path / "out.parquet", timeout=120)
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == shape.rows


GOVERNOR_CHILD = textwrap.dedent("""
    import sys
    from bqx.merge import allocator
    assert allocator.configure(1 << 30)  # keeps freed pages (purge delay > 0) - before pyarrow loads
    import json
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    gov = allocator.MemoryGovernor(limit=64 << 20)
    arrays = [pc.add(pa.array(np.ones(1 << 17)), 1) for _ in range(256)]  # 256 MiB through Arrow's pool
    del arrays
    kept = gov.rss() - gov.baseline
    gov.check()
    print(json.dumps({"kept": kept, "after": gov.rss() - gov.baseline, "releases": gov.releases}))
""")


def test_allocator_keeps_pages_only_when_the_budget_has_room_and_the_governor_gives_them_back() -> None:
    from bqx.merge import allocator

    assert allocator.settings_for(64 << 20)["MIMALLOC_PURGE_DELAY"] == "0"
    assert int(allocator.settings_for(1 << 30)["MIMALLOC_PURGE_DELAY"]) > 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIMALLOC_")}
    proc = subprocess.run([sys.executable, "-c", GOVERNOR_CHILD], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["kept"] > 128 << 20  # freed pages stayed resident (that is the speed-up)...
    assert r["releases"] == 1 and r["after"] < 64 << 20  # ...until the process grew past its limit


def _aligned_dir(tmp_path: Path) -> tuple[Path, Path]:
    """Checkpoints with the targets' row groups, and one of them without gaps (its chunks would be copied)."""
    src = write_inputs(tmp_path / "in", COPY_SHAPE, row_group=20_000)
    full = pq.read_metadata(src / f"targets_{PAIR}.parquet").num_rows
    victim = next(p for p in sorted(src.glob("*.parquet"))
                  if not p.stem.startswith("targets") and pq.read_metadata(p).num_rows == full)
    return src, victim


def test_aligned_looking_checkpoint_with_other_keys_is_joined_not_copied(tmp_path: Path) -> None:
    src, victim = _aligned_dir(tmp_path)
    before = run_merge(src, tmp_path / "before.parquet").copied_tables
    t = pq.read_table(victim)
    shifted = pa.array(t.column(KEY).cast(pa.int64()).to_numpy() + 1, type=pa.int64()).cast(KEY_TYPE)
    pq.write_table(t.set_column(0, KEY, shifted), victim, row_group_size=20_000, **WRITER_OPTIONS)  # same counts
    stats = run_merge(src, tmp_path / "out.parquet")
    assert stats.copied_tables == before - 1
    ours, ref = pq.read_table(tmp_path / "out.parquet"), duckdb_reference(src)
    mine = [c for c in ours.column_names if c.startswith(prefix_of(PAIR, victim.stem) + "_")]
    assert mine and all(ours.column(c).null_count == ours.num_rows for c in mine)  # no key matches any more
    assert ours.equals(ref)


def test_aligned_checkpoint_with_an_integer_key_is_refused(tmp_path: Path) -> None:
    # Its key chunks hold the very bytes of the targets' microsecond keys; the declared type still has to match.
    src, victim = _aligned_dir(tmp_path)
    t = pq.read_table(victim)
    pq.write_table(t.set_column(0, KEY, t.column(KEY).cast(pa.int64())), victim, row_group_size=20_000,
                   **WRITER_OPTIONS)
    with pytest.raises(BadCheckpoint, match=f"{victim.stem}: {KEY} is int64"):
        run_merge(src, tmp_path / "out.parquet")


def test_checkpoint_without_the_key_is_bad_and_names_the_table(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    victim = sorted(p for p in src.glob("*.parquet") if not p.stem.startswith("targets"))[-1]
    pq.write_table(pq.read_table(victim).drop_columns([KEY]), victim)
    with pytest.raises(BadCheckpoint, match=f"{victim.stem}: no {KEY} column"):
        run_merge(src, tmp_path / "out.parquet")


def test_colliding_output_names_are_refused_before_a_footer_is_written(tmp_path: Path) -> None:
    # The output schema is planned in the background while tables merge: its failure still fails the merge.
    src = _small_dir(tmp_path)
    t, features = local_inputs(src)
    features = [replace(f, prefix="same") for f in features[:2]]
    if set(pq.read_schema(features[0].open()).names) & set(pq.read_schema(features[1].open()).names) == {KEY}:
        features[1] = replace(features[1], open=features[0].open, table="copy")
    with open(tmp_path / "out.parquet", "wb") as sink, pytest.raises(TerminalError, match="collide"):
        merge(t, features, sink)


def test_checkpoint_without_rows_gives_null_columns_of_its_declared_types(tmp_path: Path) -> None:
    src = _small_dir(tmp_path)
    victim = sorted(p for p in src.glob("*.parquet") if not p.stem.startswith("targets"))[0]
    t = pq.read_table(victim)
    pq.ParquetWriter(victim, t.schema, **WRITER_OPTIONS).close()  # no row groups at all
    run_merge(src, tmp_path / "out.parquet")
    md = pq.read_metadata(tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    pre = prefix_of(PAIR, victim.stem) + "_"
    mine = [i for i in range(md.num_columns) if md.schema.column(i).name.startswith(pre)]
    assert len(mine) == t.num_columns - 1
    for j, i in enumerate(mine, start=1):
        name = md.schema.column(i).name
        assert out.column(name).null_count == out.num_rows
        assert out.schema.field(name).type == t.schema.field(j).type
        # the encoded chunks are of the type the footer's schema declares (not Arrow's null type)
        assert md.row_group(0).column(i).physical_type == md.schema.column(i).physical_type


def test_local_inputs_name_columns_as_the_pipeline_does(tmp_path: Path) -> None:
    """One naming rule: `bqx merge --from` prefixes columns like the pipeline's file (the table's name less the
    pair), taking the pair from targets_<pair>; files of no known pair keep their name."""
    from bqx import layout

    table = pa.table({"interval_time": pa.array([0], pa.timestamp("us", tz="UTC")), "f000": [1.0]})
    for name in ("targets_eurusd", "mom_eurusd_000", "cov_eurusd_eurgbp_w45"):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    _, features = local_inputs(tmp_path)
    assert {f.table: f.prefix for f in features} == {
        "mom_eurusd_000": "mom_000", "cov_eurusd_eurgbp_w45": "cov_eurgbp_w45"}
    assert all(f.prefix == layout.prefix_of("eurusd", f.table) for f in features)
    (tmp_path / "targets_eurusd.parquet").rename(tmp_path / "targets.parquet")
    _, features = local_inputs(tmp_path)
    assert {f.prefix for f in features} == {"mom_eurusd_000", "cov_eurusd_eurgbp_w45"}


HISTORY_ROWS = 3_000_000  # a feature's rows before the targets' first key (years of history the targets lack)


def test_item9_long_history_before_the_targets_stays_within_budget(tmp_path: Path) -> None:
    """Issue 17, item 9: one 16-column feature with 3 M rows before the targets' first key (~370 MiB decoded) must
    be merged within the budget (+ALLOWANCE over the warmed-up process, as test_peak_memory_stays_under_budget):
    its rows before the targets are never buffered (row groups wholly before them are not even read)."""
    src = tmp_path / "in"
    src.mkdir()
    minute = 60_000_000
    start = 1_500_000_000_000_000  # the targets' first key
    n = 20_000
    keys = pa.array(start + np.arange(n, dtype=np.int64) * minute, KEY_TYPE)
    pq.write_table(pa.table({KEY: keys, "y": np.linspace(0, 1, n)}), src / f"targets_{PAIR}.parquet",
                   row_group_size=n, **WRITER_OPTIONS)
    history = HISTORY_ROWS + n  # the feature: 3 M rows of history, then the targets' span
    first = start - HISTORY_ROWS * minute
    path = src / f"ret_{PAIR}_w1.parquet"
    schema = pa.schema([pa.field(KEY, KEY_TYPE), *(pa.field(f"c{i}", pa.float64()) for i in range(16))])
    values = {f"c{i}": np.tile(np.arange(64, dtype=np.float64) + i, 65_536 // 64) for i in range(16)}
    with pq.ParquetWriter(path, schema, compression="snappy") as w:  # dictionary-encoded: a small file
        for s in range(0, history, 65_536):
            m = min(65_536, history - s)
            k = pa.array(first + (s + np.arange(m, dtype=np.int64)) * minute, KEY_TYPE)
            w.write_table(pa.table({KEY: k, **{c: v[:m] for c, v in values.items()}}, schema=schema))
    for i in range(2):  # two small tables the child warms up with
        pq.write_table(pa.table({KEY: keys, "v": np.arange(n, dtype=np.float64)}), src / f"a{i}_{PAIR}.parquet",
                       **WRITER_OPTIONS)
    decoded = history * 17 * 8
    assert decoded > 4 * BUDGET
    assert_merges_within_budget(src, tmp_path / "out.parquet", timeout=300)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == n
    assert out.column("ret_w1_c3").to_pylist()[:3] == [3.0 + (HISTORY_ROWS + j) % 65_536 % 64 for j in range(3)]


def test_item9_string_columns_are_sliced_by_their_real_width(tmp_path: Path) -> None:
    """Issue 17, item 9: strings are accepted and sized by their width. 16 string columns of 512-byte values x 20k
    rows (~160 MiB decoded) fit in one slice at 8 bytes a cell; by their real width each is a slice of its own."""
    src = tmp_path / "in"
    src.mkdir()
    n = 20_000
    keys = pa.array(1_500_000_000_000_000 + np.arange(n, dtype=np.int64) * 60_000_000, KEY_TYPE)
    pq.write_table(pa.table({KEY: keys, "y": np.linspace(0, 1, n)}), src / f"targets_{PAIR}.parquet",
                   row_group_size=n, **WRITER_OPTIONS)
    text = pa.array([f"{i:08d}" * 64 for i in range(n)])  # 512 bytes each, all distinct
    # All but the targets' first key: not aligned to them (its chunks cannot be copied), so it is decoded.
    pq.write_table(pa.table({KEY: keys[1:], **{f"s{i}": text[1:] for i in range(16)}}),
                   src / f"txt_{PAIR}_w1.parquet", row_group_size=n, **WRITER_OPTIONS)
    for i in range(2):  # two small tables the child warms up with
        pq.write_table(pa.table({KEY: keys, "v": np.arange(n, dtype=np.float64)}), src / f"a{i}_{PAIR}.parquet",
                       **WRITER_OPTIONS)
    assert_merges_within_budget(src, tmp_path / "out.parquet", timeout=300)
    out = pq.read_table(tmp_path / "out.parquet", columns=["txt_w1_s15"])
    assert out.column(0).to_pylist()[:3] == [None, text[1].as_py(), text[2].as_py()]
