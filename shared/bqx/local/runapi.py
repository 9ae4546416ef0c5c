"""A local stand-in for the Cloud Run Admin API that the real `google-cloud-run` client (v2) and `gcloud` (v1) use.

Routes (v2 REST and the v1 Knative-style API share one execution store and one `RunApi.start`):

    POST /v2/projects/P/locations/L/jobs/J:run                        -> done Operation whose response is the Execution
    GET  /v2/projects/P/locations/L/jobs/J/executions[/E]
    POST /apis/run.googleapis.com/v1/namespaces/P/jobs/J:run          -> v1 Execution (`gcloud run jobs execute`)
    GET  /apis/run.googleapis.com/v1/namespaces/P/jobs[/J]
    GET  /apis/run.googleapis.com/v1/namespaces/P/executions[/E]      (`?labelSelector=run.googleapis.com/job = J`)

A run starts the job's entrypoint as processes (one per task) with the overrides' args and env plus CLOUD_RUN_*
variables. Every execution is appended to `executions.jsonl` so tests can count launches. Test hooks:
`POST /_admin/faults` makes the next runs fail (503 or a delay); `GET /_admin/executions` lists every execution.

The API is strict, because anything that reaches this port can start processes on the machine: POST bodies must be
`Content-Type: application/json` (so a web page cannot post a "simple" cross-site request, and browsers' requests,
which carry `Origin`, are refused), the Host must be a loopback name (no DNS rebinding), unknown fields are refused
as Cloud Run refuses them, and env overrides are limited to `ALLOWED_ENV_OVERRIDES`.

gcloud derives the regional host of the v1 API by prefixing the region to its endpoint override's host
(`http://run.bqx.internal/` -> `http://us-central1-run.bqx.internal/`), a name that does not resolve; `bqx stack env`
sets `http_proxy` to this server, so gcloud sends those requests here in absolute form. Absolute-form targets are
served only for `LOCAL_RUN_HOST` and its regional names: this is not an open proxy.
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
from urllib.parse import parse_qs, urlsplit

from bqx.local.servers import KeepAliveHandler

EXECUTION_TYPE = "type.googleapis.com/google.cloud.run.v2.Execution"
V1_API_VERSION = "run.googleapis.com/v1"
JOB_LABEL = "run.googleapis.com/job"
LOCATION_LABEL = "cloud.googleapis.com/location"

LOCAL_RUN_HOST = "run.bqx.internal"
"""The made-up host `bqx stack env` gives gcloud as its Run endpoint; only it (and REGION-run.bqx.internal) may be
named in an absolute-form request target."""

# The env a run may override. The functions set only BQX_RUN_ID (bqx.trigger and bqx.completion.handler, through
# gcp.launch.run_job). Anything else would let whoever reaches this port change what the job's interpreter loads or
# runs (PYTHONPATH, PYTHONSTARTUP, PYTHONWARNINGS, LD_PRELOAD, BROWSER, ...), so any other name is refused with 400
# and starts nothing.
ALLOWED_ENV_OVERRIDES = frozenset({"BQX_RUN_ID"})

MAX_TASKS = 100  # Cloud Run allows 10,000; here every task is a local process
MAX_BODY = 1 << 20
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_LOCAL_RUN_HOST_RE = re.compile(r"^(?:(?P<region>[a-z]+(?:-[a-z]+)*\d+)-)?" + re.escape(LOCAL_RUN_HOST) + r"$")

_V2_RUN = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/jobs/([^/:]+):run$")
_V2_EXEC = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/jobs/([^/:]+)/executions(?:/([^/]+))?$")
_V1 = r"^/apis/run\.googleapis\.com/v1/namespaces/([^/]+)"
_V1_RUN = re.compile(_V1 + r"/jobs/([^/:]+):run$")
_V1_JOB = re.compile(_V1 + r"/jobs(?:/([^/:]+))?$")
_V1_EXEC = re.compile(_V1 + r"/executions(?:/([^/]+))?$")
_DURATION = re.compile(r"^(\d{1,9})(?:\.(\d{1,9}))?s$")

# The fields each API's RunJobRequest defines (JSON names); anything else is refused as Cloud Run refuses it.
_FIELDS = {
    "v2": {"request": {"overrides", "validateOnly", "etag"},
           "overrides": {"containerOverrides", "taskCount", "timeout"}},
    "v1": {"request": {"overrides"}, "overrides": {"containerOverrides", "taskCount", "timeoutSeconds"}},
}
_CONTAINER_FIELDS = {"name", "args", "env", "clearArgs"}
_ENV_FIELDS = {"name", "value"}  # valueSource / valueFrom (secrets) do not exist locally


class ApiError(Exception):
    """An error answered the way Google APIs answer: {"error": {"code", "message", "status"}}."""

    STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
              411: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
              500: "INTERNAL", 503: "UNAVAILABLE"}

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.STATUS.get(self.code, "UNKNOWN")}}


def _error(code: int, message: str) -> dict[str, Any]:
    return ApiError(code, message).body()


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1e6) % 1_000_000:06d}Z"


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RunRequest:
    """A RunJobRequest (v1 or v2) after validation."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    task_count: int | None = None
    timeout: float | None = None
    validate_only: bool = False


def _invalid(message: str) -> ApiError:
    return ApiError(400, message)


def _object(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"Invalid JSON payload received. Expected an object at '{where}'.")
    for key in value:
        if key not in allowed:
            raise _invalid(f'Invalid JSON payload received. Unknown name "{key}" at \'{where}\': Cannot find field.')
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"Invalid value at '{where}': expected a string.")
    if "\x00" in value:
        raise _invalid(f"Invalid value at '{where}': contains a NUL character.")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,10}", value):  # proto3 JSON allows int32 as a string
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"Invalid value at '{where}': expected an integer.")
    return value


def parse_run_request(body: Any, version: str, job: str) -> RunRequest:
    """Validate a RunJobRequest body of API `version` ('v1' or 'v2') for `job`; raise ApiError(400) on anything
    Cloud Run would refuse, or anything the local API does not allow (env names outside ALLOWED_ENV_OVERRIDES)."""
    fields = _FIELDS[version]
    request = _object(body, "request", fields["request"])
    overrides = _object(request.get("overrides"), "overrides", fields["overrides"])
    containers = overrides.get("containerOverrides") or []
    if not isinstance(containers, list):
        raise _invalid("Invalid value at 'overrides.container_overrides': expected a list.")
    if len(containers) > 1:
        raise _invalid(f"job {job} has one container; got {len(containers)} container overrides")
    args: list[str] = []
    env: dict[str, str] = {}
    for c, raw in enumerate(containers):
        where = f"overrides.containerOverrides[{c}]"
        container = _object(raw, where, _CONTAINER_FIELDS)
        name = _string(container.get("name") or "", f"{where}.name")
        if name not in ("", job):
            raise _invalid(f"container {name!r} not found in job {job} (its container is named {job!r})")
        raw_args = container.get("args") or []
        if not isinstance(raw_args, list):
            raise _invalid(f"Invalid value at '{where}.args': expected a list of strings.")
        args = [_string(a, f"{where}.args[{i}]") for i, a in enumerate(raw_args)]
        clear = container.get("clearArgs") or False
        if not isinstance(clear, bool):
            raise _invalid(f"Invalid value at '{where}.clearArgs': expected a boolean.")
        if clear and args:
            raise _invalid(f"{where}: args must be empty when clearArgs is true")
        raw_env = container.get("env") or []
        if not isinstance(raw_env, list):
            raise _invalid(f"Invalid value at '{where}.env': expected a list.")
        for i, item in enumerate(raw_env):
            var = _object(item, f"{where}.env[{i}]", _ENV_FIELDS)
            key = _string(var.get("name"), f"{where}.env[{i}].name")
            if key not in ALLOWED_ENV_OVERRIDES:
                raise _invalid(f"env override {key!r} is not allowed by the local Cloud Run API; allowed: "
                               f"{', '.join(sorted(ALLOWED_ENV_OVERRIDES))}")
            env[key] = _string(var.get("value") or "", f"{where}.env[{i}].value")
    task_count = None
    if overrides.get("taskCount") is not None:
        task_count = _int(overrides["taskCount"], "overrides.taskCount")
        if not 1 <= task_count <= MAX_TASKS:
            raise _invalid(f"overrides.taskCount must be between 1 and {MAX_TASKS} locally, got {task_count}")
    timeout = None
    if version == "v2" and overrides.get("timeout") is not None:
        m = _DURATION.match(_string(overrides["timeout"], "overrides.timeout"))
        if not m:
            raise _invalid(f"Invalid value at 'overrides.timeout': not a duration: {overrides['timeout']!r}")
        timeout = float(f"{m.group(1)}.{m.group(2) or 0}")
    if version == "v1" and overrides.get("timeoutSeconds") is not None:
        timeout = float(_int(overrides["timeoutSeconds"], "overrides.timeoutSeconds"))
    if timeout is not None and timeout <= 0:
        raise _invalid("the task timeout must be positive")
    validate_only = request.get("validateOnly") or False
    if not isinstance(validate_only, bool):
        raise _invalid("Invalid value at 'validate_only': expected a boolean.")
    if request.get("etag") is not None:
        _string(request["etag"], "etag")
    return RunRequest(args, env, task_count, timeout, validate_only)


# ---------------------------------------------------------------------------------------------- executions
@dataclass
class Execution:
    name: str
    """The v2 resource name, projects/P/locations/L/jobs/J/executions/E."""
    job: str
    args: list[str]
    env: dict[str, str]
    task_count: int
    timeout: float | None = None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: float = field(default_factory=time.time)
    completed: float | None = None
    succeeded: int = 0
    failed: int = 0
    running: int = 0
    retried: int = 0
    cancelled: int = 0
    exits: dict[int, int] = field(default_factory=dict)  # task index -> its last attempt's exit code
    pids: dict[int, int] = field(default_factory=dict)  # task index -> its running process (tests kill it)

    def outcome(self) -> str:
        """Why the execution ended as it did, in Cloud Run's words: a task's exit code, or the signal that killed it
        (Cloud Run reports an out-of-memory kill or a lost instance as a failed task, exit 137 = 128 + SIGKILL)."""
        failed = {i: c for i, c in sorted(self.exits.items()) if c != 0}
        if not failed:
            return f"Execution {self.id} has completed successfully."
        parts = []
        for index, code in list(failed.items())[:3]:
            how = (f"was terminated by signal {-code} (exit code {128 - code})" if code < 0
                   else f"exited with an exit code of {code}")
            parts.append(f"Task {self.id}-task{index} failed: the container {how}.")
        return " ".join(parts)

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def project(self) -> str:
        return self.name.split("/")[1]

    @property
    def location(self) -> str:
        return self.name.split("/")[3]

    def resource(self) -> dict[str, Any]:
        """The v2 Execution."""
        out: dict[str, Any] = {
            "@type": EXECUTION_TYPE,
            "name": self.name,
            "uid": self.uid,
            "job": self.job,
            "createTime": _ts(self.created),
            "startTime": _ts(self.created),
            "taskCount": self.task_count,
            "runningCount": self.running,
            "succeededCount": self.succeeded,
            "failedCount": self.failed,
            "cancelledCount": self.cancelled,
            "retriedCount": self.retried,
            "reconciling": self.completed is None,
        }
        if self.completed:
            out["completionTime"] = _ts(self.completed)
            ok = self.failed == 0 and self.cancelled == 0
            out["conditions"] = [{"type": "Completed", "state": "CONDITION_SUCCEEDED" if ok else "CONDITION_FAILED",
                                  "message": self.outcome(), "lastTransitionTime": _ts(self.completed),
                                  **({} if ok else {"severity": "ERROR"})}]
        else:
            out["conditions"] = [{"type": "Completed", "state": "CONDITION_PENDING",
                                  "lastTransitionTime": _ts(self.created),
                                  "message": f"{self.running} task(s) running"}]
        return out

    def v1(self) -> dict[str, Any]:
        """The v1 (Knative-style) Execution that gcloud reads."""
        started = _ts(self.created)
        done = self.completed is not None
        completed = {"type": "Completed", "status": "Unknown", "reason": "Running", "lastTransitionTime": started,
                     "message": f"{self.running} task(s) running"}
        if done:
            ok = self.failed == 0
            completed = {"type": "Completed", "status": "True" if ok else "False",
                         "lastTransitionTime": _ts(self.completed or self.created),
                         "message": f"{self.succeeded} task(s) succeeded, {self.failed} failed"}
            if not ok:
                completed.update(reason="NonZeroExitCode", severity="Error")
        template: dict[str, Any] = {"containers": [{
            "name": self.job, "image": f"local/{self.job}", "args": self.args,
            "env": [{"name": k, "value": v} for k, v in sorted(self.env.items())]}]}
        if self.timeout is not None:
            template["timeoutSeconds"] = int(self.timeout)
        status: dict[str, Any] = {
            "observedGeneration": 1,
            "conditions": [completed,
                           {"type": "ResourcesAvailable", "status": "True", "lastTransitionTime": started},
                           {"type": "Started", "status": "True", "lastTransitionTime": started}],
            "startTime": started,
            "runningCount": self.running,
            "succeededCount": self.succeeded,
            "failedCount": self.failed,
            "retriedCount": self.retried,
        }
        if done:
            status["completionTime"] = _ts(self.completed or self.created)
        return {
            "apiVersion": V1_API_VERSION,
            "kind": "Execution",
            "metadata": {
                "name": self.id,
                "namespace": self.project,
                "uid": self.uid,
                "generation": 1,
                "creationTimestamp": _ts(self.created),
                "selfLink": f"/apis/{V1_API_VERSION}/namespaces/{self.project}/executions/{self.id}",
                "labels": {JOB_LABEL: self.job, LOCATION_LABEL: self.location},
                "annotations": {"run.googleapis.com/creator": "local"},
            },
            "spec": {"parallelism": self.task_count, "taskCount": self.task_count, "template": {"spec": template}},
            "status": status,
        }


class RunApi:
    def __init__(self, home: Path, jobs: dict[str, list[str]], base_env: dict[str, str], max_retries: int = 1,
                 region: str = "us-central1"):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.jobs = jobs
        self.base_env = base_env
        self.max_retries = max_retries
        self.region = region  # the location of v1 runs whose request names none (no regional host)
        self.executions: dict[str, Execution] = {}
        self.lock = threading.Lock()
        self.fail_next = 0
        self.fail_status = 503
        self.delay = 0.0
        self.calls = 0

    def start(self, project: str, location: str, job: str, request: RunRequest) -> Execution:
        """The one code path that runs a job, for v1 and v2 alike; raises ApiError."""
        with self.lock:
            self.calls += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                raise ApiError(self.fail_status, "injected failure")
        if self.delay:
            time.sleep(self.delay)
        if job not in self.jobs:
            raise ApiError(404, f"Job {job} not found")
        task_count = request.task_count or 1
        exec_id = f"{job}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = f"projects/{project}/locations/{location}/jobs/{job}/executions/{exec_id}"
        ex = Execution(name, job, list(request.args), dict(request.env), task_count, request.timeout)
        if request.validate_only:
            return ex
        with self.lock:
            self.executions[exec_id] = ex
            with open(self.home / "executions.jsonl", "a") as f:
                f.write(json.dumps({"event": "started", **{k: v for k, v in asdict(ex).items()
                                                            if k not in ("exits", "pids")}}) + "\n")
        for index in range(task_count):
            threading.Thread(target=self._task, args=(ex, exec_id, index), daemon=True).start()
        return ex

    def run(self, project: str, location: str, job: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """v2 `jobs:run`: a done Operation whose metadata and response are the Execution."""
        try:
            ex = self.start(project, location, job, parse_run_request(body, "v2", job))
        except ApiError as exc:
            return exc.code, exc.body()
        op = {
            "name": f"projects/{project}/locations/{location}/operations/{uuid.uuid4()}",
            "done": True,
            "metadata": ex.resource(),
            "response": ex.resource(),
        }
        return 200, op

    def run_v1(self, namespace: str, location: str, job: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """v1 `jobs:run` (gcloud run jobs execute): the Execution itself."""
        try:
            ex = self.start(namespace, location, job, parse_run_request(body, "v1", job))
        except ApiError as exc:
            return exc.code, exc.body()
        with self.lock:
            return 200, ex.v1()

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
                with self.lock:
                    ex.pids[index] = proc.pid
                try:
                    code = proc.wait(timeout=ex.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                    out.write(f"\nlocal Cloud Run: task killed after its timeout of {ex.timeout:g}s\n".encode())
            if code == 0:
                break
            with self.lock:
                ex.retried += 1
        with self.lock:
            ex.pids.pop(index, None)
            ex.exits[index] = code
            ex.running -= 1
            if code == 0:
                ex.succeeded += 1
            else:
                ex.failed += 1
            if ex.succeeded + ex.failed == ex.task_count:
                ex.completed = time.time()
                with open(self.home / "executions.jsonl", "a") as f:
                    f.write(json.dumps({"event": "completed", "name": ex.name, "job": ex.job,
                                        "succeeded": ex.succeeded, "failed": ex.failed,
                                        "message": ex.outcome()}) + "\n")

    def get(self, job: str, exec_id: str | None) -> tuple[int, dict[str, Any]]:
        """v2 executions of `job` (list) or one of them."""
        with self.lock:
            if exec_id is None:
                found = [e.resource() for e in self.executions.values() if e.job == job]
                return 200, {"executions": found}
            ex = self.executions.get(exec_id)
            if ex is None or ex.job != job:
                return 404, _error(404, f"Execution {exec_id} not found")
            return 200, ex.resource()

    # ------------------------------------------------------------------ v1 reads
    def get_v1_execution(self, namespace: str, exec_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            ex = self.executions.get(exec_id)
            if ex is None or ex.project != namespace:
                return 404, _error(404, f"Execution {exec_id} not found")
            return 200, ex.v1()

    def list_v1_executions(self, namespace: str, label_selector: str) -> tuple[int, dict[str, Any]]:
        wanted = _label_selector(label_selector)
        with self.lock:
            items = [e.v1() for e in self.executions.values() if e.project == namespace]
        items = [i for i in items if all(i["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
        return 200, {"apiVersion": V1_API_VERSION, "kind": "ExecutionsList", "metadata": {}, "items": items}

    def job_v1(self, namespace: str, job: str) -> dict[str, Any]:
        with self.lock:
            mine = [e for e in self.executions.values() if e.job == job and e.project == namespace]
        status: dict[str, Any] = {"observedGeneration": 1, "executionCount": len(mine),
                                  "conditions": [{"type": "Ready", "status": "True"}]}
        if mine:
            last = max(mine, key=lambda e: e.created)
            status["latestCreatedExecution"] = {"name": last.id, "creationTimestamp": _ts(last.created)}
        return {
            "apiVersion": V1_API_VERSION,
            "kind": "Job",
            "metadata": {"name": job, "namespace": namespace, "generation": 1,
                         "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bqx-local/{namespace}/{job}")),
                         "labels": {LOCATION_LABEL: self.region}, "annotations": {}},
            "spec": {"template": {"metadata": {}, "spec": {
                "taskCount": 1, "template": {"spec": {
                    "containers": [{"name": job, "image": f"local/{job}"}], "maxRetries": self.max_retries}}}}},
            "status": status,
        }

    def get_v1_job(self, namespace: str, job: str | None) -> tuple[int, dict[str, Any]]:
        if job is None:
            return 200, {"apiVersion": V1_API_VERSION, "kind": "JobsList", "metadata": {},
                         "items": [self.job_v1(namespace, j) for j in sorted(self.jobs)]}
        if job not in self.jobs:
            return 404, _error(404, f"Job {job} not found")
        return 200, self.job_v1(namespace, job)


def _label_selector(text: str) -> dict[str, str]:
    """'k = v, k2==v2' -> {k: v, k2: v2}; other selector forms are refused."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([\w./-]+)\s*==?\s*([\w.-]*)", term)
        if not m:
            raise ApiError(400, f"unsupported labelSelector term {term!r} (the local API understands key = value)")
        out[m.group(1)] = m.group(2)
    return out


# ---------------------------------------------------------------------------------------------- HTTP
def _host_name(host: str) -> str | None:
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None


def _local_run_host(hostname: str | None) -> re.Match[str] | None:
    return _LOCAL_RUN_HOST_RE.match(hostname or "")


def make_handler(api: RunApi) -> type[BaseHTTPRequestHandler]:
    class Handler(KeepAliveHandler):  # quiet: executions.jsonl is the record
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            """The whole body (Content-Length or chunked), so the connection stays in step even when refused."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    total += size
                    if total > MAX_BODY:
                        self.close_connection = True
                        raise ApiError(413, f"request body over {MAX_BODY} bytes")
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "bad Content-Length") from None
            if n > MAX_BODY or n < 0:
                self.close_connection = True
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
            return self.rfile.read(n) if n else b""

        def _target(self) -> tuple[str, dict[str, list[str]]]:
            """(path, query) of the request, after the checks that keep browsers and other hosts out."""
            if self.headers.get("Origin") is not None:
                raise ApiError(403, "requests from web pages (with an Origin header) are refused by the local API")
            host = self.headers.get("Host")
            name = _host_name(host) if host else None
            if name not in _LOOPBACK_HOSTS and not _local_run_host(name):
                raise ApiError(403, f"Host {host!r} is not served here (only 127.0.0.1, localhost, {LOCAL_RUN_HOST})")
            target = urlsplit(self.path)
            if target.scheme or target.netloc:  # absolute form: a client using this server as its http proxy
                if target.scheme != "http" or not _local_run_host(target.hostname):
                    raise ApiError(403, f"not a proxy: only http://[REGION-]{LOCAL_RUN_HOST}/ is served here")
            return target.path, parse_qs(target.query)

        def _region(self) -> str:
            """The region of a v1 request: the prefix of its regional host, else the API's default."""
            m = _local_run_host(urlsplit(self.path).hostname) or _local_run_host(_host_name(self.headers["Host"]))
            return (m and m.group("region")) or api.region

        def _serve(self) -> None:
            try:
                raw = self._read_body()
                path, query = self._target()
                if self.command == "POST":
                    code, out = self._post(path, self._json(raw))
                elif self.command == "GET":
                    code, out = self._get(path, query)
                else:
                    raise ApiError(405, f"method {self.command} is not supported")
            except ApiError as exc:
                code, out = exc.code, exc.body()
            self._reply(code, out)

        def _json(self, raw: bytes) -> Any:
            ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
            try:
                return json.loads(raw or b"{}", parse_constant=_no_constant)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"Invalid JSON payload received. {exc}") from None

        def _post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
            if path == "/_admin/faults":
                faults = _object(body, "faults", {"fail_next", "status", "delay"})
                fail_next = _int(faults.get("fail_next", 0), "fail_next")
                status = _int(faults.get("status", 503), "status")
                delay = faults.get("delay", 0.0)
                if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 600:
                    raise ApiError(400, "delay must be a number of seconds between 0 and 600")
                if not 400 <= status <= 599:
                    raise ApiError(400, "status must be an HTTP error code")
                with api.lock:
                    api.fail_next, api.fail_status, api.delay = fail_next, status, float(delay)
                return 200, {"ok": True}
            if m := _V2_RUN.match(path):
                return api.run(m.group(1), m.group(2), m.group(3), body)
            if m := _V1_RUN.match(path):
                return api.run_v1(m.group(1), self._region(), m.group(2), body)
            raise ApiError(404, f"no route {path}")

        def _get(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
            if path == "/_admin/executions":
                with api.lock:
                    return 200, {"executions": [e.resource() for e in api.executions.values()], "calls": api.calls}
            if m := _V2_EXEC.match(path):
                return api.get(m.group(3), m.group(4))
            if m := _V1_EXEC.match(path):
                if m.group(2):
                    return api.get_v1_execution(m.group(1), m.group(2))
                return api.list_v1_executions(m.group(1), ",".join(query.get("labelSelector", [])))
            if m := _V1_JOB.match(path):
                return api.get_v1_job(m.group(1), m.group(2))
            raise ApiError(404, f"no route {path}")

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve  # noqa: N815

    return Handler


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def main() -> None:
    """python -m bqx.local.runapi: serve on BQX_PORT_RUN_API with jobs from BQX_LOCAL_JOBS (JSON)."""
    from bqx.config import Settings

    s = Settings.from_env()
    if not s.run_api_home or not s.local_jobs:
        raise SystemExit("bqx.local.runapi is started by the local stack (BQX_RUN_API_HOME, BQX_LOCAL_JOBS)")
    port = s.ports.run_api
    # the executions' environment: this process's own, passed on (not settings read here)
    base_env = {k: v for k, v in os.environ.items() if k not in ("BQX_LOCAL_JOBS",)}
    api = RunApi(Path(s.run_api_home), json.loads(s.local_jobs), base_env, max_retries=s.task_max_retries,
                 region=s.region)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(api))
    server.daemon_threads = True
    print(json.dumps({"severity": "INFO", "message": f"local Cloud Run API on 127.0.0.1:{port}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
