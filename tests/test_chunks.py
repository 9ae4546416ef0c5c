"""Column-chunk metadata spliced as bytes (bqx.parquet.chunks) must say what pyarrow's own Thrift decoder reads: the
reference is pyarrow's metadata of the original file, and a file rebuilt with the moved chunks must read back, through
pyarrow, as the original with only the offsets shifted, the path renamed and page indexes / bloom filters gone."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx.parquet import chunks, thrift
from bqx.parquet.thrift import BINARY, I64, LIST, STRUCT


def _file(table: pa.Table, **options: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)  # type: ignore[arg-type]
    return buf.getvalue()


def _footer(data: bytes) -> bytes:
    n = struct.unpack("<I", data[-8:-4])[0]
    return data[-8 - n : -8]


def _moved_file(data: bytes, encoded: list[list[bytes]], delta: int) -> bytes:
    """`data` with its column chunks' metadata replaced by `encoded` and, when `delta` is small, its data area moved
    `delta` bytes later: what a reader of the moved chunks' offsets must find. (Only the assembly uses our Thrift
    walker; what is checked is what pyarrow reads back.)"""
    footer = _footer(data)
    top, _ = thrift.fields(footer, 0)
    out = []
    for fid, t, raw in top:
        if fid == 4:  # row_groups: each one's columns (field 1) replaced, its file_offset (field 5) moved
            _, n, pos = thrift.list_header(raw, 0)
            groups = []
            for g in range(n):
                rg, pos = thrift.fields(raw, pos)
                cols = encoded[g]
                rg = [(f, tt, _list_head(len(cols)) + b"".join(cols) if f == 1 else
                       (thrift.zigzag_varint(thrift.read_i64(r) + delta) if f == 5 else r)) for f, tt, r in rg]
                groups.append(thrift.encode_fields(rg))
            raw = _list_head(n) + b"".join(groups)
        out.append((fid, t, raw))
    new_footer = thrift.encode_fields(out)
    body = data[4 : len(data) - 8 - len(footer)]
    pad = b"\0" * delta if delta < (1 << 20) else b""
    return b"PAR1" + pad + body + new_footer + struct.pack("<I", len(new_footer)) + b"PAR1"


def _list_head(n: int) -> bytes:
    """The header of a list of `n` structs."""
    if n < 15:  # noqa: PLR2004
        return bytes([(n << 4) | STRUCT])
    out = bytearray([0xF0 | STRUCT])
    thrift.put_varint(out, n)
    return bytes(out)


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
    table = TABLES[which]
    data = _file(table, **options)
    spliced = chunks.row_groups(_footer(data))
    reference = pq.read_metadata(io.BytesIO(data))  # pyarrow's own decoding of the footer
    assert [len(g) for g in spliced] == [reference.row_group(g).num_columns for g in range(reference.num_row_groups)]
    assert spliced
    for g, group in enumerate(spliced):
        for j, c in enumerate(group):
            ref = reference.row_group(g).column(j)
            assert c.path == ref.path_in_schema
            assert (c.uncompressed, c.compressed) == (ref.total_uncompressed_size, ref.total_compressed_size)
            assert c.start == (ref.dictionary_page_offset if ref.has_dictionary_page else ref.data_page_offset)
    for delta, rename, moved in ((0, False, False), (123_456_789, False, False), (7, True, True),
                                 (1 << 40, True, True), (1000, False, True)):
        encoded = [[c.encode(delta, "p_" + c.path if rename else None, drop_bloom=moved) for c in group]
                   for group in spliced]
        rebuilt = _moved_file(data, encoded, delta)
        got = pq.read_metadata(io.BytesIO(rebuilt))
        for g in range(reference.num_row_groups):
            for j in range(reference.row_group(g).num_columns):
                ref, new = reference.row_group(g).column(j).to_dict(), got.row_group(g).column(j).to_dict()
                for k in ("data_page_offset", "dictionary_page_offset"):
                    ref[k] = ref[k] + delta if ref[k] else ref[k]
                if ref["file_offset"]:
                    ref["file_offset"] += delta
                if rename:
                    ref["path_in_schema"] = "p_" + ref["path_in_schema"]
                if moved:
                    ref["bloom_filter_offset"] = ref["bloom_filter_length"] = None
                assert new == ref
                col = got.row_group(g).column(j)
                assert not col.has_column_index and not col.has_offset_index  # page indexes are never carried
        if delta < (1 << 20) and not rename:  # the whole file, decoded by pyarrow, is the original table
            back = pq.read_table(io.BytesIO(rebuilt))
            assert back.schema == table.schema
            for name in table.column_names:  # (NaN == NaN here, unlike Table.equals)
                np.testing.assert_array_equal(back.column(name).to_numpy(zero_copy_only=False),
                                              table.column(name).to_numpy(zero_copy_only=False))


def test_skip_walks_every_thrift_type() -> None:
    w = thrift.Writer()
    w.struct({1: (thrift.TRUE, True), 2: (thrift.BYTE, -3), 3: (thrift.I16, -300), 4: (thrift.I32, 70000),
              5: (I64, -(1 << 40)), 6: (thrift.DOUBLE, 2.5), 7: (BINARY, b"abc"),
              8: (LIST, (thrift.I32, list(range(20)))), 9: (LIST, (thrift.TRUE, [True, False, True])),
              10: (thrift.MAP, (BINARY, thrift.I64, [(b"k", 1), (b"l", 2)])), 11: (thrift.MAP, (0, 0, [])),
              40: (STRUCT, {1: (BINARY, b"deep")})})
    data = bytes(w.out) + b"tail"
    assert thrift.skip(data, 0, STRUCT) == len(data) - 4
    fields, end = thrift.fields(data, 0)
    assert end == len(data) - 4
    assert [f for f, _, _ in fields] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 40]
    assert thrift.encode_fields(fields) == bytes(w.out)  # long field-id headers (40 after 11) survive too
