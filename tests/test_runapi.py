"""The local Cloud Run API (shared/bqx/local/runapi.py) is strict: JSON bodies only, no browsers, no other hosts, no
unknown fields, and env overrides only from its allow-list, so nothing that can reach the port can make a job's
interpreter run code of its choosing. v1 (gcloud) and v2 (google-cloud-run) runs are the same processes."""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2

from bqx import serving
from bqx.config import Settings
from bqx.errors import TerminalError
from bqx.gcp import launch
from bqx.local.runapi import ALLOWED_ENV_OVERRIDES, RunApi, make_handler

V1 = "/apis/run.googleapis.com/v1/namespaces/bqx-ml"
V2 = "/v2/projects/bqx-ml/locations/us-central1"


def call(api_or_port: RunApi | int, method: str, target: str, body: Any = None, ctype: str | None = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    port = api_or_port if isinstance(api_or_port, int) else _port()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    hdrs = {**({"Content-Type": ctype} if ctype else {}), **(headers or {})}
    conn.request(method, target, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw or b"{}")


def _port() -> int:
    return int(urlsplit(os.environ["BQX_RUN_API_ENDPOINT"]).port or 0)


def _settings() -> Settings:
    os.environ["BQX_LOCAL"] = "1"  # anonymous credentials: the client must never look for real ones
    serving.settings.cache_clear()
    return Settings.from_env()


def started(api: RunApi) -> list[Any]:
    with api.lock:
        return list(api.executions.values())


def assert_nothing_started(api: RunApi) -> None:
    assert started(api) == [] and api.calls == 0
    assert not (api.home / "executions.jsonl").exists()
    code, listing = call(api, "GET", "/_admin/executions")
    assert code == 200 and listing == {"executions": [], "calls": 0}


def run_body(args: list[str] | None = None, env: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"args": args or ["eurusd"]}
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {"overrides": {"containerOverrides": [container], **overrides}}


# ---------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
@pytest.mark.parametrize("route", [f"{V2}/jobs/bqx-ml-extract:run", f"{V1}/jobs/bqx-ml-extract:run"])
def test_a_body_that_is_not_declared_json_is_refused_and_starts_nothing(run_api: RunApi, route: str,
                                                                        ctype: str | None) -> None:
    code, body = call(run_api, "POST", route, run_body(), ctype=ctype)
    assert code == 415 and body["error"]["status"] == "INVALID_ARGUMENT"
    assert "application/json" in body["error"]["message"]
    assert_nothing_started(run_api)


@pytest.mark.parametrize("body", [
    {"overrides": {}, "command": ["sh", "-c", "id"]},
    {"overrides": {"containerOverrides": [{"args": ["eurusd"], "command": ["sh"]}]}},
    {"overrides": {"containerOverrides": [{"args": ["eurusd"]}], "image": "evil"}},
    {"overrides": {"containerOverrides": [{"env": [{"name": "BQX_RUN_ID", "value": "r", "valueSource": {}}]}]}},
    {"overrides": {"containerOverrides": [{}], "timeoutSeconds": 5}},  # a v1 name in a v2 request
])
def test_unknown_fields_are_refused_like_cloud_run_refuses_them(run_api: RunApi, body: dict[str, Any]) -> None:
    code, out = call(run_api, "POST", f"{V2}/jobs/bqx-ml-extract:run", body)
    assert code == 400 and out["error"]["status"] == "INVALID_ARGUMENT", out
    assert "Unknown name" in out["error"]["message"]
    assert_nothing_started(run_api)


def test_v1_refuses_unknown_fields_too(run_api: RunApi) -> None:
    for body in ({"overrides": {}, "validateOnly": True}, {"overrides": {"timeout": "5s"}},
                 {"overrides": {"containerOverrides": [{"workingDir": "/"}]}}):
        code, out = call(run_api, "POST", f"{V1}/jobs/bqx-ml-extract:run", body)
        assert code == 400 and "Unknown name" in out["error"]["message"], out
    assert_nothing_started(run_api)


@pytest.mark.parametrize("name", ["PYTHONWARNINGS", "BROWSER", "LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "PATH",
                                  "BQX_WAREHOUSE", "bqx_run_id"])
def test_env_overrides_outside_the_allow_list_are_refused(run_api: RunApi, name: str) -> None:
    assert name not in ALLOWED_ENV_OVERRIDES
    env = {"BQX_RUN_ID": "r1", name: "x"}
    for route in (f"{V2}/jobs/bqx-ml-extract:run", f"{V1}/jobs/bqx-ml-extract:run"):
        code, out = call(run_api, "POST", route, run_body(env=env))
        assert code == 400 and out["error"]["status"] == "INVALID_ARGUMENT"
        assert repr(name) in out["error"]["message"]
    with pytest.raises(TerminalError, match=name):  # the real google-cloud-run client gets the 400 too
        launch.run_job(_settings(), "bqx-ml-extract", ["eurusd"], env)
    assert_nothing_started(run_api)


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'"overrides"', b'{"overrides": {"taskCount": NaN}}',
    {"overrides": {"taskCount": 0}}, {"overrides": {"taskCount": 1000}}, {"overrides": {"taskCount": True}},
    {"overrides": {"timeout": "ten minutes"}}, {"overrides": {"containerOverrides": "eurusd"}},
    {"overrides": {"containerOverrides": [{"args": "eurusd"}]}},
    {"overrides": {"containerOverrides": [{"args": ["eur\x00usd"]}]}},
    {"overrides": {"containerOverrides": [{"args": ["eurusd"], "clearArgs": True}]}},
    {"overrides": {"containerOverrides": [{"name": "other"}]}},
    {"overrides": {"containerOverrides": [{}, {}]}},
    {"overrides": {"containerOverrides": [{"env": [{"name": "BQX_RUN_ID", "value": 7}]}]}},
    {"validateOnly": "yes"},
])
def test_malformed_requests_are_refused(run_api: RunApi, body: Any) -> None:
    code, out = call(run_api, "POST", f"{V2}/jobs/bqx-ml-extract:run", body)
    assert code == 400 and out["error"]["status"] == "INVALID_ARGUMENT", out
    assert_nothing_started(run_api)


def test_requests_from_web_pages_and_other_hosts_are_refused(run_api: RunApi) -> None:
    run = f"{V2}/jobs/bqx-ml-extract:run"
    assert call(run_api, "POST", run, run_body(), headers={"Origin": "https://evil.example"})[0] == 403
    assert call(run_api, "POST", run, run_body(), headers={"Host": "evil.example:8090"})[0] == 403  # DNS rebinding
    assert call(run_api, "GET", "/_admin/executions", headers={"Origin": "null"})[0] == 403
    # not an open proxy: absolute-form targets only for the made-up Run host
    for target in ("http://example.com/", "http://127.0.0.1:9/", "https://us-central1-run.bqx.internal/" + run,
                   "http://run.bqx.internal.example.com/" + run):
        code, out = call(run_api, "GET" if "example" in target else "POST", target, run_body())
        assert code == 403, (target, out)
    assert_nothing_started(run_api)
    code, out = call(run_api, "PUT", f"{V2}/jobs/bqx-ml-extract", {})
    assert code == 405


# ---------------------------------------------------------------------------------------------- served
def test_v2_through_the_real_client_and_v1_absolute_form_start_runs(run_api: RunApi) -> None:
    s = _settings()
    name = launch.run_job(s, "bqx-ml-extract", ["eurusd"], {"BQX_RUN_ID": "r-v2"})
    assert name.startswith("projects/bqx-ml/locations/us-central1/jobs/bqx-ml-extract/executions/")
    got = run_v2.ExecutionsClient(client_options={"api_endpoint": s.run_api_endpoint}, transport="rest",
                                  credentials=AnonymousCredentials()).get_execution(name=name)  # v2 GET, real client
    assert got.name == name and got.task_count == 1

    # gcloud's request: v1, absolute form through http_proxy, to the regional made-up host
    code, ex = call(run_api, "POST", f"http://europe-west1-run.bqx.internal{V1}/jobs/bqx-ml-merge:run?alt=json",
                    run_body(["gbpusd"], {"BQX_RUN_ID": "r-v1"}, taskCount=2, timeoutSeconds=60),
                    headers={"Host": "europe-west1-run.bqx.internal"})
    assert code == 200, ex
    assert ex["apiVersion"] == "run.googleapis.com/v1" and ex["kind"] == "Execution"
    assert ex["metadata"]["namespace"] == "bqx-ml" and ex["metadata"]["uid"]
    assert ex["metadata"]["labels"] == {"run.googleapis.com/job": "bqx-ml-merge",
                                        "cloud.googleapis.com/location": "europe-west1"}
    assert ex["spec"]["taskCount"] == 2
    assert {c["type"]: c["status"] for c in ex["status"]["conditions"]}["Started"] == "True"
    by_id = {e.id: e for e in started(run_api)}
    v1 = by_id[ex["metadata"]["name"]]
    assert (v1.args, v1.env, v1.task_count, v1.timeout) == (["gbpusd"], {"BQX_RUN_ID": "r-v1"}, 2, 60.0)
    assert v1.name.startswith("projects/bqx-ml/locations/europe-west1/jobs/bqx-ml-merge/executions/")
    v2 = by_id[name.rsplit("/", 1)[-1]]
    assert (v2.args, v2.env) == (["eurusd"], {"BQX_RUN_ID": "r-v2"})

    # both stores are one: each API sees the other's executions
    _wait(lambda: all(e.completed for e in started(run_api)))
    code, listing = call(run_api, "GET", f"{V1}/executions?labelSelector=run.googleapis.com%2Fjob+%3D+bqx-ml-extract")
    assert code == 200 and [i["metadata"]["name"] for i in listing["items"]] == [v2.id]
    assert {c["type"]: c["status"] for c in listing["items"][0]["status"]["conditions"]}["Completed"] == "True"
    code, listing = call(run_api, "GET", f"{V1}/executions?limit=100")
    assert code == 200 and len(listing["items"]) == 2
    code, one = call(run_api, "GET", f"{V2}/jobs/bqx-ml-merge/executions/{v1.id}", ctype=None)
    assert code == 200 and one["succeededCount"] == 2
    code, job = call(run_api, "GET", f"{V1}/jobs/bqx-ml-merge")
    assert code == 200 and job["status"]["executionCount"] == 1
    assert job["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "bqx-ml-merge"
    assert call(run_api, "GET", f"{V1}/jobs/nope")[0] == 404
    assert call(run_api, "GET", f"{V1}/executions/nope")[0] == 404
    assert call(run_api, "GET", "/apis/run.googleapis.com/v1/namespaces/other/executions/" + v1.id)[0] == 404
    assert call(run_api, "GET", f"{V1}/executions?labelSelector=run.googleapis.com%2Fjob+in+(a)")[0] == 400


def test_validate_only_starts_nothing(run_api: RunApi) -> None:
    code, op = call(run_api, "POST", f"{V2}/jobs/bqx-ml-extract:run", {**run_body(), "validateOnly": True})
    assert code == 200 and op["done"] is True
    assert started(run_api) == [] and not (run_api.home / "executions.jsonl").exists()


def test_fault_hook_still_fails_the_next_runs(run_api: RunApi) -> None:
    assert call(run_api, "POST", "/_admin/faults", {"fail_next": 1, "status": 503})[0] == 200
    assert call(run_api, "POST", "/_admin/faults", {"fail_next": 1, "shell": "id"})[0] == 400
    assert call(run_api, "POST", "/_admin/faults", b'{"fail_next": 1}', ctype="text/plain")[0] == 415
    code, out = call(run_api, "POST", f"{V1}/jobs/bqx-ml-extract:run", run_body())
    assert code == 503 and out["error"]["status"] == "UNAVAILABLE"
    assert call(run_api, "POST", f"{V1}/jobs/bqx-ml-extract:run", run_body())[0] == 200
    assert call(run_api, "POST", f"{V1}/jobs/nope:run", run_body())[0] == 404
    code, listing = call(run_api, "GET", "/_admin/executions")
    assert code == 200 and len(listing["executions"]) == 1 and listing["calls"] == 3


# ---------------------------------------------------------------------------------------------- processes
@pytest.fixture
def recording_api(tmp_path: Path) -> Iterator[tuple[RunApi, int, Path]]:
    """A Run API whose job writes its argv and env to a file, and a job that sleeps (for timeouts)."""
    out = tmp_path / "out"
    out.mkdir()
    record = ("import json, os, sys; keys = ('BQX_RUN_ID', 'CLOUD_RUN_JOB', 'CLOUD_RUN_TASK_INDEX', "
              "'CLOUD_RUN_TASK_COUNT', 'CLOUD_RUN_TASK_ATTEMPT'); "
              "open(os.path.join(os.environ['RECORD_DIR'], os.environ['CLOUD_RUN_EXECUTION'] + '-' + "
              "os.environ['CLOUD_RUN_TASK_INDEX']), 'w').write(json.dumps("
              "{'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in keys}}))")
    jobs = {"record": [sys.executable, "-c", record], "sleep": [sys.executable, "-c", "import time; time.sleep(30)"]}
    api = RunApi(tmp_path / "api", jobs, {"PATH": os.environ["PATH"], "RECORD_DIR": str(out)}, max_retries=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield api, server.server_address[1], out
    finally:
        server.shutdown()
        server.server_close()


def test_v1_and_v2_runs_are_the_same_processes(recording_api: tuple[RunApi, int, Path]) -> None:
    api, port, out = recording_api
    body = run_body(["audusd", "--force"], {"BQX_RUN_ID": "r9"}, taskCount=2)
    code, op = call(port, "POST", f"{V2}/jobs/record:run", body)
    assert code == 200
    code, ex = call(port, "POST", f"{V1}/jobs/record:run", body)
    assert code == 200
    ids = [op["response"]["name"].rsplit("/", 1)[-1], ex["metadata"]["name"]]
    _wait(lambda: len(list(out.iterdir())) == 4 and all(e.completed for e in started(api)))
    seen = {i: [json.loads((out / f"{i}-{t}").read_text()) for t in range(2)] for i in ids}
    assert seen[ids[0]] == seen[ids[1]]
    assert seen[ids[0]][1] == {"argv": ["audusd", "--force"], "env": {
        "BQX_RUN_ID": "r9", "CLOUD_RUN_JOB": "record", "CLOUD_RUN_TASK_INDEX": "1", "CLOUD_RUN_TASK_COUNT": "2",
        "CLOUD_RUN_TASK_ATTEMPT": "0"}}


def test_a_task_is_killed_after_its_timeout(recording_api: tuple[RunApi, int, Path]) -> None:
    api, port, _ = recording_api
    t0 = time.time()
    code, ex = call(port, "POST", f"{V1}/jobs/sleep:run", {"overrides": {"timeoutSeconds": 1}})
    assert code == 200
    _wait(lambda: all(e.completed for e in started(api)), timeout=15)
    assert time.time() - t0 < 10
    code, got = call(port, "GET", f"{V1}/executions/{ex['metadata']['name']}")
    conditions = {c["type"]: c for c in got["status"]["conditions"]}
    assert got["status"]["failedCount"] == 1 and conditions["Completed"]["status"] == "False"


def _wait(done: Any, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
