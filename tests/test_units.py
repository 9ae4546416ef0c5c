"""Pure units: names, pairs, events, ids, thrift, config. No services."""

from __future__ import annotations

import base64
import io
import json
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import events, ids, layout
from bqx.config import Settings, parse_bytes
from bqx.errors import BadEvent, ConfigError, OutsideLayout, UnknownPair
from bqx.pairs import PAIRS, validate_pair
from bqx.parquet import thrift

from conftest import gcs_notification, pubsub_event, storage_event


def test_28_pairs_unique_and_validated() -> None:
    assert len(PAIRS) == 28 and len(set(PAIRS)) == 28
    assert validate_pair(" EURUSD ") == "eurusd"
    with pytest.raises(UnknownPair) as exc:
        validate_pair("eurxxx")
    assert "eurusd" in str(exc.value)  # the message lists the valid pairs
    for bad in (None, 3, ["eurusd"], "../eurusd", "eurusd;drop", "x" * 100):
        with pytest.raises(UnknownPair):
            validate_pair(bad)


def test_layout_round_trips_and_rejects() -> None:
    name = layout.checkpoint("eurusd", "rabc123", "cov_eurusd_gbpusd_w45")
    assert name == "checkpoints/eurusd/rabc123/cov_eurusd_gbpusd_w45.parquet"
    parsed = layout.parse_checkpoint(name)
    assert (parsed.pair, parsed.run_id, parsed.table) == ("eurusd", "rabc123", "cov_eurusd_gbpusd_w45")
    assert layout.parse_request("requests/gbpusd.json") == "gbpusd"
    for bad in ("checkpoints/eurusd/run/../x.parquet", "checkpoints/eurusd/x.parquet", "checkpoints/abcdef/r/t.parquet",
                "checkpoints/eurusd/r/T'1.parquet", "other/eurusd/r/t.parquet"):
        with pytest.raises(OutsideLayout):
            layout.parse_checkpoint(bad)
    with pytest.raises(OutsideLayout):
        layout.parse_request("requests/a/b.json")
    with pytest.raises(UnknownPair):
        layout.parse_request("requests/notapair.json")
    with pytest.raises(OutsideLayout):
        layout.checkpoint("eurusd", "r1", 'x"; drop table')
    assert layout.prefix_of("eurusd", "cov_eurusd_gbpusd_w45") == "cov_gbpusd_w45"
    assert layout.prefix_of("eurusd", "cov_eurusd_eurusd_w45") == "cov_eurusd_w45"


def test_a_pair_owns_only_tables_named_family_pair_variant() -> None:
    from bqx.catalog import belongs_to
    from bqx.local.warehouse import Shape, table_specs

    assert belongs_to("eurusd", "targets_eurusd") and belongs_to("eurusd", "cov_eurusd_eurgbp_w45")
    assert not belongs_to("eurusd", "cov_eurgbp_eurusd_w45")  # eurgbp's table that mentions eurusd
    assert not belongs_to("eurusd", "targets_eurusdx")
    # with every pair in one warehouse, each pair finds exactly its own tables, and their prefixes are unique
    names = {p: [t.name for t in table_specs(p, Shape())] for p in ("eurusd", "eurgbp", "gbpusd")}
    every = [n for ns in names.values() for n in ns]
    for pair, own in names.items():
        assert sorted(n for n in every if belongs_to(pair, n)) == sorted(own)
        prefixes = [layout.prefix_of(pair, n) for n in own]
        assert len(set(prefixes)) == len(prefixes) == 667


def test_events_parse_both_storage_shapes_and_requests() -> None:
    a = events.parse(storage_event("b", "checkpoints/x", 5))
    b = events.parse(gcs_notification("b", "checkpoints/x", 5))
    assert isinstance(a, events.ObjectEvent) and isinstance(b, events.ObjectEvent)
    assert a.key == b.key == "b/checkpoints/x#5" and a.kind == b.kind == "finalize"
    m = events.parse(pubsub_event('{"pair": "eurusd"}', message_id="42"))
    assert isinstance(m, events.Message) and m.message_id == "42" and m.data == b'{"pair": "eurusd"}'


def test_events_reject_malformed() -> None:
    bad_b64 = pubsub_event("x")
    bad_b64.data["message"]["data"] = "%%%not-base64"
    with pytest.raises(BadEvent):
        events.parse(bad_b64)
    no_gen = storage_event("b", "n", 1)
    no_gen.data["generation"] = "abc"
    with pytest.raises(BadEvent):
        events.parse(no_gen)
    no_name = storage_event("b", "n", 1)
    del no_name.data["name"]
    with pytest.raises(BadEvent):
        events.parse(no_name)
    other = storage_event("b", "n", 1)
    other["type"] = "com.example.other"
    with pytest.raises(BadEvent):
        events.parse(other)


def test_ids_are_deterministic_and_distinct() -> None:
    a = ids.run_id_for_object("b", "requests/eurusd.json", 1)
    assert a == ids.run_id_for_object("b", "requests/eurusd.json", 1)
    assert a != ids.run_id_for_object("b", "requests/eurusd.json", 2)
    assert ids.run_id_for_message("9") != ids.run_id_for_message("10")
    layout.run_prefix("eurusd", a)  # every generated id fits the layout


def test_thrift_round_trip_of_a_real_footer() -> None:
    t = pa.table({"a": [1, None, 3], "b": [0.5, 1.5, 2.5], "s": ["x", "y", "z"]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    data = buf.getvalue()
    n = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - n : -8]
    decoded = thrift.decode_struct(footer)
    assert decoded[3][1] == 3  # num_rows
    assert thrift.encode_struct(decoded) == footer


def test_config_reads_env_and_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BQX_STAGING_BUCKET", "my-staging")
    monkeypatch.setenv("MERGE_METHOD", "polars")
    monkeypatch.setenv("BQX_MEMORY_BUDGET", "512MiB")
    s = Settings.from_env()
    assert (s.staging_bucket, s.merge_method, s.memory_budget) == ("my-staging", "polars", 512 << 20)
    monkeypatch.setenv("MERGE_METHOD", "pandas")
    with pytest.raises(ConfigError, match="unknown merge method"):
        Settings.from_env()
    assert parse_bytes("1GiB") == 1 << 30
    with pytest.raises(ConfigError):
        parse_bytes("lots")


def test_object_events_carry_the_object_resource() -> None:
    resource = {"bucket": "b", "name": "checkpoints/x.parquet", "generation": "7", "size": "1234",
                "crc32c": "AAAAAA==", "metadata": {"table": "t"}}
    pushed = gcs_notification("b", "checkpoints/x.parquet", 7)
    pushed.data["message"]["data"] = base64.b64encode(json.dumps(resource).encode()).decode()
    for ev in (events.parse(pushed), events.parse(storage_event("b", "checkpoints/x.parquet", 7))):
        assert ev.generation == "7"
    ev = events.parse(pushed)
    assert (ev.size, ev.crc32c, ev.metadata) == (1234, "AAAAAA==", {"table": "t"})
    eventarc = storage_event("b", "checkpoints/x.parquet", 7)
    eventarc.data.update({k: v for k, v in resource.items() if k != "metadata"})
    assert events.parse(eventarc).metadata == {} and events.parse(eventarc).size == 1234  # no metadata: none set
    # a resource of another generation says nothing about this one
    stale = storage_event("b", "checkpoints/x.parquet", 8)
    stale.data.update({"size": "1", "crc32c": "x", "metadata": {}})
    assert events.parse(stale).size is not None  # same generation: taken
    other = gcs_notification("b", "checkpoints/x.parquet", 8)
    other.data["message"]["data"] = base64.b64encode(json.dumps(resource).encode()).decode()
    assert (events.parse(other).size, events.parse(other).crc32c) == (None, None)


def test_request_nesting_is_refused_before_parsing_and_brackets_in_strings_do_not_count() -> None:
    from bqx.errors import BadRequest
    from bqx.trigger import MAX_REQUEST_DEPTH, parse_request_body

    note = '[{"quoted \\" bracket [[[[' + "[" * 40 + '"'
    body = parse_request_body(json.dumps({"pairs": ["eurusd", "gbpusd"], "note": note}).encode())
    assert body["note"] == note
    deep = "[" * (MAX_REQUEST_DEPTH + 1) + "]" * (MAX_REQUEST_DEPTH + 1)
    for raw in (deep, '{"pair": ' + deep + "}", '{"a":' * 10_000 + "1" + "}" * 10_000):
        with pytest.raises(BadRequest, match="nested too deeply"):
            parse_request_body(raw.encode())
    shallow = '{"pair": "eurusd", "note": ' + "[" * (MAX_REQUEST_DEPTH - 1) + "]" * (MAX_REQUEST_DEPTH - 1) + "}"
    assert parse_request_body(shallow.encode())["pair"] == "eurusd"
