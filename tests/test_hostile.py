"""Hostile input, property-based (hypothesis, derandomized: the same cases on every run).

Request objects, Pub/Sub messages and storage events with malformed JSON, huge bodies, wrong types, unknown
fields, unicode, pair names carrying ../, /, quotes or SQL, objects outside the layout, CloudEvents with missing or
wrong attributes and bad base64 are served through the real functions (functions-framework test client). Every one
must be acknowledged (HTTP 200: no redelivery storm), start 0 jobs, crash nothing, and write nothing outside the
layout. Warehouse table and column names reach SQL only as quoted identifiers.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from functions_framework import create_app
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bqx import layout
from bqx.catalog import KEY, Column, Manifest, TableEntry
from bqx.extract import run as extract
from bqx.extract.sources import DuckDBSource
from bqx.gcp import storage
from bqx.gcp.clients import storage_client
from bqx.local.runapi import RunApi
from bqx.pairs import PAIRS

from conftest import REPO, gcs_notification, pubsub_event, storage_event

CASES = hsettings(derandomize=True, deadline=None, database=None, print_blob=False,
                  suppress_health_check=list(HealthCheck))
RAN: dict[str, Any] = {"cases": 0, "properties": set()}
FINALIZED = "google.cloud.storage.object.v1.finalized"
PUBSUB = "google.cloud.pubsub.topic.v1.messagePublished"

# ---------------------------------------------------------------- strategies

NASTY = ["../", "..", "/", "\\", "'", '"', "`", ";", "--", "/*", "*/", " OR 1=1", "'; DROP TABLE x; --", "%00", "\x00",
         "\n", "é", "ü", "日本", "🙂", "\u202e", "${jndi:x}", "{{7*7}}", "%2e%2e%2f", "eurusd", "EURUSD", " ", "*", "?"]
nasty_text = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=8)), max_size=6).map("".join)


def _is_a_pair(p: object) -> bool:
    """What validate_pair accepts (it trims and lowercases): a legitimate request, not a hostile one."""
    return isinstance(p, str) and p.strip().lower() in PAIRS


hostile_pair = st.one_of(nasty_text, st.sampled_from([f"{p}/../{p}" for p in PAIRS[:5]]), st.integers(), st.floats(),
                         st.none(), st.booleans(), st.lists(st.sampled_from(PAIRS), max_size=2),
                         st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)).filter(
    lambda p: not _is_a_pair(p))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | nasty_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
                           max_leaves=10)
hostile_body_obj = st.one_of(
    st.fixed_dictionaries({"pair": hostile_pair}),
    st.fixed_dictionaries({"pair": hostile_pair}, optional={"force": json_values, "note": json_values}),
    st.fixed_dictionaries({"pair": st.sampled_from(PAIRS), "unknown": json_values}),  # a valid pair + unknown field
    st.fixed_dictionaries({"pair": st.sampled_from(PAIRS), "force": st.one_of(st.text(), st.integers(),
                                                                                st.none())}),
    st.dictionaries(nasty_text, json_values, max_size=4).filter(lambda d: "pair" not in d),
    json_values.filter(lambda v: not isinstance(v, dict)),
)
hostile_bytes = st.one_of(
    hostile_body_obj.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"{", b"{}", b'{"pair": "eurusd"', b"\xff\xfe", b"null", b'"eurusd"', b"[]",
                     b'{"pair": "eurusd", "pair": "../x"}']),
    st.integers(65 * 1024, 300 * 1024).map(lambda n: b'{"pair": "eurusd", "note": "' + b"x" * n + b'"}'),  # huge
)
outside_names = st.one_of(
    nasty_text,
    nasty_text.map(lambda t: f"checkpoints/{t}"),
    st.tuples(st.sampled_from(PAIRS), nasty_text).map(lambda p: f"checkpoints/{p[0]}/{p[1]}.parquet"),
    st.tuples(st.sampled_from(PAIRS), nasty_text, nasty_text).map(lambda p: f"checkpoints/{p[0]}/{p[1]}/{p[2]}"),
    nasty_text.map(lambda t: f"requests/{t}.json"),
    nasty_text.map(lambda t: f"requests/../{t}"),
    st.tuples(st.sampled_from(PAIRS), nasty_text).map(
        lambda p: f"runs/{p[0]}/{p[1]}/extract/task-0000-attempt-00.json"),
).filter(lambda n: n and len(n.encode()) < 1000 and "\x00" not in n and "\r" not in n and "\n" not in n
         and not (n.startswith("requests/") and n.endswith(".json") and _is_a_pair(n[9:-5])))


# ---------------------------------------------------------------- harness


def _client(name: str) -> Any:
    return create_app(name, str(REPO / "functions" / name / "main.py"), "cloudevent").test_client()


def _post(c: Any, event: CloudEvent, binary: bool = False) -> int:
    headers, body = (to_binary if binary else to_structured)(event)
    return c.post("/", headers=headers, data=body).status_code


def _listing(s: Any) -> dict[str, set[str]]:
    return {b: {o.name for o in storage_client(s).list_blobs(b)} for b in (s.staging_bucket, s.output_bucket)}


@pytest.fixture
def env(isolated_output, run_api):  # type: ignore[no-untyped-def]
    s = isolated_output
    return {"s": s, "api": run_api, "trigger": _client("trigger"), "completion": _client("completion"),
}


def _check(env: dict[str, Any], codes: list[int], before: dict[str, set[str]],
           uploaded: frozenset[str] | set[str] = frozenset()) -> None:
    api: RunApi = env["api"]
    assert all(code == 200 for code in codes), codes  # acknowledged: no redelivery storm
    assert api.executions == {} and api.calls == 0, [(e.args, e.env) for e in api.executions.values()]  # 0 jobs
    after = _listing(env["s"])
    for bucket, names in after.items():
        new = names - before[bucket] - set(uploaded)
        assert not new, f"written by a hostile input: {sorted(new)[:5]}"
    RAN["cases"] += 1
    RAN["properties"].add(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0])


# ---------------------------------------------------------------- properties


@given(data=hostile_bytes, attrs=st.dictionaries(nasty_text, nasty_text, max_size=3), binary=st.booleans())
@hsettings(CASES, max_examples=90)
def test_hostile_pubsub_messages_are_acknowledged_and_start_nothing(env, data: bytes, attrs: dict[str, str],
                                                                    binary: bool) -> None:  # type: ignore[no-untyped-def]
    attrs = {k: v for k, v in attrs.items() if k != "eventType"}
    before = _listing(env["s"])
    ev = pubsub_event(data, attrs, message_id=uuid.uuid4().hex)
    _check(env, [_post(env["trigger"], ev, binary), _post(env["completion"], ev, binary)], before)


def _legit_request(pair: str, body: bytes) -> bool:
    """The oracle: what the trigger must accept (README: fields pair, force (bool), requested_by, note)."""
    try:
        d = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(d, dict) or not set(d) <= {"pair", "force", "requested_by", "note"} or len(body) > 64 * 1024:
        return False
    same_pair = "pair" not in d or (_is_a_pair(d["pair"]) and d["pair"].strip().lower() == pair)
    return isinstance(d.get("force", False), bool) and same_pair


@given(pair=st.sampled_from(PAIRS), body=hostile_bytes)
@hsettings(CASES, max_examples=40)
def test_hostile_request_objects_are_acknowledged_and_start_nothing(env, pair: str, body: bytes) -> None:  # type: ignore[no-untyped-def]
    if _legit_request(pair, body):
        return  # a well-formed request: not hostile (counted only when it is)
    s = env["s"]
    before = _listing(s)
    name = layout.request(pair)
    blob = storage.bucket(s, s.staging_bucket).blob(name)
    blob.upload_from_string(body)
    codes = [_post(env["trigger"], storage_event(s.staging_bucket, name, blob.generation, uuid.uuid4().hex)),
             _post(env["trigger"], gcs_notification(s.staging_bucket, name, blob.generation, uuid.uuid4().hex))]
    _check(env, codes, before, {name})
    blob.delete()


def test_empty_request_object_is_acknowledged(env) -> None:  # type: ignore[no-untyped-def]
    s = env["s"]
    before = _listing(s)
    blob = storage.bucket(s, s.staging_bucket).blob(layout.request("eurusd"))
    blob.upload_from_string(b"")
    _check(env, [_post(env["trigger"], storage_event(s.staging_bucket, blob.name, blob.generation))], before,
           {blob.name})


@given(name=outside_names, upload=st.booleans(), generation=st.one_of(st.integers(1, 2**62), nasty_text))
@hsettings(CASES, max_examples=60)
def test_objects_outside_the_layout_are_acknowledged_and_start_nothing(env, name: str, upload: bool,
                                                                      generation: Any) -> None:
    s = env["s"]
    if upload:
        blob = storage.bucket(s, s.staging_bucket).blob(name)
        try:
            blob.upload_from_string(b'{"pair": "eurusd"}')
            generation = blob.generation
        except Exception:  # noqa: BLE001 - a name even the emulator refuses: deliver the event anyway
            upload = False
    before = _listing(s)  # after the upload: the emulator may store a normalized name (a//b -> a/b)
    codes = []
    for fn in ("trigger", "completion"):
        codes.append(_post(env[fn], storage_event(s.staging_bucket, name, generation, uuid.uuid4().hex)))
        codes.append(_post(env[fn], gcs_notification(s.staging_bucket, name, generation, uuid.uuid4().hex)))
    _check(env, codes, before)


event_shapes = st.one_of(
    # storage events with missing or wrongly typed fields
    st.fixed_dictionaries({}, optional={"bucket": json_values, "name": json_values, "generation": json_values}).map(
        lambda d: (FINALIZED, d)),
    st.just((FINALIZED, None)), json_values.map(lambda v: (FINALIZED, v)),
    # Pub/Sub events: no message, message of the wrong type, bad base64, attributes that are not a map
    json_values.map(lambda v: (PUBSUB, v)),
    st.fixed_dictionaries({"message": json_values}).map(lambda d: (PUBSUB, d)),
    st.tuples(nasty_text, json_values).map(lambda t: (PUBSUB, {"message": {"data": t[0] + "%%%", "attributes": t[1]}})),
    st.dictionaries(st.sampled_from(["bucketId", "objectId", "objectGeneration", "eventType"]), json_values).map(
        lambda a: (PUBSUB, {"message": {"data": "", "attributes": a}})),
    # unknown event types
    st.tuples(nasty_text, json_values).map(lambda t: (t[0] or "x", t[1])),
)


@given(shape=event_shapes, binary=st.booleans())
@hsettings(CASES, max_examples=70)
def test_cloudevents_with_missing_or_wrong_attributes_are_acknowledged(env, shape: tuple, binary: bool) -> None:  # type: ignore[no-untyped-def,type-arg]
    ce_type, data = shape
    before = _listing(env["s"])
    ev = CloudEvent({"type": str(ce_type), "source": "//hostile", "id": uuid.uuid4().hex, "specversion": "1.0"},
                    data)
    try:
        codes = [_post(env["trigger"], ev, binary), _post(env["completion"], ev, binary)]
    except (TypeError, ValueError):  # the SDK cannot even encode it: nothing a sender could deliver
        return
    _check(env, codes, before)


def test_at_least_200_hostile_cases_ran() -> None:
    """The properties above ran 90 + 40 + 60 + 70 derandomized cases (counted as they pass)."""
    if len(RAN["properties"]) < 4:
        pytest.skip("not every hostile-input property was selected")
    print(f"hostile cases served: {RAN['cases']}")
    assert RAN["cases"] >= 200


def test_raw_push_bodies_that_are_not_cloudevents_never_crash_the_function(env) -> None:  # type: ignore[no-untyped-def]
    """Bodies functions-framework cannot turn into a CloudEvent are answered by the framework itself (4xx, our
    code never runs); anything it can turn into one is acknowledged."""
    c = env["trigger"]
    before = _listing(env["s"])
    bodies = [b"", b"{", b"[]", b"null", json.dumps({"message": "x"}).encode(),
              json.dumps({"message": {"data": "%%%"}, "subscription": "s"}).encode(),
              json.dumps({"message": {"data": base64.b64encode(b'{"pair": "../x"}').decode(), "messageId": "1"},
                          "subscription": "projects/p/subscriptions/s"}).encode()]
    for body in bodies:
        code = c.post("/", headers={"Content-Type": "application/json"}, data=body).status_code
        assert code < 500, (body, code)
    _check(env, [], before)


# ---------------------------------------------------------------- SQL: identifiers are always quoted

odd_columns = st.lists(
    st.one_of(st.sampled_from(['select', 'from', 'a b', 'x"y', "it's", "semi;colon", "--c", "ünï", "`tick`", "1st",
                               'DROP TABLE "t"; --', "order"]),
              # BigQuery column names cannot hold dots (a backquoted dotted name is a path)
              st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="."),
                      min_size=1, max_size=12)),
    min_size=1, max_size=6, unique_by=lambda c: c.lower()).filter(lambda cs: all(c.strip() and c.lower() != KEY
                                                                                  for c in cs))


@given(cols=odd_columns, table=st.sampled_from(["mom_eurusd_select", "vol_eurusd_from_x", "cyc_eurusd_order"]))
@hsettings(CASES, max_examples=40)
def test_bigquery_merge_sql_quotes_every_identifier(cols: list[str], table: str) -> None:
    from bqx.config import Settings
    from bqx.merge.bigquery import build_plan

    run_id = "h" + uuid.uuid4().hex[:10]
    key = Column(KEY, "timestamp[us, tz=UTC]")
    tables = (TableEntry("targets_eurusd", "targets", (key, Column("target_bqx45_h15", "double")),
                         layout.checkpoint("eurusd", run_id, "targets_eurusd")),
              TableEntry(table, "feature", (key, *(Column(c, "double") for c in cols)),
                         layout.checkpoint("eurusd", run_id, table)))
    plan = build_plan(Settings(), Manifest("eurusd", run_id, tables), "proj")
    for st_ in plan.stages:
        parsed = sqlglot.parse(st_.select_sql, read="bigquery")
        assert len(parsed) == 1  # one statement: nothing smuggled in
        select = parsed[0]
        assert isinstance(select, sqlglot.exp.Select)
        aliases = [e.alias_or_name for e in select.expressions]
        assert aliases == list(st_.columns)  # every output name survives as one identifier
        sources = [e.this.name if isinstance(e, sqlglot.exp.Alias) else e.name for e in select.expressions]
        prefix = layout.prefix_of("eurusd", table)
        want = [KEY, "target_bqx45_h15", *cols] if st_.with_targets else [KEY, *cols]
        assert sources == want
        assert [a for a in aliases if a.startswith(prefix + "_")] == [f"{prefix}_{c}" for c in cols]


def test_extract_reads_odd_but_valid_table_and_column_names(isolated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = isolated
    path = tmp_path / "odd.duckdb"
    con = duckdb.connect(str(path))
    q = lambda x: '"' + x.replace('"', '""') + '"'  # noqa: E731
    cols = ["select", 'x"y', "it's", "a b", 'DROP TABLE "targets_eurusd"; --', "ünï"]
    con.execute(f"CREATE SCHEMA {q(s.dataset)}")
    con.execute(f"CREATE TABLE {q(s.dataset)}.targets_eurusd AS SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + "
                f"INTERVAL (i) MINUTE AS interval_time, i * 1.0 AS target_bqx45_h15 FROM range(20) t(i)")
    values = ", ".join(f"i * {j}.5 AS {q(c)}" for j, c in enumerate(cols))
    for table in ("mom_eurusd_select", "vol_eurusd_from"):
        con.execute(f"CREATE TABLE {q(s.dataset)}.{q(table)} AS SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + "
                    f"INTERVAL (i) MINUTE AS interval_time, {values} FROM range(20) t(i)")
    con.close()
    run_id = "h" + uuid.uuid4().hex[:10]
    extract.run(s, "eurusd", run_id, source=DuckDBSource(str(path), s.dataset))
    for table in ("mom_eurusd_select", "vol_eurusd_from"):
        data = storage.bucket(s, s.staging_bucket).blob(layout.checkpoint("eurusd", run_id, table)).download_as_bytes()
        t = pq.read_table(pa.BufferReader(data))
        assert t.schema.names == [KEY, *cols] and t.num_rows == 20
    check = duckdb.connect(str(path), read_only=True)  # the warehouse is intact: nothing was executed from a name
    assert check.execute(f"SELECT count(*) FROM {q(s.dataset)}.targets_eurusd").fetchone() == (20,)
