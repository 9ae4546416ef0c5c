#!/usr/bin/env python
"""The extract's throughput with alignment (issue 19): the extract job on the same warehouse, every checkpoint
LEFT JOINed onto the targets' keys (BQX_EXTRACT_ALIGNED=1, the default) against today's unaligned reads
(BQX_EXTRACT_ALIGNED=0), both measured in this run, at the real shape (668 tables, ~17,000 columns).

Starts the embedded local stack on free ports under a temporary BQX_HOME (fake-gcs-server with its filesystem backend
holds the checkpoints, as in `bqx run`), generates the synthetic warehouse once per row count, then runs the extract
job (`python -m bqx.extract.job eurusd`, as the local Cloud Run API does) into a staging bucket of its own (the
stack's functions do not watch it: no validation or merge competes), alternating aligned and unaligned runs with fresh
run ids (an aligned run never reuses an unaligned run's checkpoints, nor the reverse: nothing is reused).

    python benchmarks/extract.py                       # 2,000 and 20,000 rows, 2 runs of each mode
    python benchmarks/extract.py --rows 2000 --repeat 3

Columns: the extract stage's seconds (the job's own report: manifest to last checkpoint), the job's wall seconds and
CPU seconds, its peak RSS, and the aligned/unaligned ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bqx import layout
from bqx.config import Settings
from bqx.gcp import storage
from bqx.gcp.clients import storage_client
from bqx.local.stack import Stack, client_env, use_free_ports
from bqx.local.warehouse import Shape, Warehouse

from _common import gib, run_tree

PAIR = "eurusd"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2000,20000")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bqx-extract-bench-"))
    os.environ.update({"BQX_LOCAL": "1", "BQX_HOME": str(home)})
    use_free_ports()
    s = Settings.from_env()
    os.environ.update(client_env(s))
    stack = Stack(s)
    stack.up(progress=lambda m: None)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        storage_client(s).create_bucket(bucket)
        print(f"{'rows':>7}  {'mode':<10} {'extract s':>10} {'wall s':>8} {'cpu s':>8} {'peak RSS':>9}  runs")
        for rows in (int(r) for r in args.rows.split(",")):
            t0 = time.time()
            Warehouse(Path(s.warehouse), s.dataset).generate(PAIR, Shape(rows=rows, seed=7))
            print(f"# warehouse: {rows} rows generated in {time.time() - t0:.0f}s", flush=True)
            results: dict[str, list[tuple[float, float, float, int]]] = {"unaligned": [], "aligned": []}
            for _ in range(args.repeat):
                for mode in ("unaligned", "aligned"):
                    run_id = f"b{uuid.uuid4().hex[:10]}"
                    # warnings only: the job's 668 "checkpoint written" lines would fill the pipe run_tree reads last
                    env = {"BQX_RUN_ID": run_id, "BQX_STAGING_BUCKET": bucket, "BQX_LOG_LEVEL": "WARNING",
                           "BQX_EXTRACT_ALIGNED": "1" if mode == "aligned" else "0"}
                    r = run_tree([sys.executable, "-m", "bqx.extract.job", PAIR], args.timeout, env=env)
                    if r.status != "ok":
                        raise SystemExit(f"{mode} extract {r.status}: {r.detail}")
                    names = storage.list_names(s, bucket, layout.extract_reports_prefix(PAIR, run_id))
                    report = storage.read_json(s, bucket, sorted(names)[-1])[0]
                    results[mode].append((float(report["seconds"]), r.seconds, r.cpu, r.peak_rss))
            med = {m: statistics.median(x[0] for x in v) for m, v in results.items()}
            for mode, v in results.items():
                print(f"{rows:>7}  {mode:<10} {med[mode]:>10.1f} {statistics.median(x[1] for x in v):>8.1f} "
                      f"{statistics.median(x[2] for x in v):>8.1f} {gib(max(x[3] for x in v)):>9}  "
                      f"{', '.join(f'{x[0]:.1f}' for x in v)}", flush=True)
            print(f"{rows:>7}  aligned/unaligned extract seconds: {med['aligned'] / med['unaligned']:.3f}", flush=True)
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)  # the warehouse and the checkpoints: ~1 GB at 20,000 rows


if __name__ == "__main__":
    main()
