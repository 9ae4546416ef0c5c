"""Running every day (issue 20), through the session's local stack: a request for many pairs with bounded extract
concurrency, run events, schema drift between runs, kept versions."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bqx import runs
from bqx.cli import main
from bqx.local.warehouse import Shape, Warehouse
from bqx.pairs import PAIRS

from conftest import LocalStack, started_stack

TINY = Shape(rows=40, seed=5, table_scale=0.001, column_scale=0.05)  # one table per family: 22 tables a pair


def _extract_executions(stack, since: float) -> list[tuple[float, float]]:
    """(start, end) of each extract execution the local Run API started since `since`."""
    from datetime import datetime

    url = f"http://127.0.0.1:{stack.settings.ports.run_api}/_admin/executions"
    with urllib.request.urlopen(url, timeout=10) as r:
        found = json.loads(r.read())["executions"]

    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    out = []
    for e in found:
        if "/jobs/bqx-ml-extract/" in e["name"] and ts(e["createTime"]) >= since:
            out.append((ts(e["createTime"]), ts(e["completionTime"]) if e.get("completionTime") else time.time()))
    return out


@pytest.fixture(scope="module")
def daily_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack of this module's own: these tests run every pair, change the warehouse and restore old runs, which
    the session stack's other tests must not see (a published run with another schema is drift to them)."""
    with started_stack(tmp_path_factory.mktemp("bqx-daily")) as stack:
        yield stack


@pytest.fixture
def _daily_env(daily_stack: LocalStack) -> LocalStack:
    daily_stack.apply_env()
    return daily_stack


pytestmark = pytest.mark.usefixtures("_daily_env")


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


def test_all_pairs_in_one_request_run_at_most_max_active_extracts_at_once(daily_stack):
    s = daily_stack.settings
    wh = Warehouse(Path(s.warehouse), s.dataset)
    have = wh.pairs()
    for pair in PAIRS:
        if pair not in have:
            wh.generate(pair, TINY)
    assert s.max_active_extracts == 4
    seen: dict[str, set[str]] = {}
    stop = threading.Event()

    def watch() -> None:  # what `bqx status` shows meanwhile
        while not stop.is_set():
            for pair in PAIRS:
                seen.setdefault(pair, set()).add(runs.state(s, pair).state)
            time.sleep(0.5)

    since = time.time() - 1
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = CliRunner().invoke(main, ["run", "--all", "--force", "--json", "--concurrency", "8",
                                           "--timeout", "600"])
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == 0, result.output
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(x["pair"] for x in summaries) == sorted(PAIRS)
    assert "in one message" in result.stderr
    spans = _extract_executions(daily_stack, since)
    assert len(spans) == len(PAIRS)
    most = _most_at_once(spans)
    if most > s.max_active_extracts:  # say what happened: each execution's span, each slot the trigger freed
        log = (s.home / "stack" / "trigger.log").read_text().splitlines()
        freed = [x for x in log if "slot freed" in x or "extract job started" in x]
        print("\n".join(f"{a:.3f} {b:.3f}" for a, b in sorted(spans)), "\n".join(freed), sep="\n")
    assert 2 <= most <= s.max_active_extracts, f"{most} extracts ran at once"
    assert sum("queued" in states for states in seen.values()) >= 10
    # nothing is left waiting, and every slot was handed back
    from bqx import schedule

    assert schedule.waiting(s) == []
    assert schedule.slots(s) == {}


def _duck(s):  # type: ignore[no-untyped-def]
    import duckdb

    return duckdb.connect(s.warehouse)


def _events(s, subscription: str, count: int) -> list[dict]:
    from bqx import notify

    got: list[dict] = []
    notify.follow(s, subscription, got.append, max_messages=count, timeout=120)
    return got


def test_two_runs_give_drift_history_get_restore_and_run_events(daily_stack, tmp_path):
    """A run, then the warehouse changes (a table gains a column, another loses rows), then a second run: its
    summary, `bqx report` and `bqx diff` show the drift; both runs are kept, downloadable and restorable; each
    run's end came as one message on the run events topic."""
    from bqx import notify

    s = daily_stack.settings
    notify.subscribe(s, "test-daily-done").close()
    cli = CliRunner()
    first = cli.invoke(main, ["run", "eurusd", "--force", "--json"])
    assert first.exit_code == 0, first.output
    one = json.loads(first.stdout.strip().splitlines()[-1])
    manifest = runs.load_manifest(s, "eurusd", one["run_id"])
    gains, loses = manifest.features[0].name, manifest.features[1].name
    con = _duck(s)
    try:
        ds = s.dataset
        con.execute(f'ALTER TABLE "{ds}"."{gains}" ADD COLUMN drift_new DOUBLE DEFAULT 1.5')
        before_rows = con.execute(f'SELECT count(*) FROM "{ds}"."{loses}"').fetchone()[0]
        con.execute(f'DELETE FROM "{ds}"."{loses}" WHERE interval_time > (SELECT min(interval_time) + INTERVAL 30 '
                    f'MINUTE FROM "{ds}"."{loses}")')
        after_rows = con.execute(f'SELECT count(*) FROM "{ds}"."{loses}"').fetchone()[0]
    finally:
        con.close()
    Warehouse(Path(s.warehouse), s.dataset).touch("eurusd", [gains, loses])
    assert after_rows < before_rows
    try:
        _second_run(s, cli, one, gains, loses, before_rows, after_rows, tmp_path)
    finally:
        from conftest import SMALL

        Warehouse(Path(s.warehouse), s.dataset).generate("eurusd", SMALL)  # as the session's other tests know it


def _second_run(s, cli, one, gains, loses, before_rows, after_rows, tmp_path):  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    from bqx import versions

    second = cli.invoke(main, ["run", "eurusd", "--json"])
    assert second.exit_code == 0, second.output
    two = json.loads(second.stdout.strip().splitlines()[-1])
    drift = two["drift"]
    from bqx import layout

    new_column = f"{layout.prefix_of('eurusd', gains)}_drift_new"
    assert drift["against_run"] == one["run_id"]
    assert drift["columns_added"] == [new_column] and drift["columns_removed"] == []
    assert drift["table_rows_changed"] == {loses: {"before": before_rows, "after": after_rows}}
    assert drift["rows"] == {"before": one["rows"], "after": two["rows"], "change": 0}
    assert drift["tables_added"] == drift["tables_removed"] == []
    schema = versions.schema(s, "eurusd")
    assert {"name": new_column, "type": "double", "table": gains} in schema["columns"]
    assert len(schema["columns"]) == two["columns"]

    shown = cli.invoke(main, ["diff", "eurusd"])
    assert shown.exit_code == 0 and new_column in shown.output and f"table {loses}: rows" in shown.output
    between = cli.invoke(main, ["diff", "eurusd", one["run_id"], two["run_id"], "--json"])
    assert json.loads(between.output)["columns_added"] == [new_column]
    report = cli.invoke(main, ["report", "eurusd", "-o", str(tmp_path)])
    assert report.exit_code == 0, report.output
    assert new_column in (tmp_path / f"report_eurusd_{two['run_id']}.html").read_text()

    hist = cli.invoke(main, ["history", "eurusd", "--json"])
    kept = {v["run_id"]: v for v in json.loads(hist.stdout)}
    assert {one["run_id"], two["run_id"]} <= set(kept) and kept[two["run_id"]]["current"]
    assert kept[one["run_id"]]["crc32c"] == one["crc32c"] and kept[one["run_id"]]["columns"] == one["columns"]
    out = tmp_path / "first.parquet"
    got = cli.invoke(main, ["get", "eurusd", "--run", one["run_id"], "-o", str(out)])
    assert got.exit_code == 0, got.output
    assert pq.ParquetFile(out).metadata.num_columns == one["columns"] == two["columns"] - 1

    back = cli.invoke(main, ["restore", "eurusd", one["run_id"]])
    assert back.exit_code == 0, back.output
    current = json.loads(cli.invoke(main, ["history", "eurusd", "--json"]).stdout)
    assert [v["run_id"] for v in current if v["current"]] == [one["run_id"]]
    from bqx.gcp import storage

    assert storage.bucket(s, s.output_bucket).get_blob(layout.output("eurusd")).crc32c == one["crc32c"]
    assert storage.read_json(s, s.output_bucket, layout.summary("eurusd"))[0]["restored_from"] == one["run_id"]

    got_events = {e["run_id"]: e for e in _events(s, "test-daily-done", 2)}
    for run in (one, two):
        event = got_events[run["run_id"]]
        assert (event["event"], event["state"], event["pair"]) == ("run_done", "done", "eurusd")
        assert event["summary"]["crc32c"] == run["crc32c"] and event["error"] is None


def test_a_failed_run_is_one_event_and_one_run_failed_error_line(daily_stack):
    from bqx import notify

    s = daily_stack.settings
    pair = "chfjpy"
    wh = Warehouse(Path(s.warehouse), s.dataset)
    if pair not in wh.pairs():
        wh.generate(pair, TINY)
    con = _duck(s)
    try:
        con.execute(f'DELETE FROM "{s.dataset}"."targets_{pair}"')  # 0 target rows: the merge refuses the run
    finally:
        con.close()
    notify.subscribe(s, "test-daily-failed").close()
    result = CliRunner().invoke(main, ["run", pair, "--force"])
    assert result.exit_code != 0 and "FAILED" in result.output
    run_id = runs.latest_run(s, pair)
    event = next(e for e in _events(s, "test-daily-failed", 1))
    assert (event["event"], event["state"], event["run_id"]) == ("run_failed", "failed", run_id)
    assert "0 rows" in event["error"]["error"] and event["summary"] is None
    log = (s.home / "stack" / "completion.log").read_text().splitlines()
    lines = [json.loads(x) for x in log if '"run_failed"' in x]
    mine = [x for x in lines if x.get("run_id") == run_id]
    assert len(mine) == 1 and mine[0]["severity"] == "ERROR" and mine[0]["event"] == "run_failed"
    wh.generate(pair, TINY)  # as it was


@pytest.mark.parametrize("body", [b'{"pairs": []}', b'{"pairs": "eurusd"}', b'{"pairs": ["eurusd", "eurusd"]}',
                                  b'{"pairs": ["eurusd", "notapair"]}', b'{"pair": "eurusd", "pairs": ["gbpusd"]}',
                                  b'{"pairs": [7]}', b'{"pairs": ["eurusd"], "origin": 5}'])
def test_bad_pairs_messages_are_acknowledged_and_queue_nothing(isolated, run_api, body: bytes) -> None:
    import uuid

    from test_functions import client, launches, post

    from bqx import schedule

    from conftest import pubsub_event

    assert post(client("trigger"), pubsub_event(body, message_id=uuid.uuid4().hex)) == 200
    assert launches(run_api, "bqx-ml-extract") == [] and schedule.waiting(isolated) == []


def test_a_pairs_message_queues_each_pair_once_and_starts_up_to_the_bound(isolated, run_api) -> None:
    """Extracts that never end (the Run API's job sleeps) hold their slots: of 6 pairs, 4 start, 2 wait, and a
    redelivery of the message changes nothing."""
    import uuid

    from test_functions import client, launches, post

    from bqx import ids, schedule

    from conftest import pubsub_event

    run_api.jobs["bqx-ml-extract"] = ["sh", "-c", "sleep 20"]  # the pair, appended, is only $0
    pairs = ["eurusd", "gbpusd", "usdjpy", "audusd", "nzdusd", "usdcad"]
    mid = uuid.uuid4().hex
    body = json.dumps({"pairs": pairs, "origin": "schedule"})
    c = client("trigger")
    for _ in range(2):
        assert post(c, pubsub_event(body, message_id=mid)) == 200
    started = [run_api.executions[e["name"].rsplit("/", 1)[-1]].args[0]
               for e in launches(run_api, "bqx-ml-extract")]
    assert len(started) == 4
    waiting = schedule.waiting(isolated)
    assert [q.run_id for q in waiting] == [ids.run_id_for_pair_message(mid, p) for p in pairs if p not in started]
    assert all(runs.state(isolated, q.pair).state == "queued" for q in waiting)
    first = runs.state(isolated, started[0])
    assert first.state != "queued" and first.run_id == ids.run_id_for_pair_message(mid, started[0])
    assert len(schedule.slots(isolated)) == 4
