"""The merge's output bytes, as sha256 digests of fixed inputs: run it before and after a change that must not
change them (issue 18: "the merge of fixed inputs gives the same sha256 before and after").

    .venv/bin/python scripts/merge_digest.py [--rows 3000] [--table-scale 0.1]

One run of one pair is extracted from a generated DuckDB warehouse (fixed seed) into fake-gcs-server and validated,
as the pipeline does. Then, each printed with its sha256:
  - `bqx merge --from DIR --to FILE` (the stream method, in its own process) over the run's checkpoints, at a
    large budget (one row group) and a small one (split row groups, column slices);
  - the same over checkpoints written aligned to the targets' keys (the path that copies encoded chunks);
  - the stream method reading the checkpoints from GCS (bqx.merge.plan.gcs_inputs);
  - the polars method (reads the checkpoints from GCS through pyarrow's filesystem).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PAIR = "eurusd"
BUDGETS = ("1GiB", "2MiB")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli_merge(src: Path, dst: Path, budget: str) -> str:
    bqx = Path(sys.executable).with_name("bqx")
    subprocess.run([str(bqx), "merge", "--from", str(src), "--to", str(dst), "--memory-budget", budget,
                    "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
    return sha(dst.read_bytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--table-scale", type=float, default=0.1)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from bqx.catalog import KEY
    from bqx.gcp import storage
    from bqx.local.warehouse import Shape
    from bqx.parquet.conventions import CHECKPOINT_ROW_GROUP, WRITER_OPTIONS

    from fakes import merge_world

    shape = Shape(rows=args.rows, seed=7, table_scale=args.table_scale)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bqx-digest-") as tmp, \
            merge_world(Path(tmp) / "world", shape, PAIR, run_id="rdigest", memory_budget=2 << 20) as w:
        settings, manifest = w["settings"], w["manifest"]
        src, aligned = Path(tmp) / "in", Path(tmp) / "aligned"
        src.mkdir()
        aligned.mkdir()
        bucket = storage.bucket(settings, settings.staging_bucket)
        for t in manifest.tables:
            (src / f"{t.name}.parquet").write_bytes(bucket.blob(t.checkpoint).download_as_bytes())
        keys = pq.read_table(src / f"{manifest.targets.name}.parquet", columns=[KEY])
        for p in src.glob("*.parquet"):
            data = pq.read_table(p)
            if p.stem != manifest.targets.name:
                data = keys.join(data, KEY, join_type="left outer").sort_by(KEY).select(data.column_names)
            pq.write_table(data, aligned / p.name, row_group_size=CHECKPOINT_ROW_GROUP, **WRITER_OPTIONS)
        for budget in BUDGETS:
            rows.append((f"bqx merge --from (stream) {budget}", cli_merge(src, Path(tmp) / "out.parquet", budget)))
        for budget in BUDGETS:
            rows.append((f"bqx merge --from aligned (copy) {budget}",
                         cli_merge(aligned, Path(tmp) / "out.parquet", budget)))

        from bqx.merge.plan import gcs_inputs
        from bqx.merge.stream import merge

        sink = io.BytesIO()
        targets, features = gcs_inputs(settings, manifest)
        merge(targets, features, sink, memory_budget=2 << 20, workers=2, metadata={"bqx.method": "stream"})
        rows.append(("stream from GCS 2MiB", sha(sink.getvalue())))
        try:
            from bqx.merge import polars

            sink = io.BytesIO()
            polars.polars_merge(settings, manifest, sink, {"bqx.method": "polars"}, max_group_columns=200)
            rows.append(("polars from GCS 2MiB", sha(sink.getvalue())))
        except ImportError as exc:
            rows.append(("polars", f"not run: {exc}"))
    print(f"inputs: {PAIR}, {len(manifest.tables)} checkpoints, {shape.describe()}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
