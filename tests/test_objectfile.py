"""Reading checkpoints from GCS (fake-gcs-server): the same bytes as the object, in few requests, from the
version that was listed."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx.config import Settings
from bqx.errors import TransientError
from bqx.gcp import storage
from bqx.gcp.objectfile import ObjectFile
from bqx.merge.plan import MergeInput, object_opener
from bqx.merge.stream import merge
from bqx.parquet.conventions import KEY_TYPE, WRITER_OPTIONS


def _put(settings: Settings, name: str, data: bytes) -> tuple[int, int]:
    bucket = storage.bucket(settings, settings.staging_bucket)
    bucket.blob(name).upload_from_string(data)
    return storage.list_versions(settings, settings.staging_bucket, name)[name]


def _parquet(rows: int, columns: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    keys = pa.array(np.arange(rows, dtype=np.int64) * 60_000_000, type=pa.int64()).cast(KEY_TYPE)
    table = pa.table({"interval_time": keys, **{f"v{i}": rng.standard_normal(rows) for i in range(columns)}})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows, **WRITER_OPTIONS)
    return buf.getvalue()


def test_random_reads_return_the_objects_bytes(isolated: Settings) -> None:
    data = random.Random(1).randbytes(300_000)
    size, generation = _put(isolated, "blob.bin", data)
    assert size == len(data)
    bucket = storage.bucket(isolated, isolated.staging_bucket)
    rnd = random.Random(2)
    for whole_below in (1 << 20, 50_000):  # fetched whole, or in ranges of 64 KiB
        f = ObjectFile(bucket.blob("blob.bin", generation=generation), size, whole_below=whole_below,
                       chunk=64 << 10, tail=16 << 10)
        for _ in range(200):
            pos, n = rnd.randrange(0, size + 10), rnd.randrange(0, 100_000)
            f.seek(pos)
            assert f.read(n) == data[pos : pos + n]
            assert f.tell() == max(pos, min(pos + n, size))
        f.seek(-10, 2)
        assert f.read() == data[-10:]
        if whole_below > size:
            assert f.fetches <= 2  # the tail, then the whole object: every other read from memory
        else:
            assert 200 < f.fetches < 3 * 200  # ranges of 64 KiB: at most 2 (+ the tail) per read of < 100 KB
        f.close()


def test_a_checkpoint_costs_one_request_for_its_schema_and_two_for_a_merge(isolated: Settings) -> None:
    targets, feature = _parquet(5_000, 2, 1), _parquet(5_000, 30, 2)
    bucket = storage.bucket(isolated, isolated.staging_bucket)
    opened: list[tuple[str, ObjectFile]] = []

    def counted(name: str, data: bytes):  # type: ignore[no-untyped-def]
        inner = object_opener(bucket, name, *_put(isolated, name, data))

        def open_() -> ObjectFile:
            f = inner()
            opened.append((name, f))  # type: ignore[arg-type]
            return f  # type: ignore[return-value]
        return open_

    t = MergeInput("targets", "", counted("targets.parquet", targets), remote=True)
    fs = [MergeInput("feat", "f", counted("feat.parquet", feature), remote=True)]
    sink = io.BytesIO()
    merge(t, fs, sink)
    out = pq.read_table(io.BytesIO(sink.getvalue()))
    assert out.num_columns == 1 + 2 + 30 and out.num_rows == 5_000
    assert out.column("f_v3").equals(pq.read_table(io.BytesIO(feature)).column("v3"))
    reads = {name: sorted(f.fetches for n, f in opened if n == name) for name, _ in opened}
    assert reads["feat.parquet"] == [1, 2], reads  # its schema (the footer), then the merge (footer + whole)
    assert reads["targets.parquet"] == [2], reads  # opened once: footer + whole, key chunks included
    assert all(f.closed for _, f in opened)


def test_a_replaced_checkpoint_is_a_transient_error_not_a_mix_of_versions(isolated: Settings) -> None:
    size, generation = _put(isolated, "c.parquet", _parquet(1_000, 3, 1))
    _put(isolated, "c.parquet", _parquet(1_000, 3, 2))  # re-extracted after the listing
    f = ObjectFile(storage.bucket(isolated, isolated.staging_bucket).blob("c.parquet", generation=generation), size)
    with pytest.raises(TransientError, match="changed while being read"):
        f.read(100)
