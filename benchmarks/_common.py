"""Benchmark helpers: the cached input shapes, and running a contender in its own process tree while
polling the tree's peak RSS."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from bqx.catalog import GRID_FILE_KEY, KEY, targets_table
from bqx.local.warehouse import Shape, feature_arrow, table_specs, targets_arrow
from bqx.parquet.conventions import CHECKPOINT_OPTIONS, CHECKPOINT_ROW_GROUP, write_checkpoint

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PAIR = "eurusd"


@dataclass(frozen=True)
class BenchShape:
    key: str
    label: str
    rows: int
    value_columns: int | None  # None: the warehouse's real column mix
    table_scale: float = 1.0
    aligned: bool = False  # every checkpoint already LEFT JOINed onto the targets' keys (same row groups)

    @property
    def dir(self) -> Path:
        settings = zlib.crc32(json.dumps([CHECKPOINT_OPTIONS, CHECKPOINT_ROW_GROUP], sort_keys=True).encode())
        return CACHE / (f"{self.key}-r{self.rows}-c{self.value_columns or 'real'}-t{self.table_scale}"
                        f"{'-aligned-grid' if self.aligned else ''}-w{settings:08x}")


SHAPES = {
    "a": BenchShape("a", "10 cols x 100k rows", 100_000, 10),
    "b": BenchShape("b", "10 cols x 500k rows", 500_000, 10),
    "c": BenchShape("c", "~17k cols x 20k rows", 20_000, None),
    # The stretch case: checkpoints written aligned to the targets (the LEFT JOIN pushed down into extraction).
    "A": BenchShape("A", "10 cols x 100k rows, aligned", 100_000, 10, aligned=True),
    "C": BenchShape("C", "~17k cols x 20k rows, aligned", 20_000, None, aligned=True),
    # The pipeline's default row count, aligned (issue 19's compose merge goal is measured here).
    "D": BenchShape("D", "~17k cols x 2k rows, aligned", 2_000, None, aligned=True),
    "E": BenchShape("E", "~17k cols x 100k rows, aligned", 100_000, None, aligned=True),
}


def quick(shape: BenchShape) -> BenchShape:
    """A scaled-down version of a shape, for a smoke run."""
    return replace(shape, rows=max(2_000, shape.rows // 50), table_scale=0.1, label=shape.label + " (quick)")


def _write_one(args: tuple[BenchShape, str | None]) -> int:
    shape, table = args
    ws = Shape(rows=shape.rows, seed=7, table_scale=shape.table_scale)
    meta = {}
    if shape.aligned:  # the grid's digest, as the aligned extract writes it (bqx.catalog.Grid)
        keys = targets_arrow(PAIR, ws).column(KEY).cast(pa.int64()).to_numpy()
        meta[GRID_FILE_KEY] = hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()
    if table is None:
        data, name = targets_arrow(PAIR, ws), targets_table(PAIR)
    else:
        spec = next(s for s in table_specs(PAIR, ws) if s.name == table)
        if shape.value_columns:
            spec = replace(spec, columns=shape.value_columns)
        data, name = feature_arrow(PAIR, spec, ws), table
        if shape.aligned:
            keys = targets_arrow(PAIR, ws).select([KEY])
            data = keys.join(data, KEY, join_type="left outer").sort_by(KEY).select(data.column_names)
    if meta:
        data = data.replace_schema_metadata({**(data.schema.metadata or {}), **meta})
    tmp = shape.dir / f".{name}.parquet.tmp"
    write_checkpoint(data, tmp, CHECKPOINT_ROW_GROUP)
    tmp.replace(shape.dir / f"{name}.parquet")
    return data.num_columns


def ensure_data(shape: BenchShape, jobs: int = 2) -> Path:
    """Generate the shape's inputs once (one Parquet file per table, sorted by interval_time)."""
    done = shape.dir / ".complete"
    if done.exists():
        return shape.dir
    shape.dir.mkdir(parents=True, exist_ok=True)
    ws = Shape(rows=shape.rows, seed=7, table_scale=shape.table_scale)
    work = [(shape, None), *((shape, s.name) for s in table_specs(PAIR, ws))]
    t0 = time.time()
    with ProcessPoolExecutor(jobs) as pool:
        cols = sum(pool.map(_write_one, work, chunksize=4))
    done.write_text(json.dumps({"tables": len(work), "columns": cols, "seconds": round(time.time() - t0, 1)}))
    return shape.dir


def input_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.parquet"))


@dataclass
class Result:
    status: str  # ok | timeout | oom | error
    seconds: float
    peak_rss: int
    cpu: float = 0.0  # user + system seconds of the whole tree (less sensitive than wall time to other load)
    detail: str = ""
    output: dict | None = None


def run_tree(cmd: list[str], timeout: float, env: dict[str, str] | None = None, poll: float = 0.05,
             memory_cap: int | None = None, disk_floor: tuple[Path, int] | None = None) -> Result:
    """Run cmd; wall time and peak RSS summed over the process tree (polled). The last stdout line, if JSON,
    is the contender's own report. Killed (status timeout/oom/disk) past `timeout`, `memory_cap`, or when the
    disk holding `disk_floor[0]` has less than `disk_floor[1]` bytes free."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    status = "ok"
    while proc.poll() is None:
        total = 0
        try:
            procs = [ps, *ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        if time.time() - t0 > timeout:
            status = "timeout"
            break
        if memory_cap and total > memory_cap:
            status = "oom"
            break
        if disk_floor and shutil.disk_usage(disk_floor[0]).free < disk_floor[1]:
            status = "disk"
            break
        time.sleep(poll)
    if status != "ok":
        os.killpg(proc.pid, 9)
    out, err = proc.communicate()
    secs = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if status == "ok" and proc.returncode != 0:
        low = err.decode(errors="replace").lower()
        status = "oom" if proc.returncode in (-9, 137) or "out of memory" in low or "memoryerror" in low else "error"
    report = None
    lines = out.decode(errors="replace").strip().splitlines()
    if lines:
        try:
            report = json.loads(lines[-1])
        except json.JSONDecodeError:
            report = None
    detail = err.decode(errors="replace").strip().splitlines()[-1][:200] if status == "error" and err.strip() else ""
    return Result(status, secs, peak, cpu, detail, report)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


if __name__ == "__main__":
    for k in sys.argv[1:] or ["a", "c"]:
        s = quick(SHAPES[k[0]]) if k.endswith("q") else SHAPES[k]  # e.g. "aq": shape a, quick
        print(k, ensure_data(s), flush=True)
