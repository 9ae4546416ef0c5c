#!/usr/bin/env python
"""Handoff latency on the local stack, at the real shape: from the last checkpoint's finalize to the merge request.

Starts the whole embedded stack as `bqx stack up` does (the packaged completion function in its own venv, behind
the IAM gate, woken by fake-gcs-server's finalize events through Pub/Sub push) on free ports in a temporary
BQX_HOME; only the Run API's jobs are no-ops, so a run's merge costs nothing and runs do not overlap. Then, one
run at a time, it does what the extract does: writes the manifest, uploads the checkpoints 4 at a time through
the extract's own gate port (so events arrive while later checkpoints are still being written), then writes the
task's report. It waits until the Run API records the run's merge request.

- latency: the merge execution's creation time minus the last checkpoint's finalize (the earlier of the object's
  timeCreated and the moment its upload returned);
- per-event work: the completion function's own CPU and wall time for each event (its DEBUG "event handled"
  lines), every checkpoint and report event of the measured runs.

    python benchmarks/handoff.py                  # 20 runs of the real shape: 668 checkpoints, 2,000 rows
    python benchmarks/handoff.py --shape small    # 20-table runs (the old benchmark's shape)

Goals (issue 16): handoff p50 <= 1 s, p99 <= 2 s; per-event CPU median <= 10 ms, p99 <= 50 ms.
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
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path

from bqx import layout
from bqx.catalog import Column, Manifest, TableEntry, targets_table
from bqx.config import Settings
from bqx.extract.run import ExtractReport, save_report
from bqx.gcp import storage
from bqx.local.runapi import RunApi, make_handler
from bqx.local.stack import Stack, client_env, gate_ports, use_free_ports
from bqx.local.warehouse import Shape, feature_arrow, table_specs, targets_arrow
from bqx.parquet.conventions import type_name, write_checkpoint

PAIR = "eurusd"
GOALS = {"p50": 1.0, "p99": 2.0, "cpu_median_ms": 10.0, "cpu_p99_ms": 50.0}
SHAPES = {"real": Shape(), "small": Shape(rows=50, table_scale=0.03)}


def checkpoints(shape: Shape) -> list[tuple[str, str, tuple[Column, ...], bytes]]:
    """(table, kind, columns, Parquet bytes) for the pair's targets and feature tables, as the extract writes them
    (aligned to nothing: the synthetic warehouse's own rows)."""
    out = []
    tables = [(targets_table(PAIR), "targets", targets_arrow(PAIR, shape))]
    tables += [(spec.name, "feature", feature_arrow(PAIR, spec, shape)) for spec in table_specs(PAIR, shape)]
    for name, kind, table in tables:
        buf = io.BytesIO()
        write_checkpoint(table, buf)
        columns = tuple(Column(f.name, type_name(f.type)) for f in table.schema)
        out.append((name, kind, columns, buf.getvalue()))
    return out


class Journal:
    """The Run API's executions.jsonl as it grows: merge requests by run id."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.started = path, 0, {}

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


def one_run(s: Settings, extract_gcs: str, journal: Journal, data: list, timeout: float = 120.0) -> dict:
    run_id = f"h{uuid.uuid4().hex[:12]}"
    m = Manifest(PAIR, run_id, tuple(TableEntry(name, kind, cols, layout.checkpoint(PAIR, run_id, name))
                                     for name, kind, cols, _ in data), source="benchmark", created_at=time.time())
    os.environ["STORAGE_EMULATOR_HOST"] = extract_gcs  # as the extract job: through its gate port
    from bqx.gcp.clients import storage_client

    storage_client.cache_clear()
    storage.write_json(s, s.staging_bucket, layout.manifest(PAIR, run_id), m.to_json())
    bucket = storage.bucket(s, s.staging_bucket)
    payload = {name: body for name, _, _, body in data}

    def upload(entry: TableEntry) -> float:
        blob = bucket.blob(entry.checkpoint)
        blob.upload_from_string(payload[entry.name], content_type="application/vnd.apache.parquet",
                                if_generation_match=0)
        returned = time.time()
        created = blob.time_created.timestamp() if blob.time_created else returned
        return min(created, returned)

    with ThreadPoolExecutor(4) as pool:
        finalized = list(pool.map(upload, m.tables))
    last = max(finalized)
    save_report(s, ExtractReport(PAIR, run_id, task_index=0, task_count=1))
    deadline = time.time() + timeout
    while run_id not in journal.started:
        if time.time() > deadline:
            raise RuntimeError(f"no merge request for run {run_id} within {timeout:.0f}s; see {s.home}/stack/*.log")
        time.sleep(0.005)
        journal.poll()
    recs = journal.started[run_id]
    return {"run_id": run_id, "latency": recs[0]["created"] - last, "merges": len(recs),
            "upload_span": last - min(finalized), "checkpoints": len(m.tables)}


def event_costs(log: Path, since: float) -> list[dict]:
    """The completion function's "event handled" records logged after `since` (the measured runs')."""
    import calendar

    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"event handled"' not in line:
            continue
        try:
            rec = json.loads(line)
            at = calendar.timegm(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S")) + float(rec["time"][19:-1] or 0)
        except (ValueError, KeyError):
            continue
        if at >= since:
            out.append(rec)
    return out


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="real")
    ap.add_argument("--warmup", type=int, default=1, help="runs before measuring (first-request imports)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the stack's state folder (logs) afterwards")
    args = ap.parse_args(argv)

    shape = SHAPES[args.shape]
    t0 = time.time()
    data = checkpoints(shape)
    print(f"  {len(data)} checkpoints, {sum(len(d[3]) for d in data) / 1e6:.1f} MB per run, built in "
          f"{time.time() - t0:.1f}s", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix="bqx-handoff-"))
    os.environ.update({"BQX_LOCAL": "1", "BQX_HOME": str(home), "BQX_LOG_LEVEL": "DEBUG"})
    use_free_ports()
    settings = Settings.from_env()
    os.environ.update(client_env(settings))
    stack = Stack(settings)
    results: list[dict] = []
    api_server = None
    try:
        stack.up(progress=lambda msg: print(f"  {msg}", file=sys.stderr))
        # the stack's Run API, replaced on its port by one whose jobs do nothing: only the request is measured
        stack.stop("run_api")
        api = RunApi(home / "run-api-bench", {settings.extract_job: ["true"], settings.merge_job: ["true"]},
                     {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        api_server = ThreadingHTTPServer(("127.0.0.1", settings.ports.run_api), make_handler(api))
        api_server.daemon_threads = True
        threading.Thread(target=api_server.serve_forever, daemon=True).start()
        journal = Journal(home / "run-api-bench" / "executions.jsonl")
        extract_gcs = f"http://127.0.0.1:{gate_ports(settings)['extract']}"
        measured_from = time.time()
        for i in range(args.warmup + args.runs):
            if i == args.warmup:
                time.sleep(1.0)  # the warm-up's last events
                measured_from = time.time()
            r = one_run(settings, extract_gcs, journal, data)
            if i >= args.warmup:
                results.append(r)
            print(f"  run {i + 1}: handoff {r['latency']:.3f}s (uploads took {r['upload_span']:.1f}s)",
                  file=sys.stderr, flush=True)
        time.sleep(1.0)  # the last events' log lines
        costs = event_costs(home / "stack" / "completion.log", measured_from)
    finally:
        if api_server is not None:
            api_server.shutdown()
            api_server.server_close()
        stack.down()
    lat = [r["latency"] for r in results]
    cpu = [c["cpu_ms"] for c in costs]
    wall = [c["wall_ms"] for c in costs]
    summary = {
        "runs": len(lat), "checkpoints_per_run": results[0]["checkpoints"], "shape": args.shape,
        "rows": shape.rows, "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat),
        "min": min(lat), "mean": statistics.fmean(lat), "merges_per_run": sorted({r["merges"] for r in results}),
        "events": len(costs), "cpu_median_ms": pct(cpu, 50), "cpu_p99_ms": pct(cpu, 99), "cpu_max_ms": max(cpu),
        "cpu_per_run_s": sum(cpu) / 1000 / len(lat), "wall_median_ms": pct(wall, 50), "wall_p99_ms": pct(wall, 99),
        "goals": GOALS, "seconds": round(time.time() - t0, 1),
    }
    if args.keep:
        print(f"  state kept in {home}", file=sys.stderr)
    else:
        shutil.rmtree(home, ignore_errors=True)
    met = all(summary[k] <= v for k, v in GOALS.items())
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"handoff: last checkpoint finalized -> merge run requested ({summary['runs']} runs x "
              f"{summary['checkpoints_per_run']} checkpoints, {shape.rows} rows, local stack with the IAM gate, "
              f"{os.cpu_count()} cores)")
        print(f"{'':8s}{'seconds':>10s}")
        for k in ("min", "p50", "mean", "p90", "p99", "max"):
            print(f"{k:8s}{summary[k]:10.3f}")
        print(f"completion work per event ({summary['events']} events): CPU median {summary['cpu_median_ms']:.1f} ms, "
              f"p99 {summary['cpu_p99_ms']:.1f} ms, max {summary['cpu_max_ms']:.1f} ms; "
              f"{summary['cpu_per_run_s']:.2f} s of CPU per run; wall median {summary['wall_median_ms']:.1f} ms, "
              f"p99 {summary['wall_p99_ms']:.1f} ms")
        print(f"goals {GOALS}: {'met' if met else 'MISSED'}; merges per run: {summary['merges_per_run']}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
