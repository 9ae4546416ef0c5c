"""Column-chunk metadata spliced as bytes (bqx.parquet.chunks) must equal decoding, editing and encoding it in full."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx.parquet import chunks, thrift
from bqx.parquet.thrift import BINARY, I64, LIST, STRUCT


def _footer(table: pa.Table, **options: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)  # type: ignore[arg-type]
    data = buf.getvalue()
    n = struct.unpack("<I", data[-8:-4])[0]
    return data[-8 - n : -8]


def _edited_in_full(cc: thrift.Struct, delta: int, name: str | None, moved: bool) -> bytes:
    """The reference: the generic decoder's dicts edited the way a moved chunk must be."""
    cc = {k: v for k, v in cc.items() if k in (1, 2, 3)}
    md = dict(cc[3][1])
    if moved:
        md.pop(14, None)
        md.pop(15, None)
    if name is not None:
        md[3] = (LIST, (BINARY, [name.encode()]))
    for fid in (9, 10, 11, 14):
        if fid in md:
            md[fid] = (I64, md[fid][1] + delta)
    if cc.get(2, (I64, 0))[1]:
        cc[2] = (I64, cc[2][1] + delta)
    cc[3] = (STRUCT, md)
    return thrift.encode_struct(cc)


RNG = np.random.default_rng(5)
TABLES = {
    "mixed": pa.table({"interval_time": pa.array(np.arange(3000) * 60_000_000, pa.timestamp("us", tz="UTC")),
                       "x": pa.array(np.where(RNG.random(3000) < 0.1, np.nan, RNG.normal(size=3000))),
                       "s": pa.array([f"v{i % 7}" for i in range(3000)]),
                       "n": pa.array([None if i % 5 else i for i in range(3000)], pa.int64())}),
    "wide": pa.table({f"c{i}": RNG.normal(size=50) for i in range(40)}),
}
OPTIONS = [
    {},
    {"compression": "snappy", "use_dictionary": False, "write_statistics": ["interval_time"]},
    {"compression": "zstd", "row_group_size": 700, "write_page_index": True, "data_page_size": 4096},
    {"write_statistics": True, "store_schema": False, "column_encoding": None},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("which", sorted(TABLES))
def test_spliced_chunks_equal_the_fully_decoded_edit(which: str, options: dict) -> None:
    footer = _footer(TABLES[which], **options)
    decoded = thrift.decode_struct(footer)
    spliced = chunks.row_groups(footer)
    reference = [rg[1][1][1] for rg in decoded[4][1][1]]
    assert [len(g) for g in spliced] == [len(g) for g in reference] and spliced
    for group, ref_group in zip(spliced, reference, strict=True):
        for c, ref in zip(group, ref_group, strict=True):
            md = ref[3][1]
            assert c.path == b".".join(md[3][1][1]).decode()
            assert (c.uncompressed, c.compressed) == (md[6][1], md[7][1])
            assert c.start == (md[11][1] if 11 in md and md[11][1] > 0 else md[9][1])
            for delta, name, moved in ((0, None, False), (123_456_789, None, False), (7, "p_" + c.path, True),
                                       (1 << 40, "x", True)):
                assert c.encode(delta, name, drop_bloom=moved) == _edited_in_full(ref, delta, name, moved)


def test_skip_walks_every_thrift_type() -> None:
    w = thrift.Writer()
    w.struct({1: (thrift.TRUE, True), 2: (thrift.BYTE, -3), 3: (thrift.I16, -300), 4: (thrift.I32, 70000),
              5: (I64, -(1 << 40)), 6: (thrift.DOUBLE, 2.5), 7: (BINARY, b"abc"),
              8: (LIST, (thrift.I32, list(range(20)))), 9: (LIST, (thrift.TRUE, [True, False, True])),
              10: (thrift.MAP, (BINARY, thrift.I64, [(b"k", 1), (b"l", 2)])), 11: (thrift.MAP, (0, 0, [])),
              40: (STRUCT, {1: (BINARY, b"deep")})})
    data = bytes(w.out) + b"tail"
    assert chunks.skip(data, 0, STRUCT) == len(data) - 4
    fields, end = chunks.fields(data, 0)
    assert end == len(data) - 4
    assert [f for f, _, _ in fields] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 40]
    assert chunks.encode_fields(fields) == bytes(w.out)  # long field-id headers (40 after 11) survive too
