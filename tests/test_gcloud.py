"""The real gcloud against the local stack (issue 15), with nothing but the environment `bqx stack env` prints: a
Pub/Sub request, a request object copied with `gcloud storage cp`, and an extract started with `gcloud run jobs
execute` each end with a training file, and `gcloud run jobs executions list` shows the executions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from bqx import layout, runs
from bqx.gcp.clients import storage_client
from bqx.local.warehouse import Warehouse

from conftest import SMALL, LocalStack

pytestmark = pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the Google Cloud SDK (gcloud)")

BY_PUBSUB, BY_OBJECT, BY_EXECUTE = "gbpusd", "audusd", "eurusd"
PAIRS = (BY_PUBSUB, BY_OBJECT, BY_EXECUTE)
FEW_TABLES = replace(SMALL, table_scale=0.001)  # one table per family (22, not 35): the emulator pushes every
# checkpoint's event to the completion function one at a time, and that is most of this test's minute


@pytest.fixture(scope="module")
def printed(local_stack: LocalStack) -> str:
    out = subprocess.run([sys.executable, "-m", "bqx.cli", "stack", "env"], env={**os.environ, **local_stack.env},
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def gcloud_env(printed: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A clean environment (no BQX_*, no emulator variables) after `eval "$(bqx stack env)"` in bash."""
    home = tmp_path_factory.mktemp("gcloud-home")
    clean = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "CLOUDSDK_PROXY_PORT": "3128"}
    out = subprocess.run(["bash", "-c", 'eval "$1" && env -0', "bash", printed], env=clean, capture_output=True,
                         timeout=30, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def gcloud(env: dict[str, str], *args: str, cwd: Path | None = None) -> str:
    out = subprocess.run(["gcloud", *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"gcloud {' '.join(args)}:\n{out.stderr[-3000:]}"
    return out.stdout


def test_stack_env_points_gcloud_at_the_local_stack_only(local_stack: LocalStack, gcloud_env: dict[str, str]) -> None:
    s, env = local_stack.settings, gcloud_env
    assert Path(env["CLOUDSDK_CONFIG"]) == s.home / "gcloud"
    assert (Path(env["CLOUDSDK_CONFIG"]) / "gce").read_text() == "False"  # never probes the metadata server
    assert env["CLOUDSDK_CORE_PROJECT"] == s.project and env["CLOUDSDK_RUN_REGION"] == s.region
    assert env["CLOUDSDK_AUTH_DISABLE_CREDENTIALS"] == "true" and env["GCE_METADATA_ROOT"] == "127.0.0.1:9"
    assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB"] == f"http://127.0.0.1:{s.ports.pubsub}/"
    assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE"] == f"http://127.0.0.1:{s.ports.gcs}/storage/v1/"
    assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"] == "http://run.bqx.internal/"
    assert env["http_proxy"] == f"http://127.0.0.1:{s.ports.run_api}" and env["no_proxy"] == "127.0.0.1,localhost"
    assert "CLOUDSDK_PROXY_PORT" not in env  # gcloud's own proxy settings would take every call elsewhere
    assert not [v for v in env.values() if "googleapis.com" in v]


def _generations(local_stack: LocalStack) -> dict[str, int | None]:
    s = local_stack.settings
    bucket = storage_client(s).bucket(s.output_bucket)
    blobs = {p: bucket.get_blob(layout.output(p)) for p in PAIRS}
    return {p: (int(b.generation) if b is not None else None) for p, b in blobs.items()}


def _executions(s) -> set[str]:  # type: ignore[no-untyped-def]
    """Ids of the executions the local Run API knows (its test hook)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{s.ports.run_api}/_admin/executions", timeout=10) as resp:
        return {e["name"].rsplit("/", 1)[-1] for e in json.load(resp)["executions"]}


def test_gcloud_publish_copy_and_execute_each_end_with_a_training_file(
        stack_env: LocalStack, gcloud_env: dict[str, str], tmp_path: Path) -> None:
    s = stack_env.settings
    warehouse = Warehouse(Path(s.warehouse), s.dataset)
    for pair in sorted(set(PAIRS) - set(warehouse.pairs())):
        warehouse.generate(pair, FEW_TABLES)
    before = _generations(stack_env)

    def listed(*flags: str) -> list[dict]:
        return json.loads(gcloud(gcloud_env, "run", "jobs", "executions", "list", "--format=json", *flags))

    def args_of(executions: list[dict], job: str) -> set[str]:
        return {ex["spec"]["template"]["spec"]["containers"][0]["args"][0] for ex in executions
                if ex["metadata"]["labels"]["run.googleapis.com/job"] == job and ex["metadata"]["name"] not in known}

    known = _executions(s)
    t0 = time.time()
    (tmp_path / "request.json").write_text(json.dumps({"pair": BY_OBJECT, "requested_by": "test_gcloud"}))
    with ThreadPoolExecutor(3) as pool:  # three independent requests, at once
        list(pool.map(lambda args: gcloud(gcloud_env, *args, cwd=tmp_path), [
            ("pubsub", "topics", "publish", s.request_topic, f'--message={{"pair":"{BY_PUBSUB}"}}'),
            ("storage", "cp", "request.json", f"gs://{s.staging_bucket}/requests/{BY_OBJECT}.json"),
            ("run", "jobs", "execute", s.extract_job, f"--args={BY_EXECUTE}", f"--region={s.region}"),
        ]))
    t_requested = time.time() - t0

    deadline = time.time() + 90
    while time.time() < deadline:  # polled through the storage client: gcloud costs a second of CPU per call
        now = _generations(stack_env)
        if all(now[p] is not None and now[p] != before[p] for p in PAIRS):
            break
        time.sleep(0.5)
    missing = {p: runs.state(s, p) for p in PAIRS if now[p] is None or now[p] == before[p]}
    assert not missing, {p: (rs.state, rs.run_id, rs.error) for p, rs in missing.items()}
    t_trained = time.time() - t0

    everything = listed(f"--region={s.region}")
    assert args_of(everything, s.extract_job) == set(PAIRS)
    assert args_of(everything, s.merge_job) == set(PAIRS)
    table = gcloud(gcloud_env, "run", "jobs", "executions", "list", f"--job={s.extract_job}")  # CLOUDSDK_RUN_REGION
    rows = {next(w for w in line.split() if w.startswith(f"{s.extract_job}-")): line
            for line in table.splitlines()[1:]}
    assert {ex["metadata"]["name"] for ex in everything if s.extract_job in ex["metadata"]["name"]} <= set(rows)
    assert all(s.region in row and "1 / 1" in row for name, row in rows.items() if name not in known)
    print(f"gcloud: requested in {t_requested:.1f}s, three training files at {t_trained:.1f}s, "
          f"listed at {time.time() - t0:.1f}s")
