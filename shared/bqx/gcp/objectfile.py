"""A read-only, seekable file over one generation of a GCS object, shaped for reading Parquet checkpoints.

The merge reads each checkpoint's footer twice (once for the output schema, once to merge the table), its key
column, and then its column chunks. Through `Blob.open("rb")` that was ~9 requests per checkpoint: a metadata
request on the first seek from the end, 4 MiB ranges re-fetched as the reader jumped between the footer and the
data, and the key chunk read twice. Here the size and generation come from the listing the merge already makes,
a read near the end fetches only the tail, and an object small enough is fetched whole on the first read
elsewhere: 1 request for a schema, 2 for a merged table. Larger objects are read in ranges of `chunk` bytes, or
(chunk=0, for validation, which reads only the key column) exactly the bytes asked for.

The generation is pinned: if the object is replaced while it is read, reads raise ObjectGone instead of mixing
two versions' bytes.
"""

from __future__ import annotations

import io
import os
from typing import Any

from google.api_core import exceptions as gexc

from bqx.errors import ObjectGone, TransientError
from bqx.gcp import storage

TAIL = 64 << 10  # a Parquet footer of ~1,000 columns; pyarrow asks for the last 64 KiB first
WHOLE_BELOW = 8 << 20  # objects up to this size are fetched in one request (held while their table is merged)
CHUNK = 4 << 20  # ranged reads of larger objects


def download(blob: Any, start: int, end: int) -> bytes:
    """Bytes [start, end) of `blob` (its pinned generation)."""
    try:
        # One read of the whole body: the default streams it 8 KiB at a time through Python, which took twice the
        # CPU (1.6 s per GB against fake-gcs-server) on a job with one vCPU. Ranges are at most a few MiB.
        data = blob.download_as_bytes(start=start, end=end - 1, checksum=None, single_shot_download=True)
    except gexc.NotFound:  # that generation is gone: replaced (re-extracted) or deleted since it was listed
        raise ObjectGone(f"{blob.name} changed while being read") from None
    except storage.TRANSIENT as exc:
        raise TransientError(f"reading {blob.name}: {exc}") from exc
    if len(data) != end - start:
        raise OSError(f"{blob.name}: asked for bytes {start}-{end - 1}, got {len(data)}")
    return data


class ObjectFile(io.RawIOBase):
    def __init__(self, blob: Any, size: int, whole_below: int = WHOLE_BELOW, chunk: int = CHUNK, tail: int = TAIL,
                 tail_data: bytes | None = None) -> None:
        super().__init__()
        self.blob, self.size = blob, size
        self.whole_below, self.chunk, self.tail = whole_below, chunk, tail
        self.pos = 0
        self.fetches = 0  # requests made (for tests and logs)
        # (start, bytes) of the object's end (given, if the caller read it already) and of the last other range
        self._tail: tuple[int, bytes] | None = (size - len(tail_data), tail_data) if tail_data else None
        self._window: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"seek before the start of {self.blob.name}")
        self.pos = base + offset
        return self.pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        end = self.size if size is None or size < 0 else min(self.size, self.pos + size)
        if end <= self.pos:
            return b""
        out = bytearray()
        while self.pos < end:
            start, data = self._segment(self.pos, end)
            piece = data[self.pos - start : end - start]
            out += piece
            self.pos += len(piece)
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._tail = self._window = None
        super().close()

    def _segment(self, pos: int, end: int) -> tuple[int, bytes]:
        """A cached (start, bytes) holding `pos`, fetched if none does (`end`: where the read asking stops)."""
        for seg in (self._window, self._tail):
            if seg is not None and seg[0] <= pos < seg[0] + len(seg[1]):
                return seg
        if pos >= self.size - self.tail and self._window is None and self._tail is None:  # a footer read
            start = max(0, self.size - self.tail)
            self._tail = (start, self._fetch(start, self.size))
            return self._tail
        if self.size <= self.whole_below:
            self._window = (0, self._fetch(0, self.size))
        else:
            stop = min(self.size, pos + self.chunk) if self.chunk else end
            if self._tail is not None:
                stop = min(stop, self._tail[0]) if pos < self._tail[0] else stop
            self._window = (pos, self._fetch(pos, max(stop, pos + 1)))
        return self._window

    def _fetch(self, start: int, end: int) -> bytes:
        self.fetches += 1
        return download(self.blob, start, end)
