"""A synthetic warehouse with the real one's shape, in a DuckDB file, deterministic from a seed.

Per pair: 667 feature tables in the real family mix with 4-232 value columns (~17,000 in all) and a
targets table with the 49 target columns, keyed by a 1-minute `interval_time` TIMESTAMP. Values are random
walks and smooth indicators (they compress like real series); some tables have gaps, some columns nulls,
and some tables start before the targets do.

Each table has a version in `_bqx_versions` (dataset, table_name, version), as BigQuery has a last modification
time: every write of the table gives it a new, larger one (nanoseconds since the epoch, so a regenerated file never
repeats an older file's version), and `touch` gives one without changing the rows, standing in for an update.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bqx.catalog import FAMILIES, KEY, TARGET_COLUMNS, VERSIONS_TABLE, belongs_to, targets_table
from bqx.errors import TerminalError
from bqx.pairs import PAIRS

TOTAL_FEATURE_COLUMNS = 17_000
MIN_COLS, MAX_COLS = 4, 232
START = np.datetime64("2024-01-01T00:00:00", "us")
DEFAULT_ROWS = 2_000


@dataclass(frozen=True)
class Shape:
    rows: int = DEFAULT_ROWS
    seed: int = 7
    table_scale: float = 1.0  # fraction of each family's tables (tests use a small one)
    column_scale: float = 1.0  # fraction of each table's columns

    def describe(self) -> str:
        return f"rows={self.rows} seed={self.seed} table_scale={self.table_scale} column_scale={self.column_scale}"


@dataclass(frozen=True)
class TableSpec:
    name: str
    family: str
    columns: int


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def table_specs(pair: str, shape: Shape) -> list[TableSpec]:
    """The pair's feature tables: names, families and value-column counts."""
    rng = _rng(shape.seed, "specs", pair)
    others = [p for p in PAIRS if p != pair]
    names: list[tuple[str, str]] = []
    for family, count in FAMILIES.items():
        n = count if shape.table_scale >= 1 else max(1, round(count * shape.table_scale))
        for i in range(n):
            if family == "cov":
                variant = f"{others[i % len(others)]}_w{(45, 90, 180, 360, 720, 1440, 2880)[i // len(others)]}"
            else:
                variant = f"{i:03d}"
            names.append((f"{family}_{pair}_{variant}", family))
    weights = rng.lognormal(mean=0.0, sigma=0.9, size=len(names))
    target = TOTAL_FEATURE_COLUMNS * len(names) / sum(FAMILIES.values())
    cols = np.clip(np.round(weights * target / weights.sum()), MIN_COLS, MAX_COLS).astype(int)
    cols[0], cols[-1] = MAX_COLS, MIN_COLS  # the real range's ends both occur
    for _ in range(100):  # nudge toward the real total while staying in range
        gap = int(round(target)) - int(cols.sum())
        if gap == 0:
            break
        room = np.flatnonzero(cols < MAX_COLS if gap > 0 else cols > MIN_COLS)[1:-1]
        if room.size == 0:
            break
        step = np.sign(gap) * min(abs(gap) // room.size + 1, 8)
        cols[room] = np.clip(cols[room] + step, MIN_COLS, MAX_COLS)
        if abs(int(round(target)) - int(cols.sum())) > abs(gap):
            cols[room] = np.clip(cols[room] - step, MIN_COLS, MAX_COLS)
            break
    if shape.column_scale < 1:
        cols = np.maximum(MIN_COLS, np.round(cols * shape.column_scale)).astype(int)
    return [TableSpec(n, f, int(c)) for (n, f), c in zip(names, cols, strict=True)]


# Cells (rows x columns) generated at a time: a table wider or longer than this is generated in blocks of rows,
# so memory stays bounded at any row count (a block's arrays are a few times 64 MB at most).
BLOCK_CELLS = 8_000_000
_HALO = 7  # the smoothing kernel's half-width: a block needs this many rows of its neighbours


def _block_rows(columns: int, block_cells: int) -> int:
    return max(64, block_cells // max(columns, 1))


def _normals(rng: np.random.Generator, rows: int, columns: int, block: int) -> Iterator[np.ndarray]:
    """rng.standard_normal((rows, columns)) in blocks of rows: the same numbers (a Generator fills row-major, one
    value after another), never all at once."""
    for a in range(0, rows, block):
        yield rng.standard_normal((min(block, rows - a), columns))


def _series_blocks(rng: np.random.Generator, rows: int, columns: int,
                   block: int) -> tuple[np.ndarray, Callable[[], Iterator[np.ndarray]]]:
    """Random walks, and every third column a smoothed indicator of one, as blocks of rows. Returns the walks'
    offsets (drawn after every normal, as `_series` always did) and a function yielding the blocks. Values are
    bit-identical to computing the whole table at once: the cumulative sum carries across blocks in the same
    order, and each smoothed value is the same 15-term dot product (a block sees 7 rows of each neighbour)."""
    if rows <= block:
        normals = [rng.standard_normal((rows, columns))]
        offset = rng.uniform(0.5, 2.0, columns)
        again: Callable[[], Iterator[np.ndarray]] = lambda: iter(normals)  # noqa: E731
    else:  # two passes over the same numbers: the offsets come after all of them in the stream
        state = rng.bit_generator.state
        for _ in _normals(rng, rows, columns, block):
            pass
        offset = rng.uniform(0.5, 2.0, columns)

        def again() -> Iterator[np.ndarray]:
            replay = np.random.Generator(type(rng.bit_generator)())
            replay.bit_generator.state = state
            return _normals(replay, rows, columns, block)

    kernel = np.ones(15) / 15

    def walks() -> Iterator[np.ndarray]:
        carry = np.zeros(columns)
        for chunk in again():
            steps = chunk * 0.001
            steps[0] += carry  # s[i] = s[i-1] + x[i], exactly as one cumsum over all rows
            total = np.cumsum(steps, axis=0)
            carry = total[-1].copy()
            yield total + offset

    def blocks() -> Iterator[np.ndarray]:
        before = np.zeros((_HALO, columns))
        it = walks()
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)
            after = nxt[:_HALO] if nxt is not None else np.zeros((0, columns))
            after = np.concatenate([after, np.zeros((_HALO - len(after), columns))])
            out = cur.copy()
            for j in range(0, columns, 3):
                window = np.concatenate([before[:, j], cur[:, j], after[:, j]])
                out[:, j] = np.convolve(window, kernel, mode="valid")
            before = np.concatenate([before, cur])[-_HALO:]
            yield np.round(out, 6)
            cur = nxt

    return offset, blocks


def _series(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Random walks, and every third column a smoothed indicator of one (all rows at once)."""
    _, blocks = _series_blocks(rng, rows, columns, max(rows, 1))
    return np.concatenate(list(blocks()))


def _keys(rows: int, offset: int = 0) -> pa.Array:
    values = START + (np.arange(rows, dtype=np.int64) + offset) * np.timedelta64(60_000_000, "us")
    return pa.array(values, type=pa.timestamp("us", tz="UTC"))


def targets_batches(pair: str, shape: Shape, block_cells: int = BLOCK_CELLS) -> Iterator[pa.RecordBatch]:
    rng = _rng(shape.seed, "targets", pair)
    block = _block_rows(len(TARGET_COLUMNS), block_cells)
    _, blocks = _series_blocks(rng, shape.rows, len(TARGET_COLUMNS), block)
    a = 0
    for data in blocks():
        keys = _keys(len(data), a)
        a += len(data)
        yield pa.record_batch({KEY: keys, **{c: data[:, i] for i, c in enumerate(TARGET_COLUMNS)}})


def targets_arrow(pair: str, shape: Shape) -> pa.Table:
    return pa.Table.from_batches(list(targets_batches(pair, shape)))


def feature_schema(spec: TableSpec) -> pa.Schema:
    return pa.schema([(KEY, pa.timestamp("us", tz="UTC")),
                      *((f"f{j:03d}", pa.int64() if spec.family == "regime" and j == 0 else pa.float64())
                        for j in range(spec.columns))])


def feature_batches(pair: str, spec: TableSpec, shape: Shape,
                    block_cells: int = BLOCK_CELLS) -> Iterator[pa.RecordBatch]:
    rng = _rng(shape.seed, "table", spec.name)
    lead = int(rng.integers(0, 30)) if rng.random() < 0.3 else 0  # some tables start earlier
    rows = shape.rows + lead
    keep = np.ones(rows, dtype=bool)
    if rng.random() < 0.4:  # gaps: missing bars
        keep &= rng.random(rows) > rng.uniform(0.005, 0.05)
    _, blocks = _series_blocks(rng, rows, spec.columns, _block_rows(spec.columns, block_cells))
    kept = int(keep.sum())
    # nulls in some columns: drawn after the values, column by column over every kept row (a byte a row each)
    masks = {j: rng.random(kept) < 0.02 for j in range(spec.columns) if j % 7 == 3}
    schema = feature_schema(spec)
    a = at = 0  # first row of the block; first kept row of the block
    for data in blocks():
        sel = keep[a:a + len(data)]
        n = int(sel.sum())
        columns: dict[str, pa.Array] = {KEY: _keys(len(data), a - lead).filter(pa.array(sel))}
        values = data[sel]
        for j in range(spec.columns):
            col = values[:, j]
            mask = masks[j][at:at + n] if j in masks else None
            name = f"f{j:03d}"
            if spec.family == "regime" and j == 0:
                columns[name] = pa.array((col * 1000).astype(np.int64) % 4, mask=mask)
            else:
                columns[name] = pa.array(col, mask=mask)
        a += len(data)
        at += n
        yield pa.record_batch(columns, schema=schema)


def feature_arrow(pair: str, spec: TableSpec, shape: Shape) -> pa.Table:
    return pa.Table.from_batches(list(feature_batches(pair, spec, shape)), feature_schema(spec))


GENERATE_MEMORY = "512MB"


@dataclass
class Progress:
    """A generation's progress, passed to its callback after each table."""

    tables: int
    total: int
    rows: int
    started: float

    @property
    def seconds(self) -> float:
        return time.time() - self.started


def _counting(batches: Iterator[pa.RecordBatch], state: Progress) -> Iterator[pa.RecordBatch]:
    for b in batches:
        state.rows += b.num_rows
        yield b


class Warehouse:
    """The DuckDB file standing in for BigQuery. Tables live in a schema named like the BigQuery dataset."""

    def __init__(self, path: Path, dataset: str) -> None:
        self.path = Path(path)
        self.dataset = dataset

    def _connect(self, read_only: bool):  # type: ignore[no-untyped-def]
        import duckdb

        con = duckdb.connect(str(self.path), read_only=read_only)
        con.execute("SET TimeZone='UTC'")
        con.execute("SET enable_progress_bar=false")
        return con

    def pairs(self) -> dict[str, str]:
        """pair -> shape description, for the pairs already generated."""
        if not self.path.exists():
            return {}
        con = self._connect(read_only=True)
        try:
            rows = con.execute(
                "SELECT pair, shape FROM information_schema.tables t JOIN _bqx_generated g ON true "
                "WHERE t.table_name = '_bqx_generated' GROUP BY pair, shape"
            ).fetchall()
        except Exception:  # noqa: BLE001 - a file without our bookkeeping table has no generated pairs
            return {}
        finally:
            con.close()
        return dict(rows)

    def generate(self, pair: str, shape: Shape, progress: Callable[[Progress], None] | None = None,
                 block_cells: int = BLOCK_CELLS) -> int:
        """(Re)create the pair's tables; returns how many tables were written.

        Streams: each table is generated in blocks of rows (bounded memory at any row count) and committed on its
        own with its new version, so DuckDB never holds more than one table's uncheckpointed rows. The pair is
        marked generated only after its last table: an interrupted generation leaves it listed as not generated
        (`pairs()`), and `bqx run` generates it again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect(read_only=False)
        try:
            con.execute(f"SET memory_limit='{GENERATE_MEMORY}'")  # DuckDB's buffers spill past this, never grow
            q = f'"{self.dataset}"'
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
            con.execute("CREATE TABLE IF NOT EXISTS _bqx_generated (pair VARCHAR PRIMARY KEY, shape VARCHAR)")
            _create_versions(con)
            con.execute("DELETE FROM _bqx_generated WHERE pair = ?", [pair])
            specs = table_specs(pair, shape)
            tables = [(targets_table(pair), None), *((s.name, s) for s in specs)]
            state = Progress(0, len(tables), 0, time.time())
            for name, spec in tables:
                if spec is None:
                    schema = pa.schema([(KEY, pa.timestamp("us", tz="UTC")),
                                        *((c, pa.float64()) for c in TARGET_COLUMNS)])
                    batches = targets_batches(pair, shape, block_cells)
                else:
                    schema, batches = feature_schema(spec), feature_batches(pair, spec, shape, block_cells)
                counted = _counting(batches, state)
                con.register("_incoming", pa.RecordBatchReader.from_batches(schema, counted))
                con.execute("BEGIN")
                con.execute(f'CREATE OR REPLACE TABLE {q}."{name}" AS SELECT * FROM _incoming')
                _bump(con, self.dataset, [name])
                con.execute("COMMIT")
                con.unregister("_incoming")
                state.tables += 1
                if progress:
                    progress(state)
            con.execute("INSERT OR REPLACE INTO _bqx_generated VALUES (?, ?)", [pair, shape.describe()])
            con.execute("CHECKPOINT")
            return len(tables)
        finally:
            con.close()

    def touch(self, pair: str, tables: list[str]) -> dict[str, int]:
        """Give the pair's `tables` new versions without changing their rows, as an update in BigQuery would change
        their modification time: the next run extracts them again. Returns table -> new version."""
        if not self.path.exists():
            raise TerminalError(f"no warehouse at {self.path}; generate one with `bqx warehouse generate {pair}`")
        con = self._connect(read_only=False)
        try:
            present = {r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [self.dataset]).fetchall()}
            unknown = [t for t in tables if t not in present or not belongs_to(pair, t)]
            if unknown:
                raise TerminalError(f"not tables of {pair} in the warehouse: {', '.join(unknown[:10])}"
                                    f"{' ...' if len(unknown) > 10 else ''}")
            _create_versions(con)
            con.execute("BEGIN")
            versions = _bump(con, self.dataset, list(dict.fromkeys(tables)))
            con.execute("COMMIT")
            return versions
        finally:
            con.close()


def _create_versions(con) -> None:  # type: ignore[no-untyped-def]
    con.execute(f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (dataset VARCHAR, table_name VARCHAR, version BIGINT, "
                "PRIMARY KEY (dataset, table_name))")


def _bump(con, dataset: str, tables: list[str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """New versions for `tables`: now in nanoseconds, and always above the table's previous version."""
    old = dict(con.execute(f"SELECT table_name, version FROM {VERSIONS_TABLE} WHERE dataset = ?",
                           [dataset]).fetchall())
    now = time.time_ns()
    new = {t: max(now, int(old.get(t) or 0) + 1) for t in tables}
    con.executemany(f"INSERT OR REPLACE INTO {VERSIONS_TABLE} VALUES (?, ?, ?)",
                    [[dataset, t, v] for t, v in new.items()])
    return new
