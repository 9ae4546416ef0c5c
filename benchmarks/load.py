#!/usr/bin/env python
"""Load (issue 7): all 28 pairs requested at once on the local stack, with a small warehouse.

Starts the whole embedded stack on free ports under a temporary BQX_HOME, generates a small warehouse for every
pair, drops the 28 request objects at once and follows every run to its training file, sampling the RSS of every
process of the stack (functions, emulators, the Cloud Run API and every job it runs) twice a second. Then checks:
28 outputs, each equal to a LEFT JOIN computed directly in DuckDB over its run's manifest tables; exactly 28 merge
executions (one per run) in the Cloud Run API's journal; and reports the wall time and the peak memory.

    python benchmarks/load.py [--rows 300] [--table-scale 0.03] [--column-scale 0.5] [--timeout 1200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bqx import layout, runs
from bqx.catalog import KEY, Manifest
from bqx.config import Settings
from bqx.extract.sources import quote_duckdb as q
from bqx.gcp import storage
from bqx.local.stack import Stack, client_env, use_free_ports
from bqx.local.warehouse import Shape, Warehouse
from bqx.pairs import PAIRS


class MemorySampler(threading.Thread):
    """Peak summed RSS of the stack's process trees, and the peak of any single extract or merge job."""

    def __init__(self, stack: Stack, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.stack, self.interval = stack, interval
        self.peak_total = 0
        self.peak_job = {"extract": 0, "merge": 0}
        self.peak_jobs_running = {"extract": 0, "merge": 0}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        names = [svc.name for svc in self.stack.services()]
        while not self.stop_flag.is_set():
            total, running = 0, {"extract": 0, "merge": 0}
            for name in names:
                pid = self.stack.pid(name)
                if pid is None:
                    continue
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        cmd = " ".join(p.cmdline())
                    except psutil.Error:
                        continue
                    total += rss
                    for job in ("extract", "merge"):
                        if f"jobs/{job}/main.py" in cmd:
                            running[job] += 1
                            self.peak_job[job] = max(self.peak_job[job], rss)
            self.peak_total = max(self.peak_total, total)
            for job, n in running.items():
                self.peak_jobs_running[job] = max(self.peak_jobs_running[job], n)
            self.stop_flag.wait(self.interval)


def reference_join(con: duckdb.DuckDBPyConnection, dataset: str, manifest: Manifest) -> pa.Table:
    select, joins = ["t.*"], []
    for i, f in enumerate(manifest.features):
        prefix = layout.prefix_of(manifest.pair, f.name)
        select += [f"j{i}.{q(c.name)} AS {q(prefix + '_' + c.name)}" for c in f.value_columns]
        joins.append(f"LEFT JOIN {q(dataset)}.{q(f.name)} j{i} USING ({q(KEY)})")
    sql = (f"SELECT {', '.join(select)} FROM {q(dataset)}.{q(manifest.targets.name)} t {' '.join(joins)} "
           f"ORDER BY {q(KEY)}")
    return con.sql(sql).to_arrow_table()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--table-scale", type=float, default=0.03)
    ap.add_argument("--column-scale", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))

    home = Path(tempfile.mkdtemp(prefix="bqx-load-"))
    os.environ.update({"BQX_LOCAL": "1", "BQX_HOME": str(home)})
    use_free_ports()
    s = Settings.from_env()
    os.environ.update(client_env(s))
    shape = Shape(rows=args.rows, seed=11, table_scale=args.table_scale, column_scale=args.column_scale)
    t0 = time.time()
    wh = Warehouse(Path(s.warehouse), s.dataset)
    for pair in PAIRS:
        wh.generate(pair, shape)
    gen_seconds = time.time() - t0
    say(f"warehouse: 28 pairs, {shape.describe()}, generated in {gen_seconds:.1f}s")
    stack = Stack(s)
    stack.up(progress=lambda m: None)
    sampler = MemorySampler(stack)
    sampler.start()
    try:
        started = time.time()
        run_ids = {pair: runs.submit(s, pair) for pair in PAIRS}  # all 28 at once
        submitted = time.time() - started
        say(f"28 requests dropped in {submitted:.2f}s; following the runs")
        final: dict[str, runs.RunState] = {}
        done_at: dict[str, float] = {}
        deadline = started + args.timeout
        while len(final) < len(PAIRS) and time.time() < deadline:
            for pair, run_id in run_ids.items():
                if pair in final:
                    continue
                rs = runs.state(s, pair, run_id)
                if rs.state in ("done", "failed"):
                    final[pair], done_at[pair] = rs, time.time() - started
                    say(f"  {pair}: {rs.state} after {done_at[pair]:.1f}s ({len(final)}/28)")
            time.sleep(1.0)
        wall = time.time() - started
    finally:
        sampler.stop_flag.set()
        sampler.join()

    try:
        journal = [json.loads(x) for x in (s.home / "run-api" / "executions.jsonl").read_text().splitlines()]
        merges = [e for e in journal if e["event"] == "started" and e["job"] == s.merge_job]
        extracts = [e for e in journal if e["event"] == "started" and e["job"] == s.extract_job]
        merges_per_run = {rid: sum(1 for e in merges if e["env"].get("BQX_RUN_ID") == rid) for rid in run_ids.values()}
        con = duckdb.connect(s.warehouse, read_only=True)
        con.execute("SET TimeZone='UTC'")
        correct, checked, problems = 0, 0, []
        tables = columns = rows = 0
        for pair, run_id in run_ids.items():
            rs = final.get(pair)
            if rs is None or rs.state != "done":
                problems.append(f"{pair}: {rs.state if rs else 'not finished'} {rs.error if rs else ''}")
                continue
            manifest = Manifest.from_json(storage.read_json(s, s.staging_bucket, layout.manifest(pair, run_id))[0])
            data = storage.bucket(s, s.output_bucket).blob(layout.output(pair)).download_as_bytes()
            got = pq.read_table(pa.BufferReader(data))
            want = reference_join(con, s.dataset, manifest)
            checked += 1
            tables += len(manifest.tables)
            columns += got.num_columns
            rows += got.num_rows
            if got.schema.names == want.schema.names and got.equals(want.cast(got.schema)):
                correct += 1
            else:
                problems.append(f"{pair}: output differs from the reference join")
    finally:
        stack.down()

    result: dict[str, Any] = {
        "pairs": len(PAIRS),
        "shape": shape.describe(),
        "done": sum(1 for r in final.values() if r.state == "done"),
        "failed": sum(1 for r in final.values() if r.state == "failed"),
        "outputs_checked": checked,
        "outputs_correct": correct,
        "extract_executions": len(extracts),
        "merge_executions": len(merges),
        "runs_with_exactly_one_merge": sum(1 for n in merges_per_run.values() if n == 1),
        "checkpoints": tables,
        "output_columns_total": columns,
        "output_rows_total": rows,
        "wall_seconds": round(wall, 1),
        "first_done_seconds": round(min(done_at.values()), 1) if done_at else None,
        "last_done_seconds": round(max(done_at.values()), 1) if done_at else None,
        "peak_rss_total_mib": round(sampler.peak_total / 2**20),
        "peak_rss_extract_job_mib": round(sampler.peak_job["extract"] / 2**20),
        "peak_rss_merge_job_mib": round(sampler.peak_job["merge"] / 2**20),
        "peak_concurrent_jobs": sampler.peak_jobs_running,
        "warehouse_generation_seconds": round(gen_seconds, 1),
        "cores": os.cpu_count(),
        "problems": problems,
    }
    print(json.dumps(result, indent=1))
    ok = (result["outputs_correct"] == len(PAIRS) and result["merge_executions"] == len(PAIRS)
          and result["runs_with_exactly_one_merge"] == len(PAIRS))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
