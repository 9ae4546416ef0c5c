#!/usr/bin/env python
"""The long fault-injection run (issue 7): many seeded kill points and restarts, against a local stack of its own.

    python scripts/faults.py [--extract-kills 24] [--merge-kills 10] [--restarts 1] [--json]

1. Kill the extract job (SIGKILL) at seeded points — after k checkpoints or after a delay — rerun it, and compare
   every checkpoint's md5 with an uninterrupted run of the same run id; deliver every finalize event twice,
   shuffled, to the real completion function and count the merges it starts (must be exactly 1 per run).
2. Kill the merge job at seeded delays while polling the final object: it must never be visible half-written;
   rerun, compare the content and the sha256 with an uninterrupted merge.
3. Restart fake-gcs-server and the Pub/Sub emulator mid-run, and make the Cloud Run API answer 503 (then delay
   past the client's timeout) on the launches: the run must end done with one merge, or stuck/failed with a
   stage-level reason — never silently wrong.
It starts everything on free ports under a temporary BQX_HOME and stops it all at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_faults as tf  # noqa: E402  (the scenarios are shared with the CI tests)

from bqx import serving  # noqa: E402
from bqx.config import Settings  # noqa: E402
from bqx.gcp import clients  # noqa: E402
from bqx.local.runapi import RunApi, make_handler  # noqa: E402


def counting_run_api(home: Path) -> tuple[RunApi, ThreadingHTTPServer]:
    """A Cloud Run API whose jobs do nothing: the completion function's launches are counted, not run."""
    api = RunApi(home, {"bqx-ml-extract": ["true"], "bqx-ml-merge": ["true"]}, dict(os.environ))
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return api, server


def extract_kills(s: Settings, n: int, out: list[dict[str, Any]], log: Any) -> None:
    base = tf.with_bucket(s, staging=tf.new_bucket(s))
    run_id = "k" + uuid.uuid4().hex[:12]
    assert tf.run_job_to_end("extract", tf.job_env(base, run_id)) == 0
    baseline = tf.checkpoint_digests(base, base.staging_bucket, run_id)
    home = Path(tempfile.mkdtemp(prefix="bqx-faults-api-"))
    for seed in range(1, n + 1):
        api, server = counting_run_api(home / str(seed))
        os.environ["BQX_RUN_API_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        os.environ["BQX_STAGING_BUCKET"] = tf.new_bucket(s)
        serving.settings.cache_clear()
        clients.jobs_client.cache_clear()
        si = Settings.from_env()
        t0 = time.time()
        r = tf.kill_extract_scenario(si, seed, baseline, run_id, len(baseline))
        codes = tf.deliver_all(si, run_id, tf.completion_client(), random.Random(seed), repeats=2)
        r.update(events=len(codes), acked=codes.count(200), merges=tf.merges(api, run_id),
                 seconds=round(time.time() - t0, 1))
        server.shutdown()
        server.server_close()
        out.append(r)
        log(f"extract kill {seed:2d}: {r['point']:22s} at-kill={r['checkpoints_at_kill']:3d} "
            f"identical={r['identical']} merges={r['merges']} events={r['events']} ({r['seconds']}s)")


def merge_kills(s: Settings, n: int, out: list[dict[str, Any]], log: Any) -> None:
    base = tf.with_bucket(s, staging=tf.new_bucket(s), output=tf.new_bucket(s, "o"))
    run_id = "k" + uuid.uuid4().hex[:12]
    assert tf.run_job_to_end("extract", tf.job_env(base, run_id)) == 0
    tf.validate_run(base, run_id)  # as the completion function does: the merge publishes only validated checkpoints
    assert tf.run_job_to_end("merge", tf.job_env(base, run_id)) == 0
    sha = tf.sha256_of(base, base.output_bucket, "training_eurusd.parquet")
    want = tf.read_output(base, base.output_bucket)
    for seed in range(1, n + 1):
        t0 = time.time()
        r = tf.kill_merge_scenario(base, seed, run_id, sha or "", want)
        r["seconds"] = round(time.time() - t0, 1)
        out.append(r)
        log(f"merge kill {seed:2d}: after {r['delay']:.2f}s finished_first={r['finished_before_kill']} "
            f"partial_seen={r['partial_seen']} same_content={r['same_content']} same_sha256={r['same_sha256']}")


def slow_for(s: Settings, delay: float, seconds: float) -> None:
    """Every launch takes `delay` (past run_job's 30 s timeout) for `seconds`, then back to normal."""
    tf.faults_post(s, {"fail_next": 0, "delay": delay})

    def back_to_normal() -> None:
        try:
            tf.faults_post(s, {"fail_next": 0, "delay": 0.0})
        except OSError:
            pass  # the plan ended first and its stack is down: nothing left to slow

    timer = threading.Timer(seconds, back_to_normal)
    timer.daemon = True
    timer.start()


def restarts(tmp: Path, rounds: int, out: list[dict[str, Any]], log: Any) -> None:
    stack, s, env = tf.own_stack(tmp / "stack-home")
    try:
        plans = [
            ("cloud run 503 x3 on the extract launch", lambda: None, {"fail_next": 3, "status": 503}),
            ("fake-gcs-server restart (1 s down)", lambda: tf.restart(stack, "gcs", 1.0), None),
            ("pubsub emulator restart (1 s down)", lambda: tf.restart(stack, "pubsub", 1.0), None),
            ("fake-gcs-server restart (5 s down)", lambda: tf.restart(stack, "gcs", 5.0), None),
            ("cloud run 503 x6 mid-run (merge launch)",
             lambda: tf.faults_post(s, {"fail_next": 6, "status": 503}), None),
            ("cloud run slower than the client's 30 s timeout for 40 s", lambda: slow_for(s, 31.0, 40.0), None),
        ]
        for r_ in range(rounds):
            for name, disruption, upfront in plans:
                if upfront:
                    tf.faults_post(s, upfront)
                t0 = time.time()
                when = 3 + (r_ * 7 + len(name)) % 20
                r = tf.disrupted_run(stack, s, env, disruption, when_checkpoints=when, timeout=240)
                tf.faults_post(s, {"fail_next": 0, "delay": 0.0})
                r.update(fault=name, seconds=round(time.time() - t0, 1))
                out.append(r)
                log(f"{name:55s} -> {r['state']:10s} merges={r['merges']} {r['present']}/{r['expected']} "
                    f"({r['seconds']}s){' error: ' + str(r['error'].get('error'))[:80] if r['error'] else ''}")
    finally:
        stack.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extract-kills", type=int, default=24)
    ap.add_argument("--merge-kills", type=int, default=10)
    ap.add_argument("--restarts", type=int, default=1, help="rounds of the restart/503 plan")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    tmp = Path(tempfile.mkdtemp(prefix="bqx-faults-"))
    started = time.time()
    report: dict[str, Any] = {"extract_kills": [], "merge_kills": [], "restarts": []}
    stack, s, _ = tf.own_stack(tmp / "home")
    try:
        extract_kills(s, args.extract_kills, report["extract_kills"], log)
        merge_kills(s, args.merge_kills, report["merge_kills"], log)
    finally:
        stack.down()
    if args.restarts:
        restarts(tmp, args.restarts, report["restarts"], log)
    ek, mk, rs = report["extract_kills"], report["merge_kills"], report["restarts"]
    summary = {
        "extract_kills": len(ek),
        "extract_killed_mid_run": sum(not r["finished_before_kill"] for r in ek),
        "extract_reruns_ok": sum(r["rerun_exit"] == 0 for r in ek),
        "extract_identical_checkpoints": sum(r["identical"] for r in ek),
        "extract_exactly_one_merge": sum(r["merges"] == 1 for r in ek),
        "extract_events_delivered": sum(r["events"] for r in ek),
        "extract_events_acked": sum(r["acked"] for r in ek),
        "merge_kills": len(mk),
        "merge_killed_mid_run": sum(not r["finished_before_kill"] for r in mk),
        "merge_partial_outputs_seen": sum(r["partial_seen"] for r in mk),
        "merge_reruns_same_content": sum(bool(r["same_content"]) for r in mk),
        "merge_reruns_same_sha256": sum(r["same_sha256"] for r in mk),
        "restarts": len(rs),
        "restarts_done_one_merge": sum(r["state"] == "done" and r["merges"] == 1 for r in rs),
        "restarts_not_done": [{"fault": r["fault"], "state": r["state"], "error": r["error"]}
                              for r in rs if r["state"] != "done"],
        "restarts_wrong": sum(r["merges"] > 1 or (r["state"] == "done" and r["merges"] != 1) for r in rs),
        "seconds": round(time.time() - started, 1),
    }
    report["summary"] = summary
    print(json.dumps(report if args.json else summary, indent=1, default=str))
    ok = (summary["extract_identical_checkpoints"] == len(ek) and summary["extract_exactly_one_merge"] == len(ek)
          and summary["merge_partial_outputs_seen"] == 0 and summary["merge_reruns_same_content"] == len(mk)
          and summary["restarts_wrong"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
