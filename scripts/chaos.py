#!/usr/bin/env python
"""Chaos harness for the completion handoff: N seeded schedules against the real `completion` function.

Each schedule is one extraction run: a manifest of 2-6 tables, real Parquet checkpoints uploaded to
fake-gcs-server, then the extract's report, and each of these objects' finalize events delivered 1-3 times
(Eventarc or Pub/Sub-push shape, structured or binary CloudEvents), shuffled, by 8 concurrent senders that
redeliver failures (HTTP 500 or a dropped connection) with backoff, at most MAX_ATTEMPTS times, as Pub/Sub push
does. The function runs as it deploys: its packaged source in a venv of its packaged requirements
(bqx.local.artifacts), in a real `functions-framework` (gunicorn) server process, reaching GCS and the Run API
through the IAM gate as the account deploy/ gives it (bqx.local.gate). Faults, chosen by the seed:
  - crash after claiming: the claims failpoint (BQX_FAILPOINT_AFTER_CLAIM) makes the instance that wins the
    merge claim exit on the spot (`exit`: the process dies, gunicorn starts a new one) or raise (`raise`);
  - crash after launching (the launch window): BQX_FAILPOINT_AFTER_LAUNCH makes the instance exit or raise after
    Cloud Run accepted `run_job` and before the execution is recorded: the claim goes stale, a redelivery takes it
    over and launches the merge again;
  - the Cloud Run Admin API (bqx.local.runapi, a real HTTP server the google-cloud-run client talks to)
    answers its next 1-3 calls with 503.
The Run API runs each merge execution as a process (scripts/chaos_job.py: the real start of a launched merge, the
launch claim's record and then the run's start claim, bqx.job.start_launched). After each schedule the harness waits
for the run's merge executions to end and counts those that went on to merge: exactly one is the only right answer
(a launch-window crash launches two; one of them must do nothing).

    python scripts/chaos.py [--schedules 1000] [--seed 0] [--parallel 2] [--lease 1]

starts its own fake-gcs-server (in memory) and prints: schedules, duplicates delivered, crashes injected,
merges started, runs without a merge. Exit status 1 if any run got no merge or more than one.
tests/test_chaos.py runs the same harness against the test session's stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import io
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import requests
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from bqx import layout
from bqx.catalog import Column, Manifest, TableEntry
from bqx.config import Settings
from bqx.extract.run import ExtractReport, save_report
from bqx.gcp import storage
from bqx.local import artifacts, gate
from bqx.local.runapi import RunApi, make_handler
from bqx.local.stack import free_port
from bqx.pairs import PAIRS
from bqx.parquet.conventions import KEY_TYPE, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SENDERS = 8
MAX_ATTEMPTS = 10  # the local push subscriptions' dead-letter policy
WORKED = "chaos: this execution does the run's merge"  # what scripts/chaos_job.py prints (it imports nothing heavy)
COLUMNS = (Column("interval_time", "timestamp[us, tz=UTC]"), Column("f000", "double"))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def checkpoint_bytes() -> bytes:
    """A small valid checkpoint for COLUMNS: sorted unique microsecond UTC keys."""
    keys = pa.array([1_700_000_000_000_000 + 60_000_000 * i for i in range(5)], pa.int64()).cast(KEY_TYPE)
    table = pa.table({"interval_time": keys, "f000": pa.array([0.5 * i for i in range(5)], pa.float64())})
    buf = io.BytesIO()
    write_checkpoint(table, buf)
    return buf.getvalue()


def finalize_event(rng: random.Random, bucket: str, name: str, generation: int) -> tuple[dict[str, str], bytes]:
    """One delivery of an object's finalize, in one of the shapes the function gets: Eventarc storage event or a
    GCS notification inside a Pub/Sub push; structured or binary CloudEvent. Returns (headers, body)."""
    if rng.random() < 0.5:
        event = CloudEvent(
            {"type": "google.cloud.storage.object.v1.finalized", "specversion": "1.0",
             "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}", "id": uuid.uuid4().hex,
             "subject": f"objects/{name}"},
            {"bucket": bucket, "name": name, "generation": str(generation)})
    else:
        import base64

        message_id = str(rng.randrange(10**12))
        data = json.dumps({"bucket": bucket, "name": name, "generation": str(generation)}).encode()
        event = CloudEvent(
            {"type": "google.cloud.pubsub.topic.v1.messagePublished", "specversion": "1.0",
             "source": "//pubsub.googleapis.com/projects/bqx-ml/topics/bqx-gcs-events", "id": message_id},
            {"message": {"data": base64.b64encode(data).decode(), "messageId": message_id,
                         "attributes": {"bucketId": bucket, "objectId": name, "objectGeneration": str(generation),
                                        "eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}},
             "subscription": "projects/bqx-ml/subscriptions/bqx-completion-events"})
    headers, body = (to_structured if rng.random() < 0.5 else to_binary)(event)
    return dict(headers), body


@dataclass
class Result:
    seed: int
    run_id: str
    tables: int
    deliveries: int  # first deliveries: one per copy of an event
    duplicates: int  # copies beyond the first per checkpoint
    attempts: int  # every POST, redeliveries included
    redeliveries: int
    dead_letters: int
    crashes: int  # failpoint tokens consumed
    crash_kind: str
    fail_503: int  # 503s the Run API was told to give
    merges: int  # merge executions launched
    seconds: float
    executions: list[str] = field(default_factory=list)
    claim_execution: str | None = None
    claim_to_launch: float = 0.0  # seconds from the winning claim to its recorded launch (must stay < the lease)
    took_over: bool = False
    workers: int = 0  # merge executions that went on to merge (passed their start claim)
    launch_crashes: int = 0  # launch-window failpoint tokens consumed

    @property
    def ok(self) -> bool:
        return self.workers == 1 and self.claim_execution in self.executions


@dataclass
class Totals:
    schedules: int = 0
    deliveries: int = 0
    duplicates: int = 0
    redeliveries: int = 0
    dead_letters: int = 0
    crashes: int = 0
    fail_503: int = 0
    merges: int = 0
    workers: int = 0
    launch_crashes: int = 0
    runs_without_merge: int = 0
    runs_with_extra_merges: int = 0
    takeovers: int = 0
    max_claim_to_launch: float = 0.0
    failed_seeds: list[int] = field(default_factory=list)

    def add(self, r: Result) -> None:
        self.schedules += 1
        self.deliveries += r.deliveries
        self.duplicates += r.duplicates
        self.redeliveries += r.redeliveries
        self.dead_letters += r.dead_letters
        self.crashes += r.crashes
        self.fail_503 += r.fail_503
        self.merges += r.merges
        self.workers += r.workers
        self.launch_crashes += r.launch_crashes
        self.runs_without_merge += r.workers == 0
        self.runs_with_extra_merges += r.workers > 1
        self.takeovers += r.took_over
        self.max_claim_to_launch = max(self.max_claim_to_launch, r.claim_to_launch)
        if not r.ok:
            self.failed_seeds.append(r.seed)

    def lines(self) -> list[str]:
        return [
            f"schedules                 {self.schedules}",
            f"events delivered          {self.deliveries} (+{self.redeliveries} redeliveries, "
            f"{self.dead_letters} dead-lettered)",
            f"duplicates delivered      {self.duplicates}",
            f"crashes injected          {self.crashes} after claiming, {self.launch_crashes} after launching; "
            f"{self.fail_503} Cloud Run 503s",
            f"merge executions launched {self.merges}",
            f"merges that did the work  {self.workers}",
            f"runs without a merge      {self.runs_without_merge}",
            f"runs with >1 merge        {self.runs_with_extra_merges}",
            f"stale claims taken over   {self.takeovers}; slowest claim->launch recorded "
            f"{self.max_claim_to_launch:.3f}s",
        ]


class Harness:
    """A completion server process, a Run API, and the schedules run against them, one after another."""

    def __init__(self, settings: Settings, env: dict[str, str], workdir: Path, lease: float = 1.0,
                 senders: int = SENDERS) -> None:
        self.s, self.env, self.dir, self.lease, self.senders = settings, env, Path(workdir), lease, senders
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens = self.dir / "failpoint"
        self.tokens.mkdir(exist_ok=True)
        self.launch_tokens = self.dir / "failpoint-launch"
        self.launch_tokens.mkdir(exist_ok=True)
        job_env = {k: v for k, v in env.items() if k not in ("BQX_RUN_ID", "VIRTUAL_ENV")}
        job_env.update({"BQX_STAGING_BUCKET": settings.staging_bucket, "BQX_LOG_FORMAT": "json",
                        "PYTHONUNBUFFERED": "1", "BQX_CLAIM_LEASE_SECONDS": str(lease)})
        self.api = RunApi(self.dir / "run-api", {settings.extract_job: ["true"],
                                                 settings.merge_job: [sys.executable, str(REPO / "scripts" /
                                                                                          "chaos_job.py")]},
                          job_env)
        self.api_server: ThreadingHTTPServer | None = None
        self.gate_servers: list[ThreadingHTTPServer] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.payload = checkpoint_bytes()
        self._local = threading.local()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Harness:
        self.api_server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.api))
        self.api_server.daemon_threads = True
        threading.Thread(target=self.api_server.serve_forever, daemon=True).start()
        self.port = free_port()
        source = artifacts.function_source(REPO, "completion", self.dir / "artifact")
        venv = artifacts.function_venv(self.s.cache, source)
        gate_port = free_port()
        gcs_port = int(self.env["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
        self.gate_servers = gate.serve(gate.for_components(self.s, {gate_port: "completion"}, gcs_port,
                                                           self.api_server.server_address[1],
                                                           open(self.dir / "gate.log", "a")))
        env = {**{k: v for k, v in self.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
               "BQX_STAGING_BUCKET": self.s.staging_bucket,
               "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gate_port}",
               "BQX_RUN_API_ENDPOINT": f"http://127.0.0.1:{gate_port}",
               "BQX_CLAIM_LEASE_SECONDS": str(self.lease), "BQX_FAILPOINT_AFTER_CLAIM": str(self.tokens),
               "BQX_FAILPOINT_AFTER_LAUNCH": str(self.launch_tokens),
               "THREADS": "16", "BQX_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        argv = [str(venv / "bin" / "python"), "-m", "functions_framework", "--target", "completion",
                "--source", str(source / "main.py"), "--signature-type", "cloudevent",
                "--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.dir / "completion.log", "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=source)
        deadline = time.time() + 60
        while not port_open(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"completion server did not start; see {self.dir / 'completion.log'}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the gunicorn master and its worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.api_server is not None:
            self.api_server.shutdown()
            self.api_server.server_close()
        for server in self.gate_servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ one schedule
    def _post(self, headers: dict[str, str], body: bytes) -> bool:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            return session.post(f"http://127.0.0.1:{self.port}/", headers=headers, data=body, timeout=60).ok
        except requests.RequestException:  # the instance died under the request: no ack, Pub/Sub retries
            session.close()
            self._local.session = None
            return False

    def _merges(self, run_id: str) -> list[str]:
        with self.api.lock:
            return [e.name for e in self.api.executions.values()
                    if e.job == self.s.merge_job and e.env.get("BQX_RUN_ID") == run_id]

    def _workers(self, run_id: str, timeout: float = 120.0) -> int:
        """The run's merge executions that went on to merge (scripts/chaos_job.py's line in their task logs), once
        every one of them has ended."""
        deadline = time.time() + timeout
        while True:
            with self.api.lock:
                mine = [e for e in self.api.executions.values()
                        if e.job == self.s.merge_job and e.env.get("BQX_RUN_ID") == run_id]
                running = [e.id for e in mine if e.completed is None]
            if not running:
                break
            if time.time() > deadline:
                raise RuntimeError(f"merge executions {running} of run {run_id} still running after {timeout:.0f}s")
            time.sleep(0.05)
        worked = 0
        for e in mine:
            logs = (self.api.home / "logs").glob(f"{e.id}-task*-attempt*.log")
            worked += any(WORKED in p.read_text(errors="replace") for p in logs)
        return worked

    def run_schedule(self, seed: int, crash: str | None = None, fail_503: int | None = None,
                     launch_crash: str | None = None) -> Result:
        """One run, its faults drawn from the seed (or forced: crash and launch_crash 'exit'/'raise'/'', and
        fail_503 >= 0)."""
        rng = random.Random(seed)
        t0 = time.time()
        s, bucket = self.s, self.s.staging_bucket
        pair = rng.choice(PAIRS)
        run_id = f"c{seed:x}-{uuid.uuid4().hex[:8]}"
        tables = [f"targets_{pair}", *[f"mom_{pair}_{i:03d}" for i in range(rng.randint(1, 5))]]
        manifest = Manifest(pair, run_id, tuple(
            TableEntry(t, "targets" if t.startswith("targets") else "feature", COLUMNS,
                       layout.checkpoint(pair, run_id, t)) for t in tables), created_at=time.time())
        storage.write_json(s, bucket, layout.manifest(pair, run_id), manifest.to_json())
        copies = {t.checkpoint: rng.randint(1, 3) for t in manifest.tables}
        copies[layout.extract_report(pair, run_id, 0, 0)] = rng.randint(1, 3)
        crash_kind = ""
        for folder in (self.tokens, self.launch_tokens):  # tokens left by a schedule whose claim never crashed
            for token in os.listdir(folder):
                (folder / token).unlink(missing_ok=True)
        crash_tokens = 0
        draw_crash, draw_kind, draw_two = rng.random() < 0.3, rng.choice(["exit", "raise"]), rng.random() < 0.2
        draw_503 = rng.randint(1, 3) if rng.random() < 0.3 else 0
        if crash if crash is not None else draw_crash:
            crash_kind = crash or draw_kind
            crash_tokens = 2 if draw_two else 1
            for i in range(crash_tokens):
                (self.tokens / f"{crash_kind}-{seed}-{i}").write_text("")
        fail_503 = draw_503 if fail_503 is None else fail_503
        draw_launch, launch_kind = rng.random() < 0.2, rng.choice(["exit", "raise"])
        launch_tokens = 0
        if launch_crash if launch_crash is not None else (draw_launch and not crash_tokens):
            launch_tokens = 1
            (self.launch_tokens / f"{launch_crash or launch_kind}-{seed}").write_text("")
        with self.api.lock:
            self.api.fail_next, self.api.fail_status = fail_503, 503
        interleaved = rng.random() < 0.5  # events flow while later checkpoints are still being written
        order = list(manifest.tables)
        rng.shuffle(order)
        seq = itertools.count()
        heap: list[tuple[float, int, dict[str, str], bytes, int]] = []
        cond = threading.Condition()
        state = {"uploading": True, "inflight": 0, "attempts": 0, "redeliveries": 0, "dead": 0}
        pending: list[tuple[dict[str, str], bytes]] = []

        def publish(items: list[tuple[dict[str, str], bytes]]) -> None:
            with cond:
                for headers, body in items:
                    heapq.heappush(heap, (time.time(), next(seq), headers, body, 1))
                cond.notify_all()

        def upload(entry: TableEntry) -> list[tuple[dict[str, str], bytes]]:
            blob = storage.bucket(s, bucket).blob(entry.checkpoint)
            blob.upload_from_string(self.payload, content_type="application/octet-stream")
            return [finalize_event(rng, bucket, entry.checkpoint, int(blob.generation))
                    for _ in range(copies[entry.checkpoint])]

        def report() -> list[tuple[dict[str, str], bytes]]:
            """What the extract writes after its last checkpoint: its task's report (bqx.extract.run.save_report)."""
            save_report(s, ExtractReport(pair, run_id, task_index=0, task_count=1))
            name = layout.extract_report(pair, run_id, 0, 0)
            blob = storage.bucket(s, bucket).get_blob(name)
            return [finalize_event(rng, bucket, name, int(blob.generation)) for _ in range(copies[name])]

        def sender() -> None:
            while True:
                with cond:
                    while True:
                        if heap and heap[0][0] <= time.time():
                            _, _, headers, body, attempt = heapq.heappop(heap)
                            state["inflight"] += 1
                            break
                        if not heap and not state["uploading"] and not state["inflight"]:
                            cond.notify_all()
                            return
                        cond.wait(max(0.005, heap[0][0] - time.time()) if heap else 0.05)
                ok = self._post(headers, body)
                with cond:
                    state["inflight"] -= 1
                    state["attempts"] += 1
                    if not ok:
                        if attempt >= MAX_ATTEMPTS:
                            state["dead"] += 1
                        else:
                            state["redeliveries"] += 1
                            delay = min(0.1 * 2 ** (attempt - 1), 1.0) * (0.5 + random.random())
                            heapq.heappush(heap, (time.time() + delay, next(seq), headers, body, attempt + 1))
                    cond.notify_all()

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(self.senders)]
        for t in threads:
            t.start()
        if interleaved:
            for entry in order:
                publish(upload(entry))
            publish(report())
        else:
            for entry in order:
                pending.extend(upload(entry))
            pending.extend(report())
            rng.shuffle(pending)
            publish(pending)
        with cond:
            state["uploading"] = False
            cond.notify_all()
        for t in threads:
            t.join()
        with self.api.lock:
            self.api.fail_next = 0
        left = len(os.listdir(self.tokens))
        launch_left = len(os.listdir(self.launch_tokens))
        workers = self._workers(run_id)
        merges = self._merges(run_id)
        claim = storage.read_json(s, bucket, layout.claim(pair, run_id, "merge"))
        body = claim[0] if claim else {}
        deliveries = sum(copies.values())
        return Result(seed, run_id, len(tables), deliveries, deliveries - len(copies), state["attempts"],
                      state["redeliveries"], state["dead"], crash_tokens - left, crash_kind if crash_tokens else "",
                      fail_503, len(merges), round(time.time() - t0, 2), merges, body.get("execution"),
                      round(float(body.get("launched_at") or 0) - float(body.get("claimed_at") or 0), 4)
                      if body.get("launched_at") else 0.0, bool(body.get("took_over_from")), workers,
                      launch_tokens - launch_left)


class ServiceDied(RuntimeError):
    """A service the harness needs exited: the schedules stop at once, with the tail of its log."""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_many(harnesses: list[Harness], seeds: list[int], progress: Any = None,
             services: dict[str, tuple[subprocess.Popen[bytes], Path]] | None = None) -> tuple[Totals, list[Result]]:
    """Run the seeds across the harnesses (each runs its share one schedule at a time). Before each schedule the
    harnesses' completion servers and `services` ({name: (process, log)}) are checked: one that exited stops every
    harness and raises ServiceDied with its log's tail, instead of schedules timing out against a dead server."""
    totals, results, lock = Totals(), [], threading.Lock()
    queue = list(reversed(seeds))
    died: list[str] = []
    watched = dict(services or {})
    for i, h in enumerate(harnesses):
        if h.proc is not None:
            watched[f"completion server {i}"] = (h.proc, h.dir / "completion.log")

    def dead() -> str | None:
        for name, (proc, log) in watched.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}; the end of {log}:\n{_tail(log)}"
        return None

    def worker(h: Harness) -> None:
        while True:
            with lock:
                if not queue or died:
                    return
                why = dead()
                if why:
                    died.append(why)
                    return
                seed = queue.pop()
            r = h.run_schedule(seed)
            with lock:
                totals.add(r)
                results.append(r)
                if progress:
                    progress(totals, r)

    threads = [threading.Thread(target=worker, args=(h,)) for h in harnesses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if died:
        raise ServiceDied(died[0])
    results.sort(key=lambda r: r.seed)
    return totals, results


def start_fake_gcs(port: int, workdir: Path, backend: str = "filesystem") -> subprocess.Popen[bytes]:
    from bqx.local.stack import fake_gcs_binary

    storage_flags = ["-backend", "memory"] if backend == "memory" else [
        "-backend", "filesystem", "-filesystem-root", str(workdir / "gcs")]  # as `bqx stack up` runs it
    proc = subprocess.Popen([str(fake_gcs_binary()), "-host", "127.0.0.1", "-port", str(port), "-scheme", "http",
                             *storage_flags, "-log-level", "warn"],
                            stdout=open(workdir / "gcs.log", "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while not port_open(port):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"fake-gcs-server did not start; see {workdir / 'gcs.log'}")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedules", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="first seed; schedules use seed, seed+1, ...")
    ap.add_argument("--parallel", type=int, default=2, help="independent harnesses (server + Run API) at once")
    ap.add_argument("--lease", type=float, default=1.0, help="BQX_CLAIM_LEASE_SECONDS for the function")
    ap.add_argument("--backend", choices=["memory", "filesystem"], default="filesystem",
                    help="fake-gcs-server storage backend: filesystem, as the local stack runs it (v1.54.0's memory "
                         "backend crashed with 'concurrent map writes' under this load)")
    ap.add_argument("--json", action="store_true", help="print the totals as JSON")
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bqx-chaos-"))
    gcs_port = free_port()
    gcs = start_fake_gcs(gcs_port, workdir, args.backend)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BQX_")}
    env.update({"BQX_LOCAL": "1", "BQX_HOME": str(workdir), "BQX_PROJECT": "bqx-ml", "GOOGLE_CLOUD_PROJECT": "bqx-ml",
                "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}", "NO_GCE_CHECK": "True",
                "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"})
    os.environ.update(env)
    harnesses: list[Harness] = []
    try:
        from bqx.gcp.clients import storage_client

        base = Settings.from_env()
        for i in range(max(1, args.parallel)):
            s = dataclasses.replace(base, staging_bucket=f"chaos-{i}-{uuid.uuid4().hex[:8]}")
            storage_client(s).create_bucket(s.staging_bucket)
            harnesses.append(Harness(s, env, workdir / f"h{i}", lease=args.lease).start())
        t0 = time.time()

        def progress(totals: Totals, r: Result) -> None:
            if totals.schedules % 50 == 0 or not r.ok:
                mark = "" if r.ok else f"  <-- seed {r.seed}: {r.merges} merges"
                print(f"  {totals.schedules:5d} schedules, {time.time() - t0:6.1f}s{mark}", file=sys.stderr,
                      flush=True)

        totals, _ = run_many(harnesses, list(range(args.seed, args.seed + args.schedules)), progress,
                             {"fake-gcs-server": (gcs, workdir / "gcs.log")})
        seconds = time.time() - t0
    finally:
        for h in harnesses:
            h.stop()
        os.killpg(gcs.pid, signal.SIGTERM)
        gcs.wait()
    if totals.failed_seeds:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({**totals.__dict__, "seconds": round(seconds, 1)}))
    else:
        print("\n".join(totals.lines()))
        print(f"wall time                 {seconds:.1f}s ({args.parallel} harnesses, lease {args.lease}s)")
        if totals.failed_seeds:
            print(f"FAILED seeds              {totals.failed_seeds[:20]}")
    return 1 if totals.failed_seeds else 0


if __name__ == "__main__":
    sys.exit(main())
