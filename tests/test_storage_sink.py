"""storage.ObjectSink against fake-gcs-server: one request while small, resumable when large, create-once,
and nothing at all when the writer fails."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc

from bqx.gcp import storage

SMALL, CHUNK = 1 << 20, 1 << 20


def _blob(s, name: str):  # type: ignore[no-untyped-def]
    return storage.bucket(s, s.staging_bucket).blob(name)


def test_a_small_object_is_created_once(isolated) -> None:  # type: ignore[no-untyped-def]
    with storage.ObjectSink(_blob(isolated, "a"), SMALL, CHUNK, "application/octet-stream", 0) as sink:
        sink.write(b"x" * 1000)
        assert sink.tell() == 1000 and sink.writer is None  # still in memory: one request at close
    assert _blob(isolated, "a").download_as_bytes() == b"x" * 1000
    with pytest.raises(gexc.PreconditionFailed):  # create-once: a second writer cannot replace it
        with storage.ObjectSink(_blob(isolated, "a"), SMALL, CHUNK, "application/octet-stream", 0) as sink:
            sink.write(b"y")
    assert _blob(isolated, "a").download_as_bytes() == b"x" * 1000


def test_a_large_object_streams_as_a_resumable_upload(isolated) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * (3 * CHUNK // 256 + 7)
    with storage.ObjectSink(_blob(isolated, "b"), SMALL, CHUNK, "application/octet-stream") as sink:
        for i in range(0, len(data), 300_000):
            sink.write(data[i:i + 300_000])
        assert sink.writer is not None  # past `small`: a resumable session
    assert _blob(isolated, "b").download_as_bytes() == data


@pytest.mark.parametrize("size", [1000, 3 * CHUNK])
def test_a_failed_writer_leaves_no_object(isolated, size: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError):
        with storage.ObjectSink(_blob(isolated, "c"), SMALL, CHUNK, "application/octet-stream") as sink:
            sink.write(b"z" * size)
            raise RuntimeError("the source failed mid-table")
    assert not storage.exists(isolated, isolated.staging_bucket, "c")
