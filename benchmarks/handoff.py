#!/usr/bin/env python
"""Handoff latency on the local stack: from the last checkpoint's finalize to the merge job's run request.

Starts the whole embedded stack (fake-gcs-server publishing finalize events to the Pub/Sub emulator, push
subscriptions to the `completion` function under functions-framework, the local Cloud Run API) on free ports in
a temporary BQX_HOME, then, one run at a time: writes a manifest of N tables, uploads the N checkpoints (real,
valid Parquet; 4 at a time, like the extract), and waits for the Run API's journal (executions.jsonl) to record
the merge execution of that run. Latency = the execution's `created` time minus the last checkpoint's finalize
(the earlier of the object's timeCreated and the moment its upload returned). The merge job itself is then let
finish before the next run, so runs do not overlap.

    python benchmarks/handoff.py [--runs 60] [--tables 20]

Goal (issue 4): p99 <= 2 s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bqx import layout, storage
from bqx.catalog import TARGET_COLUMNS, Column, Manifest, TableEntry
from bqx.config import Settings
from bqx.local.stack import Stack, client_env, use_free_ports
from bqx.parquet_io import KEY_TYPE, WRITER_OPTIONS

PAIR = "eurusd"
GOAL_P99 = 2.0
ROWS = 50


def parquet(columns: tuple[Column, ...]) -> bytes:
    base = 1_700_000_000_000_000
    data = {"interval_time": pa.array([base + 60_000_000 * i for i in range(ROWS)], pa.int64()).cast(KEY_TYPE)}
    for c in columns[1:]:
        data[c.name] = pa.array([float(i) for i in range(ROWS)], pa.float64())
    buf = io.BytesIO()
    pq.write_table(pa.table(data), buf, **WRITER_OPTIONS)
    return buf.getvalue()


def manifest_for(run_id: str, tables: int) -> Manifest:
    key = Column("interval_time", "timestamp[us, tz=UTC]")
    entries = [TableEntry(f"targets_{PAIR}", "targets", (key, *(Column(c, "double") for c in TARGET_COLUMNS[:4])),
                          layout.checkpoint(PAIR, run_id, f"targets_{PAIR}"))]
    for i in range(tables - 1):
        name = f"mom_{PAIR}_{i:03d}"
        entries.append(TableEntry(name, "feature", (key, Column(f"f{i:03d}", "double")),
                                  layout.checkpoint(PAIR, run_id, name)))
    return Manifest(PAIR, run_id, tuple(entries), source="benchmark", created_at=time.time())


class Journal:
    """Reads the Run API's executions.jsonl as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.started, self.completed = path, 0, {}, set()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                rec = json.loads(line)
                if rec["event"] == "started" and rec["job"].endswith("merge"):
                    self.started.setdefault(rec["env"].get("BQX_RUN_ID"), []).append(rec)
                elif rec["event"] == "completed":
                    self.completed.add(rec["name"])


def one_run(s: Settings, journal: Journal, tables: int, timeout: float = 60.0) -> dict[str, float]:
    run_id = f"h{uuid.uuid4().hex[:12]}"
    m = manifest_for(run_id, tables)
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    bucket = storage.bucket(s, s.staging_bucket)

    def upload(entry: TableEntry) -> float:
        blob = bucket.blob(entry.checkpoint)
        blob.upload_from_string(parquet(entry.columns), content_type="application/octet-stream")
        returned = time.time()
        created = blob.time_created.timestamp() if blob.time_created else returned
        return min(created, returned)

    with ThreadPoolExecutor(4) as pool:
        finalized = list(pool.map(upload, m.tables))
    last = max(finalized)
    deadline = time.time() + timeout
    while run_id not in journal.started:
        if time.time() > deadline:
            raise RuntimeError(f"no merge request for run {run_id} within {timeout:.0f}s; see {s.home}/stack/*.log")
        time.sleep(0.005)
        journal.poll()
    recs = journal.started[run_id]
    latency = recs[0]["created"] - last
    while recs[0]["name"] not in journal.completed and time.time() < deadline:  # let the merge finish first
        time.sleep(0.05)
        journal.poll()
    return {"latency": latency, "merges": len(recs), "upload_span": last - min(finalized)}


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--tables", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="runs before measuring (first-request imports)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="bqx-handoff-"))
    os.environ.update({"BQX_LOCAL": "1", "BQX_HOME": str(home)})
    use_free_ports()
    settings = Settings.from_env()
    os.environ.update(client_env(settings))
    stack = Stack(settings)
    results: list[dict[str, float]] = []
    t0 = time.time()
    try:
        stack.up(progress=lambda msg: print(f"  {msg}", file=sys.stderr))
        journal = Journal(home / "run-api" / "executions.jsonl")
        for i in range(args.warmup + args.runs):
            r = one_run(settings, journal, args.tables)
            if i >= args.warmup:
                results.append(r)
            if (i + 1) % 10 == 0:
                print(f"  {i + 1} runs", file=sys.stderr, flush=True)
    finally:
        stack.down()
    lat = [r["latency"] for r in results]
    summary = {
        "runs": len(lat), "tables_per_run": args.tables,
        "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat), "min": min(lat),
        "mean": statistics.fmean(lat), "merges_per_run": sorted({r["merges"] for r in results}),
        "goal_p99": GOAL_P99, "seconds": time.time() - t0,
    }
    shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"handoff latency: last checkpoint finalized -> merge run requested "
              f"({summary['runs']} runs x {args.tables} tables, local stack, {os.cpu_count()} cores)")
        print(f"{'':8s}{'seconds':>10s}")
        for k in ("min", "p50", "mean", "p90", "p99", "max"):
            print(f"{k:8s}{summary[k]:10.3f}")
        verdict = "met" if summary["p99"] <= GOAL_P99 else "MISSED"
        print(f"goal p99 <= {GOAL_P99:.1f}s: {verdict}; merges per run: {summary['merges_per_run']}")
    return 0 if summary["p99"] <= GOAL_P99 else 1


if __name__ == "__main__":
    sys.exit(main())
