"""Issue 17, item 8: validation cannot be made to allocate gigabytes. A checkpoint is validated (bqx.completion.validate
.arrival, against fake-gcs-server) in a process of its own whose peak RSS (VmHWM) is compared with the same
validation of a small valid checkpoint: a hostile file must cost at most EXTRA_RSS more, and be quarantined and
named in the run's error.json.

Before the bounds: 16 M delta-encoded keys (a ~60 KB file) decoded whole (~0.4 GB more), the same in RLE/dictionary
form, and a 160 MiB object whose footer length claims the whole file downloaded and parsed (~0.3 GB more).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.catalog import KEY, Column, Manifest, TableEntry
from bqx.gcp import storage

from fakes import apply_env, create_buckets, fake_gcs_server, gcs_env, local_settings

PAIR = "eurusd"
TABLE = "targets_eurusd"  # the manifest's one table must be its targets
ROWS = 16_000_000  # one row group: 16x the bound on rows read at once, ~0.4 GB decoded
EXTRA_RSS = 64 << 20  # what a hostile checkpoint may cost over a small valid one
KEY_TYPE = pa.timestamp("us", tz="UTC")

VALIDATE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fakes import local_settings
from bqx.catalog import Manifest
from bqx.completion import validate
from bqx.errors import BadCheckpoint
args = json.loads(sys.argv[2])
s = local_settings(Path(args["home"]), args["endpoint"], staging_bucket=args["bucket"])
manifest = Manifest.from_json(args["manifest"])
try:
    outcome = validate.arrival(s, manifest, args["name"], args["generation"])
except BadCheckpoint as exc:
    outcome = f"rejected: {exc}"
# This process's own peak: VmHWM (ru_maxrss would also count the test process it was forked from, before exec).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"outcome": outcome, "peak": int(status["VmHWM"].split()[0]) * 1024}))
"""


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("item8")
    with fake_gcs_server(root / "gcs") as endpoint:
        apply_env(gcs_env(endpoint))
        yield {"endpoint": endpoint, "home": root}


def _world(gcs: dict, run_id: str) -> tuple:
    s = local_settings(gcs["home"], gcs["endpoint"], staging_bucket=f"item8-{run_id}")
    create_buckets(s, s.staging_bucket)
    entry = TableEntry(TABLE, "targets", (Column(KEY, "timestamp[us, tz=UTC]"),),
                       layout.checkpoint(PAIR, run_id, TABLE))
    return s, Manifest(PAIR, run_id, (entry,)), entry.checkpoint


def _validate(gcs: dict, s, manifest: Manifest, name: str) -> dict:  # type: ignore[no-untyped-def]
    generation = int(storage.get_blob(s, s.staging_bucket, name).generation)
    args = {"home": str(gcs["home"]), "endpoint": gcs["endpoint"], "bucket": s.staging_bucket,
            "manifest": manifest.to_json(), "name": name, "generation": generation}
    done = subprocess.run([sys.executable, "-c", VALIDATE, str(Path(__file__).parent), json.dumps(args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _upload(s, name: str, path: Path) -> None:  # type: ignore[no-untyped-def]
    blob = storage.bucket(s, s.staging_bucket).blob(name)
    blob.chunk_size = 8 << 20  # a resumable upload in pieces: the test process never holds the object
    blob.upload_from_filename(str(path))


@pytest.fixture(scope="module")
def baseline(gcs: dict, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of validating a small valid checkpoint (imports, clients, one footer)."""
    s, manifest, name = _world(gcs, "ritem8-ok")
    path = tmp_path_factory.mktemp("ok") / "ok.parquet"
    keys = pa.array(np.arange(1000, dtype=np.int64) * 60_000_000, KEY_TYPE)
    pq.write_table(pa.table({KEY: keys}), path)
    _upload(s, name, path)
    got = _validate(gcs, s, manifest, name)
    assert got["outcome"] is True
    return int(got["peak"])


def _assert_quarantined(gcs: dict, s, manifest: Manifest, name: str, baseline: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    got = _validate(gcs, s, manifest, name)
    assert str(got["outcome"]).startswith("rejected:") and reason in got["outcome"], got
    assert got["peak"] - baseline < EXTRA_RSS, (f"validation peaked at {got['peak'] >> 20} MiB, "
                                                 f"{(got['peak'] - baseline) >> 20} MiB over a small checkpoint's")
    kept = layout.quarantine(PAIR, manifest.run_id, TABLE)
    assert storage.exists(s, s.staging_bucket, kept)
    assert not storage.exists(s, s.staging_bucket, name)
    record = storage.read_json(s, s.staging_bucket, layout.run_error(PAIR, manifest.run_id))
    assert record is not None
    error = record[0]
    assert error["table"] == TABLE and error["quarantined"] == kept and reason in error["error"]


def _one_row_group(path: Path, keys: pa.Array, **options: object) -> None:
    pq.write_table(pa.table({KEY: keys}), path, row_group_size=len(keys), **options)  # type: ignore[arg-type]


def test_item8_delta_encoded_keys_are_bounded_by_the_rows_the_footer_declares(gcs: dict, baseline: int,
                                                                               tmp_path: Path) -> None:
    s, manifest, name = _world(gcs, "ritem8-delta")
    path = tmp_path / "delta.parquet"
    keys = pa.array(np.arange(ROWS, dtype=np.int64) * 60_000_000, KEY_TYPE)
    _one_row_group(path, keys, use_dictionary=False, column_encoding={KEY: "DELTA_BINARY_PACKED"})
    del keys
    assert path.stat().st_size < 1 << 20  # valid, and tiny
    _upload(s, name, path)
    _assert_quarantined(gcs, s, manifest, name, baseline, f"row group 0 declares {ROWS} rows")


def test_item8_rle_keys_are_bounded_by_the_rows_the_footer_declares(gcs: dict, baseline: int,
                                                                     tmp_path: Path) -> None:
    s, manifest, name = _world(gcs, "ritem8-rle")
    path = tmp_path / "rle.parquet"
    keys = pa.array(np.full(ROWS, 1_700_000_000_000_000, dtype=np.int64), KEY_TYPE)
    _one_row_group(path, keys, use_dictionary=True)  # one dictionary value, its indices one RLE run
    del keys
    assert path.stat().st_size < 1 << 20
    _upload(s, name, path)
    _assert_quarantined(gcs, s, manifest, name, baseline, f"row group 0 declares {ROWS} rows")


def test_item8_a_footer_length_claiming_the_whole_object_is_not_read(gcs: dict, baseline: int,
                                                                     tmp_path: Path) -> None:
    s, manifest, name = _world(gcs, "ritem8-footer")
    size = 160 << 20
    path = tmp_path / "footer.parquet"
    with open(path, "wb") as f:  # sparse: PAR1, zeros, a footer length of everything between, PAR1
        f.write(b"PAR1")
        f.seek(size - 8)
        f.write(struct.pack("<I", size - 12) + b"PAR1")
    _upload(s, name, path)
    _assert_quarantined(gcs, s, manifest, name, baseline, f"footer of {size - 12} bytes is over the validation limit")
