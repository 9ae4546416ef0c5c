"""The local IAM gate: a reverse proxy in front of fake-gcs-server and the local Cloud Run API that lets a call
through only when deploy/iam.tf grants the caller's service account the permission the call needs.

Each component of the local stack talks to the gate on a port of its own, and the port is its identity (the local
stand-in for the OAuth token of the account it runs as in the cloud, so every client keeps AnonymousCredentials).
A refused call gets the 403 GCS or Cloud Run would answer. Every decision is one JSON line in the gate's log.

    python -m bqx.local.gate    # env: BQX_GATE_IDENTITIES (JSON {port: {"component": name}}), the stack's
                                # ports (upstream: BQX_PORT_GCS, BQX_PORT_RUN_API), project, region, buckets
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from bqx.config import Settings
from bqx.local.iam import Policy, Resource
from bqx.local.servers import KeepAliveHandler

BLOCK = 1 << 20
MAX_INSPECTED_BODY = 64 << 20  # a multipart upload's body is read whole to find the object's name (the client
# sends objects over 8 MiB as resumable uploads, whose first request carries only metadata)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}

_OBJECTS = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)/o(?:/(?P<object>[^/]+))?"
                      r"(?:/(?P<verb>compose|rewriteTo|copyTo)(?:/b/(?P<dbucket>[^/]+)/o/(?P<dobject>[^/]+))?)?$")
_BUCKET = re.compile(r"^/storage/v1/b(?:/(?P<bucket>[^/]+))?$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$")
_DOWNLOAD = re.compile(r"^/download/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>[^/]+)$")
_RUN_V2 = re.compile(r"^/v2/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/jobs/(?P<job>[^/:]+)"
                     r"(?P<rest>:run|/executions(?:/[^/]+)?)?$")
_RUN_V1 = re.compile(r"^/apis/run\.googleapis\.com/v1/namespaces/(?P<project>[^/]+)/(?:jobs/(?P<job>[^/:]+)"
                     r"(?P<rest>:run)?|executions(?:/[^/]+)?)$")


@dataclass(frozen=True)
class Identity:
    component: str
    email: str

    @property
    def member(self) -> str:
        return f"serviceAccount:{self.email}"


@dataclass(frozen=True)
class Need:
    """One permission a call needs, on one resource."""

    permission: str
    resource: Resource


class Denied(Exception):
    def __init__(self, need: Need, service: str) -> None:
        super().__init__(need.permission)
        self.need, self.service = need, service


class Gate:
    def __init__(self, policy: Policy, identities: dict[int, Identity], gcs_port: int, run_port: int,
                 project: str, region: str, log: TextIO | None = None,
                 job_accounts: dict[str, str] | None = None) -> None:
        self.policy = policy
        self.job_accounts = job_accounts or {}  # job name -> its tasks' account, which starting it acts as
        self.out = log or sys.stdout  # where refusals are logged (the stack: the gate's own log file)
        self.identities = identities
        self.upstream = {"gcs": gcs_port, "run": run_port}
        self.project, self.region = project, region
        self.lock = threading.Lock()

    # ------------------------------------------------------------ what a call needs
    def needs(self, method: str, path: str, query: dict[str, list[str]], body: bytes | None,
              exists: Any) -> tuple[str, list[Need]]:
        """(upstream service, permissions) for a call; `exists(bucket, name)` asks whether an object is there."""
        p = self.project
        if path.startswith(("/storage/", "/upload/", "/download/")):
            return "gcs", self._gcs_needs(method, path, query, body, exists)
        if path.startswith(("/v2/", "/apis/")):
            return "run", self._run_needs(method, path, body)
        return "gcs", [Need("bqx.gate.unknownRoute", Resource(path, (f"projects/{p}",)))]

    def _gcs_needs(self, method: str, path: str, query: dict[str, list[str]], body: bytes | None,
                   exists: Any) -> list[Need]:
        p = self.project
        q = {k: v[0] for k, v in query.items()}

        def create(bucket: str, name: str) -> list[Need]:
            out = [Need("storage.objects.create", Resource.object(p, bucket, name))]
            if q.get("ifGenerationMatch") != "0" and exists(bucket, name):
                out.append(Need("storage.objects.delete", Resource.object(p, bucket, name)))  # an overwrite
            return out

        if m := _DOWNLOAD.match(path):
            return [Need("storage.objects.get", Resource.object(p, unquote(m["bucket"]), unquote(m["object"])))]
        if m := _UPLOAD.match(path):
            bucket = unquote(m["bucket"])
            if method == "PUT" and "upload_id" in q:
                return []  # a resumable session's later requests: the session URI is the capability
            if method != "POST":
                return [Need(f"bqx.gate.{method.lower()}Upload", Resource.bucket(p, bucket))]
            name = q.get("name") or _object_name(body or b"")
            if not name:
                return [Need("bqx.gate.uploadWithoutName", Resource.bucket(p, bucket))]
            return create(bucket, name)
        if m := _OBJECTS.match(path):
            bucket = unquote(m["bucket"])
            if m["object"] is None:
                verb = {"GET": "list", "POST": "create"}.get(method, method.lower())
                if verb == "create":
                    return create(bucket, json.loads(body or b"{}").get("name", ""))
                return [Need(f"storage.objects.{verb}", Resource.bucket(p, bucket))]
            name = unquote(m["object"])
            if m["verb"] == "compose":
                sources = [s.get("name", "") for s in json.loads(body or b"{}").get("sourceObjects", [])]
                return [*create(bucket, name), *(Need("storage.objects.get", Resource.object(p, bucket, s))
                                                 for s in sources)]
            if m["verb"] in ("rewriteTo", "copyTo"):
                return [Need("storage.objects.get", Resource.object(p, bucket, name)),
                        *create(unquote(m["dbucket"]), unquote(m["dobject"]))]
            verb = {"GET": "get", "HEAD": "get", "DELETE": "delete", "PATCH": "update", "PUT": "update"}
            return [Need(f"storage.objects.{verb.get(method, method.lower())}", Resource.object(p, bucket, name))]
        if m := _BUCKET.match(path):
            if m["bucket"] is None:
                verb = {"GET": "list", "POST": "create"}.get(method, method.lower())
                return [Need(f"storage.buckets.{verb}", Resource(f"projects/{p}", (f"projects/{p}",)))]
            verb = {"GET": "get", "DELETE": "delete", "PATCH": "update", "PUT": "update"}.get(method, method.lower())
            return [Need(f"storage.buckets.{verb}", Resource.bucket(p, unquote(m["bucket"])))]
        return [Need("bqx.gate.unknownStorageRoute", Resource(path, (f"projects/{p}",)))]

    def _run_needs(self, method: str, path: str, body: bytes | None) -> list[Need]:
        m = _RUN_V2.match(path) or _RUN_V1.match(path)
        if not m:
            return [Need("bqx.gate.unknownRunRoute", Resource(path, (f"projects/{self.project}",)))]
        job = m["job"]
        project = m["project"]
        region = m.groupdict().get("region") or self.region
        if job is None:  # v1 executions across jobs
            return [Need(f"run.executions.{'list' if path.endswith('executions') else 'get'}",
                         Resource(f"projects/{project}", (f"projects/{project}",)))]
        resource = Resource.job(project, region, job)
        rest = m["rest"] or ""
        if rest == ":run" and method == "POST":
            needs = [Need("run.jobs.run", resource)]
            if _has_overrides(body or b"{}"):
                needs.append(Need("run.jobs.runWithOverrides", resource))
            if job in self.job_accounts:  # Cloud Run also checks actAs on the account the execution will run as
                needs.append(Need("iam.serviceAccounts.actAs",
                                  Resource.service_account(project, self.job_accounts[job])))
            return needs
        if rest.startswith("/executions"):
            return [Need("run.executions.get" if rest.count("/") == 2 else "run.executions.list", resource)]
        return [Need("run.jobs.get" if method == "GET" else f"run.jobs.{method.lower()}", resource)]

    # ------------------------------------------------------------ deciding
    def check(self, identity: Identity, service: str, needs: list[Need]) -> None:
        for need in needs:
            if self.policy.allows(identity.member, need.permission, need.resource) is None:
                raise Denied(need, service)

    def log_denial(self, identity: Identity, method: str, path: str, need: Need) -> None:
        """One JSON line per refused call (allowed calls are not logged: a merge makes thousands)."""
        line = json.dumps({"severity": "WARNING", "message": "permission denied", "component": identity.component,
                           "principal": identity.email, "method": method, "path": path[:300],
                           "permission": need.permission, "resource": need.resource.name, "time": time.time()})
        with self.lock:  # one write per line: concurrent denials must not share a line
            self.out.write(line + "\n")
            self.out.flush()


def denial_body(service: str, identity: Identity, need: Need) -> dict[str, Any]:
    """The 403 body Google answers: GCS's JSON API error, or Cloud Run's google.rpc.Status."""
    if service == "gcs":
        kind = "object" if "/objects/" in need.resource.name else "bucket"
        message = (f"{identity.email} does not have {need.permission} access to the Google Cloud Storage {kind}. "
                   f"Permission '{need.permission}' denied on resource (or it may not exist).")
        return {"error": {"code": 403, "message": message,
                          "errors": [{"message": message, "domain": "global", "reason": "forbidden"}]}}
    message = f"Permission '{need.permission}' denied on resource '{need.resource.name}' (or resource may not exist)."
    return {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}


def _has_overrides(body: bytes) -> bool:
    try:
        overrides = json.loads(body or b"{}").get("overrides") or {}
    except (ValueError, AttributeError):
        return True  # unreadable: the Run API refuses it; the gate asks for the broader permission
    return any(v not in (None, "", [], {}, 0) for v in overrides.values())


def _object_name(body: bytes) -> str:
    """The object name in a multipart upload's metadata part, or a resumable upload's JSON metadata."""
    head = body[:65536]
    start = head.find(b"{")
    if start < 0:
        return ""
    try:
        obj, _ = json.JSONDecoder().raw_decode(head[start:].decode("utf-8", "replace"))
    except ValueError:
        return ""
    return str(obj.get("name") or "") if isinstance(obj, dict) else ""


_local = threading.local()


def _upstream(port: int) -> http.client.HTTPConnection:
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get(port)
    if conn is None:
        conn = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=BLOCK)
    return conn


def _drop_upstream(port: int) -> None:
    conn = getattr(_local, "conns", {}).pop(port, None)
    if conn is not None:
        conn.close()


def make_handler(gate: Gate) -> type[BaseHTTPRequestHandler]:
    class Handler(KeepAliveHandler):
        def handle(self) -> None:
            try:
                super().handle()
            except (ConnectionResetError, BrokenPipeError):
                pass  # the caller went away (an instance killed mid-request): there is no one to answer

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body_chunks(self) -> Iterator[bytes]:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    yield self.rfile.read(size)
                    self.rfile.readline()
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(BLOCK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

        def _exists(self, bucket: str, name: str) -> bool:
            conn = _upstream(gate.upstream["gcs"])
            try:
                conn.request("GET", f"/storage/v1/b/{_q(bucket)}/o/{_q(name)}?fields=name")
                resp = conn.getresponse()
                resp.read()
                return resp.status == 200
            except (OSError, http.client.HTTPException):
                _drop_upstream(gate.upstream["gcs"])
                return False

        def _handle(self) -> None:
            identity = gate.identities[self.server.server_address[1]]
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            inspect = self.command in ("POST", "PATCH", "PUT") and not (
                path.startswith("/upload/") and self.command == "PUT")
            length = int(self.headers.get("Content-Length") or 0)
            body: bytes | None = None
            if inspect and length <= MAX_INSPECTED_BODY:
                body = b"".join(self._body_chunks())
            elif inspect:
                self._json(413, {"error": {"code": 413, "message": "body too large for the local gate"}})
                return
            service, needs = gate.needs(self.command, path, query, body, self._exists)
            try:
                gate.check(identity, service, needs)
            except Denied as denied:
                gate.log_denial(identity, self.command, self.path, denied.need)
                if body is None:
                    for _ in self._body_chunks():
                        pass
                self._json(403, denial_body(denied.service, identity, denied.need))
                return
            self._forward(gate.upstream[service], body)

        def _forward(self, port: int, body: bytes | None) -> None:
            conn = _upstream(port)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        conn.putheader(key, value)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    for chunk in self._body_chunks():
                        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.putheader("Content-Length", self.headers.get("Content-Length") or "0")
                    conn.endheaders()
                    for chunk in self._body_chunks():
                        conn.send(chunk)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                _drop_upstream(port)
                self._json(502, {"error": {"code": 502, "message": f"local gate: upstream {port}: {exc}"}})
                return
            if (port == gate.upstream["gcs"] and self.command != "HEAD" and not _is_media(self.path)
                    and (resp.getheader("Content-Type") or "").startswith("application/json")):
                self._reply_links(resp, port)
                return
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            chunked = length is None and self.command != "HEAD" and resp.status not in (204, 304)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while chunk := resp.read(BLOCK):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            finally:
                if resp.will_close:
                    _drop_upstream(port)

        def _reply_links(self, resp: http.client.HTTPResponse, port: int) -> None:
            """An object resource (or a listing of them) names its download URL (mediaLink) on fake-gcs-server's
            own address; the caller is sent back through its own gate port, so a download that follows the link
            is checked too (storage.objects.get), as GCS checks it."""
            try:
                data = resp.read()
            finally:
                if resp.will_close:
                    _drop_upstream(port)
            data = data.replace(f"http://127.0.0.1:{port}/".encode(),
                                f"http://127.0.0.1:{self.server.server_address[1]}/".encode())
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

    return Handler


def _is_media(path: str) -> bool:
    """A download of an object's bytes (its content, passed on untouched even when it is JSON), not a resource."""
    split = urlsplit(path)
    return split.path.startswith("/download/") or "media" in parse_qs(split.query).get("alt", [])


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def serve(gate: Gate) -> list[ThreadingHTTPServer]:
    """Listen on every identity's port; returns the servers (each serving on a daemon thread)."""
    servers = []
    handler = make_handler(gate)
    for port in gate.identities:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    return servers


def for_components(s: Settings, ports: dict[int, str], gcs_port: int | None = None,
                   run_port: int | None = None, log: TextIO | None = None) -> Gate:
    """A gate for `ports` ({port: component}), each component as the account deploy/ gives it, in front of the
    given fake-gcs-server and Run API (default: the settings' own)."""
    from bqx.local.iam import job_accounts, service_accounts
    from bqx.local.stack import deploy_dir, gate_variables

    variables, deploy = gate_variables(s), deploy_dir(s)
    accounts = service_accounts(variables, deploy)
    identities = {port: Identity(component, accounts[component]) for port, component in ports.items()}
    return Gate(Policy.from_terraform(variables, deploy), identities, gcs_port or s.ports.gcs,
                run_port or s.ports.run_api, s.project, s.region, log, job_accounts(variables, deploy))


def main() -> None:
    from bqx.config import Settings

    s = Settings.from_env()
    routes = json.loads(s.gate_identities)
    gate = for_components(s, {int(port): v["component"] for port, v in routes.items()})
    identities, unknown = gate.identities, gate.policy.unknown_roles()
    serve(gate)
    print(json.dumps({"severity": "INFO", "message": "IAM gate up", "identities": {
        str(p): f"{i.component} as {i.email}" for p, i in identities.items()},
        "roles_without_permissions_table": sorted(unknown)}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
