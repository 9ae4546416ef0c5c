"""`bqx warehouse generate` at the real shape (668 tables, ~17k columns): wall time and peak RSS of the streaming
generator against a baseline commit's generator, both measured in this run (issue 19: the one-transaction
generator passed 22 GB at 100k rows).

    python benchmarks/generate.py                          # 20,000 rows: ours and the baseline
    python benchmarks/generate.py --rows 20000,100000 --baseline-max-rows 20000
    python benchmarks/generate.py --baseline 4286fae --memory-cap 8

The baseline is the library at `--baseline` (a git ref; default the last commit before the generator streamed),
unpacked with `git archive` into a temporary folder. Each contender writes a fresh DuckDB file in its own process;
peak RSS is the process tree's, polled every 50 ms. A contender over `--memory-cap` GiB is stopped (status oom).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import gib, run_tree

REPO = Path(__file__).resolve().parents[1]
BASELINE = "4286fae"  # main before the streaming generator
SCRIPT = ("import sys; from pathlib import Path; from bqx.local.warehouse import Shape, Warehouse; "
          "Warehouse(Path(sys.argv[1]), 'bench').generate('eurusd', Shape(rows=int(sys.argv[2]), seed=7))")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="20000")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--baseline-max-rows", type=int, default=20_000,
                    help="Skip the baseline above this many rows (it holds every row in memory).")
    ap.add_argument("--memory-cap", type=float, default=12.0, help="GiB")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bqx-gen-") as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "shared"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        trees = {"ours": REPO / "shared", f"baseline {args.baseline}": base / "shared"}
        print(f"{'rows':>8}  {'generator':<18} {'status':<7} {'seconds':>8} {'cpu s':>8} {'peak RSS':>10} {'file':>10}")
        for rows in (int(r) for r in args.rows.split(",")):
            for name, tree in trees.items():
                if name != "ours" and rows > args.baseline_max_rows:
                    print(f"{rows:>8}  {name:<18} skipped (--baseline-max-rows {args.baseline_max_rows})")
                    continue
                db = Path(tmp) / f"{rows}-{name.split()[0]}.duckdb"
                r = run_tree([sys.executable, "-c", SCRIPT, str(db), str(rows)], args.timeout,
                             env={"PYTHONPATH": str(tree)}, memory_cap=int(args.memory_cap * 2**30))
                size = db.stat().st_size if db.exists() else 0
                print(f"{rows:>8}  {name:<18} {r.status:<7} {r.seconds:>8.1f} {r.cpu:>8.1f} {gib(r.peak_rss):>10} "
                      f"{gib(size):>10}  {r.detail}", flush=True)
                db.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
