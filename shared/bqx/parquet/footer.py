"""A Parquet file's tail: `PAR1`, data, the encoded FileMetaData, its length (4 bytes, little-endian), `PAR1`.
Every reader of a footer's bytes (the stitcher, the merge's copy path, checkpoint inspection) finds it here."""

from __future__ import annotations

import os
from typing import BinaryIO

MAGIC = b"PAR1"
TRAILER = 8  # the footer's length and the closing magic


class NotParquet(ValueError):
    """The bytes do not end as a Parquet file does."""


def footer_length(tail: bytes | memoryview) -> int:
    """The length of the FileMetaData that a file's last bytes (`tail`, at least its last 8) declare."""
    if len(tail) < TRAILER or bytes(tail[-4:]) != MAGIC:
        raise NotParquet("not a Parquet file: no footer magic at its end")
    return int.from_bytes(bytes(tail[-8:-4]), "little")


def footer_start(data: bytes | memoryview) -> int:
    """Offset where a whole Parquet file's encoded FileMetaData starts (it ends 8 bytes before the file does)."""
    return len(data) - TRAILER - footer_length(data)


def read_footer(f: BinaryIO) -> bytes:
    """The encoded FileMetaData of the seekable Parquet file `f`."""
    f.seek(-TRAILER, os.SEEK_END)
    n = footer_length(f.read(TRAILER))
    f.seek(-TRAILER - n, os.SEEK_END)
    return f.read(n)
