"""A checkpoint's footer kept as it is written, so the compose merge need not read it back from the object.

The extract writes each checkpoint through a TailKeeper, which sees every byte on its way out: the file's size,
its crc32c (the checksum GCS computes and lists for the object) and its last bytes, the footer. What a task wrote
becomes one footer index (bqx.footer_index). An entry names a checkpoint's content, not an object generation, so
a server-side copy of the checkpoint (a reused table) has the same entry; a reader takes an entry only for an
object whose listed size and crc32c are the entry's (KeptFooters.find).
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import google_crc32c

from bqx.parquet.footer import TRAILER, NotParquet, footer_length

INDEX_MAGIC = b"BQXF"
# A checkpoint's footer is 0.6-16 KB at 2,000 rows (one row group) and grows by about that much for each further
# row group (65,536 rows): 256 KiB holds any the pipeline writes; a larger one is read from the object instead.
KEEP_BYTES = 256 * 1024
INDEX_FORMAT = 1


def crc32c_b64(value: int) -> str:
    """A crc32c as GCS lists it (base64 of the big-endian 4 bytes)."""
    return base64.b64encode(struct.pack(">I", value)).decode()


@dataclass(frozen=True)
class KeptFooter:
    """A checkpoint's content as listed (size, crc32c) and its tail: the encoded footer, its length, PAR1."""

    size: int
    crc32c: str
    tail: bytes

    def __post_init__(self) -> None:
        if len(self.tail) < TRAILER or footer_length(self.tail) + TRAILER != len(self.tail):
            raise NotParquet("a kept tail is not exactly a footer, its length and PAR1")
        if self.size < len(self.tail) + 4:
            raise NotParquet(f"a kept tail of {len(self.tail)} bytes for a file of {self.size}")


class KeptFooters:
    """Footers from any number of indexes (task attempts, runs), found by what an object is: its name, size and
    crc32c. Two attempts may each have kept a footer under one name (a checkpoint set aside and written again): the
    object's checksum picks the one that describes it."""

    def __init__(self) -> None:
        self.footers: dict[tuple[str, int, str], KeptFooter] = {}

    def update(self, footers: dict[str, KeptFooter]) -> None:
        for name, kept in footers.items():
            self.footers[(name, kept.size, kept.crc32c)] = kept

    def find(self, name: str, size: int, crc32c: str | None) -> KeptFooter | None:
        return self.footers.get((name, size, crc32c)) if crc32c else None

    def __len__(self) -> int:
        return len(self.footers)


class TailKeeper:
    """A write-only file in front of `sink`: passes every write through, counting, checksumming and keeping the
    last KEEP_BYTES. `footer()` after the Parquet writer closed: the KeptFooter (None if the footer is larger)."""

    def __init__(self, sink: Any, keep: int = KEEP_BYTES) -> None:
        self.sink, self.keep = sink, keep
        self.size = 0
        self.crc = google_crc32c.Checksum()
        self.chunks: deque[bytes] = deque()
        self.kept = 0

    def write(self, data: Any) -> int:
        data = data if isinstance(data, bytes) else bytes(data)  # pyarrow writes bytes; crc32c needs read-only
        self.size += len(data)
        self.crc.update(data)
        piece = data if len(data) <= self.keep else data[-self.keep :]
        self.chunks.append(piece)
        self.kept += len(piece)
        while self.chunks and self.kept - len(self.chunks[0]) >= self.keep:
            self.kept -= len(self.chunks.popleft())
        self.sink.write(data)
        return len(data)

    def footer(self) -> KeptFooter | None:
        tail = b"".join(self.chunks)[-self.keep :]
        try:
            length = footer_length(tail)
        except NotParquet:
            return None
        if length + TRAILER > len(tail):
            return None
        return KeptFooter(self.size, crc32c_b64(int.from_bytes(self.crc.digest(), "big")),
                          tail[len(tail) - length - TRAILER :])

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()

    @property
    def closed(self) -> bool:
        return bool(getattr(self.sink, "closed", False))


class FooterIndex:
    """The footers one extract task attempt kept, by checkpoint object name (written from several threads).

    Encoded as MAGIC, the header's length (4 bytes, little-endian), the header (JSON: format, and per footer its
    object name, size, crc32c and tail length), then the tails in the header's order: the footers' own bytes."""

    def __init__(self) -> None:
        self.footers: dict[str, KeptFooter] = {}
        self.lock = threading.Lock()

    def add(self, name: str, kept: KeptFooter | None) -> None:
        if kept is not None:
            with self.lock:
                self.footers[name] = kept

    def __len__(self) -> int:
        return len(self.footers)

    def encode(self) -> bytes:
        with self.lock:
            items = sorted(self.footers.items())
        header = json.dumps({"format": INDEX_FORMAT,
                             "footers": [[n, k.size, k.crc32c, len(k.tail)] for n, k in items]}).encode()
        return b"".join([INDEX_MAGIC, struct.pack("<I", len(header)), header, *(k.tail for _, k in items)])


def parse_index(raw: bytes) -> dict[str, KeptFooter]:
    """The footers of an encoded FooterIndex; one that does not parse is left out (its footer is read instead),
    and so is the whole index when its header does not."""
    if raw[:4] != INDEX_MAGIC or len(raw) < 8:
        return {}
    n = struct.unpack("<I", raw[4:8])[0]
    try:
        header = json.loads(raw[8 : 8 + n])
        entries = header["footers"] if header.get("format") == INDEX_FORMAT else []
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    out, pos = {}, 8 + n
    for entry in entries:
        try:
            name, size, crc, length = entry
            out[str(name)] = KeptFooter(int(size), str(crc), raw[pos : pos + int(length)])
            pos += int(length)
        except (ValueError, TypeError):
            return out  # the tails after a bad entry cannot be placed
    return out
