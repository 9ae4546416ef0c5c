"""The merged file's bytes do not depend on which worker finishes first."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow.parquet as pq

from bqx import layout
from bqx.merge import MergeInput, local_inputs, merge
from bqx.warehouse import Shape, feature_arrow, table_specs, targets_arrow


def test_same_inputs_give_the_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    shape = Shape(rows=1500, seed=3, table_scale=0.05, column_scale=0.5)
    pq.write_table(targets_arrow("eurusd", shape), tmp_path / "targets_eurusd.parquet")
    for spec in table_specs("eurusd", shape):
        pq.write_table(feature_arrow("eurusd", spec, shape), tmp_path / f"{spec.name}.parquet")
    t, features = local_inputs(tmp_path)
    features = [MergeInput(f.table, layout.prefix_of("eurusd", f.table), f.open) for f in features]
    digests = set()
    for workers, budget in ((1, 64 << 20), (2, 64 << 20), (2, 8 << 20), (2, 64 << 20)):
        out = io.BytesIO()
        stats = merge(t, features, out, memory_budget=budget, workers=workers)
        assert stats.bytes == len(out.getvalue())
        digests.add((budget, hashlib.sha256(out.getvalue()).hexdigest()))
    # the budget may change row-group sizes (and so the bytes); the number of workers may not
    assert len(digests) == len({b for b, _ in digests})
