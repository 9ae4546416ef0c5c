"""A local stand-in for the Cloud Run Admin API (v2, REST) that the real `google-cloud-run` client talks to.

`POST .../jobs/<job>:run` starts the job's entrypoint as processes (one per task) with the overrides' args and
env plus CLOUD_RUN_* variables, and answers a done Operation whose metadata and response are the Execution.
`GET .../executions/<id>` reports its state. Every execution is appended to `executions.jsonl` so tests can
count launches. `POST /_admin/faults` makes the next calls fail (503 or a delay), for fault tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

EXECUTION_TYPE = "type.googleapis.com/google.cloud.run.v2.Execution"
_RUN_RE = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/jobs/([^/:]+):run$")
_EXEC_RE = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/jobs/([^/]+)/executions(?:/([^/]+))?$")


@dataclass
class Execution:
    name: str
    job: str
    args: list[str]
    env: dict[str, str]
    task_count: int
    created: float = field(default_factory=time.time)
    completed: float | None = None
    succeeded: int = 0
    failed: int = 0
    running: int = 0
    retried: int = 0

    def resource(self) -> dict[str, Any]:
        ts = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"  # noqa: E731
        out: dict[str, Any] = {
            "@type": EXECUTION_TYPE,
            "name": self.name,
            "job": self.job,
            "createTime": ts(self.created),
            "taskCount": self.task_count,
            "runningCount": self.running,
            "succeededCount": self.succeeded,
            "failedCount": self.failed,
            "retriedCount": self.retried,
        }
        if self.completed:
            out["completionTime"] = ts(self.completed)
        return out


class RunApi:
    def __init__(self, home: Path, jobs: dict[str, list[str]], base_env: dict[str, str], max_retries: int = 1):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.jobs = jobs
        self.base_env = base_env
        self.max_retries = max_retries
        self.executions: dict[str, Execution] = {}
        self.lock = threading.Lock()
        self.fail_next = 0
        self.fail_status = 503
        self.delay = 0.0
        self.calls = 0

    def run(self, project: str, location: str, job: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.calls += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status, _error(self.fail_status, "injected failure")
        if self.delay:
            time.sleep(self.delay)
        if job not in self.jobs:
            return 404, _error(404, f"Job {job} not found")
        overrides = body.get("overrides") or {}
        container = (overrides.get("containerOverrides") or [{}])[0]
        args = list(container.get("args") or [])
        env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
        task_count = int(overrides.get("taskCount") or 1)
        exec_id = f"{job}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = f"projects/{project}/locations/{location}/jobs/{job}/executions/{exec_id}"
        ex = Execution(name, job, args, env, task_count)
        with self.lock:
            self.executions[exec_id] = ex
            with open(self.home / "executions.jsonl", "a") as f:
                f.write(json.dumps({"event": "started", **asdict(ex)}) + "\n")
        for index in range(task_count):
            threading.Thread(target=self._task, args=(ex, exec_id, index), daemon=True).start()
        op = {
            "name": f"projects/{project}/locations/{location}/operations/{uuid.uuid4()}",
            "done": True,
            "metadata": ex.resource(),
            "response": ex.resource(),
        }
        return 200, op

    def _task(self, ex: Execution, exec_id: str, index: int) -> None:
        with self.lock:
            ex.running += 1
        code = -1
        for attempt in range(self.max_retries + 1):
            env = {**self.base_env, **ex.env, "CLOUD_RUN_JOB": ex.job, "CLOUD_RUN_EXECUTION": exec_id,
                   "CLOUD_RUN_TASK_INDEX": str(index), "CLOUD_RUN_TASK_COUNT": str(ex.task_count),
                   "CLOUD_RUN_TASK_ATTEMPT": str(attempt)}
            log_path = self.home / "logs" / f"{exec_id}-task{index}-attempt{attempt}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "wb") as out:
                proc = subprocess.Popen([*self.jobs[ex.job], *ex.args], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                code = proc.wait()
            if code == 0:
                break
            with self.lock:
                ex.retried += 1
        with self.lock:
            ex.running -= 1
            if code == 0:
                ex.succeeded += 1
            else:
                ex.failed += 1
            if ex.succeeded + ex.failed == ex.task_count:
                ex.completed = time.time()
                with open(self.home / "executions.jsonl", "a") as f:
                    f.write(json.dumps({"event": "completed", "name": ex.name, "job": ex.job,
                                        "succeeded": ex.succeeded, "failed": ex.failed}) + "\n")

    def get(self, job: str, exec_id: str | None) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if exec_id is None:
                found = [e.resource() for e in self.executions.values() if e.job == job]
                return 200, {"executions": found}
            ex = self.executions.get(exec_id)
            if ex is None:
                return 404, _error(404, f"Execution {exec_id} not found")
            return 200, ex.resource()


def _error(code: int, message: str) -> dict[str, Any]:
    status = {404: "NOT_FOUND", 503: "UNAVAILABLE", 500: "INTERNAL", 429: "RESOURCE_EXHAUSTED"}
    return {"error": {"code": code, "message": message, "status": status.get(code, "UNKNOWN")}}


def make_handler(api: RunApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: executions.jsonl is the record
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b"{}"
            try:
                return json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return {}

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            body = self._body()
            if path == "/_admin/faults":
                with api.lock:
                    api.fail_next = int(body.get("fail_next", 0))
                    api.fail_status = int(body.get("status", 503))
                    api.delay = float(body.get("delay", 0.0))
                self._reply(200, {"ok": True})
                return
            m = _RUN_RE.match(path)
            if not m:
                self._reply(404, _error(404, f"no route {path}"))
                return
            self._reply(*api.run(m.group(1), m.group(2), m.group(3), body))

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/_admin/executions":
                with api.lock:
                    self._reply(200, {"executions": [e.resource() for e in api.executions.values()],
                                      "calls": api.calls})
                return
            m = _EXEC_RE.match(path)
            if not m:
                self._reply(404, _error(404, f"no route {path}"))
                return
            self._reply(*api.get(m.group(3), m.group(4)))

    return Handler


def main() -> None:
    """python -m bqx.local.runapi: serve on BQX_PORT_RUN_API with jobs from BQX_LOCAL_JOBS (JSON)."""
    home = Path(os.environ["BQX_RUN_API_HOME"])
    jobs = json.loads(os.environ["BQX_LOCAL_JOBS"])
    port = int(os.environ.get("BQX_PORT_RUN_API", "8090"))
    base_env = {k: v for k, v in os.environ.items() if k not in ("BQX_LOCAL_JOBS",)}
    api = RunApi(home, jobs, base_env, max_retries=int(os.environ.get("BQX_TASK_MAX_RETRIES", "1")))
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(api))
    server.daemon_threads = True
    print(json.dumps({"severity": "INFO", "message": f"local Cloud Run API on 127.0.0.1:{port}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
