"""The local stack runs what deploys, as whom it deploys (bqx.local.artifacts, bqx.local.iam, bqx.local.gate).

- deploy/iam.tf, read as a policy, grants what the pipeline needs and nothing the tests below show it must not.
- Through the session stack's IAM gate, each component's calls succeed or get GCS's and Cloud Run's own 403.
- A whole run fails when one binding is removed from a copy of deploy/.
- A function packaged without a dependency it imports fails the way the deployed function would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from bqx.local import artifacts
from bqx.local.iam import Policy, Resource, condition_holds, service_accounts
from bqx.local.stack import deploy_dir, gate_ports, use_free_ports
from bqx.local.terraform import Unsupported

from conftest import REPO, LocalStack, storage_event

PROJECT = "bqx-ml"
FUNCTIONS = "serviceAccount:bqx-ml-functions@bqx-ml.iam.gserviceaccount.com"
JOBS = "serviceAccount:bqx-ml-pipeline@bqx-ml.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_terraform({"project": PROJECT})


def obj(bucket: str, name: str) -> Resource:
    return Resource.object(PROJECT, bucket, name)


# ---------------------------------------------------------------- the policy deploy/ declares


def test_components_run_as_the_accounts_deploy_gives_them() -> None:
    assert service_accounts({"project": PROJECT}) == {
        "trigger": "bqx-ml-functions@bqx-ml.iam.gserviceaccount.com",
        "completion": "bqx-ml-functions@bqx-ml.iam.gserviceaccount.com",
        "extract": "bqx-ml-pipeline@bqx-ml.iam.gserviceaccount.com",
        "merge": "bqx-ml-pipeline@bqx-ml.iam.gserviceaccount.com",
    }


def test_policy_grants_what_the_pipeline_needs(policy: Policy) -> None:
    assert policy.allows(FUNCTIONS, "storage.objects.create", obj("bqx-ml-staging", "runs/eurusd/latest.json"))
    assert policy.allows(FUNCTIONS, "storage.objects.get", obj("bqx-ml-output", "training_eurusd.summary.json"))
    for job in ("bqx-ml-extract", "bqx-ml-merge"):
        assert policy.allows(FUNCTIONS, "run.jobs.runWithOverrides", Resource.job(PROJECT, "us-central1", job))
    assert policy.allows(JOBS, "storage.objects.create", obj("bqx-ml-output", "training_eurusd.parquet"))
    assert policy.allows(JOBS, "storage.objects.list", Resource.bucket(PROJECT, "bqx-ml-staging"))


def test_policy_refuses_what_deploy_does_not_grant(policy: Policy) -> None:
    # the functions may read run summaries in the output bucket, not the training files, and write nothing there
    assert not policy.allows(FUNCTIONS, "storage.objects.get", obj("bqx-ml-output", "training_eurusd.parquet"))
    assert not policy.allows(FUNCTIONS, "storage.objects.create", obj("bqx-ml-output", "training_eurusd.summary.json"))
    assert not policy.allows(FUNCTIONS, "run.jobs.run", Resource.job(PROJECT, "us-central1", "another-job"))
    assert not policy.allows(JOBS, "run.jobs.run", Resource.job(PROJECT, "us-central1", "bqx-ml-merge"))
    assert not policy.allows(JOBS, "storage.buckets.get", Resource.bucket(PROJECT, "bqx-ml-staging"))
    assert not policy.allows(FUNCTIONS, "storage.objects.get", obj("another-bucket", "x"))


def test_iam_conditions_are_read_or_refused() -> None:
    name = "projects/_/buckets/b/objects/training_eurusd.summary.json"
    assert condition_holds('resource.name.startsWith("projects/_/buckets/b/objects/training_") && '
                           'resource.name.endsWith(".summary.json")', name)
    assert not condition_holds('resource.name.startsWith("projects/_/buckets/b/objects/x") || '
                               f'!(resource.name == "{name}")', name)
    assert condition_holds('(resource.name != "other") && !resource.name.endsWith(".parquet")', name)
    with pytest.raises(Unsupported):
        condition_holds('request.time < timestamp("2030-01-01T00:00:00Z")', name)  # cannot read: never grants


# ---------------------------------------------------------------- through the session stack's gate


def _client(port: int) -> storage.Client:
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


def test_gate_answers_as_gcs_would(stack_env: LocalStack) -> None:
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    trigger, merge = _client(ports["trigger"]), _client(ports["merge"])
    merge.bucket(s.output_bucket).blob("training_gatecheck.summary.json").upload_from_string(b"{}")
    merge.bucket(s.output_bucket).blob("training_gatecheck.parquet").upload_from_string(b"x")
    # the trigger reads a summary (what "already running" needs) ...
    assert trigger.bucket(s.output_bucket).blob("training_gatecheck.summary.json").download_as_bytes() == b"{}"
    # ... and nothing else in the output bucket, with GCS's own 403
    with pytest.raises(gexc.Forbidden) as denied:
        trigger.bucket(s.output_bucket).blob("training_gatecheck.parquet").download_as_bytes()
    assert "bqx-ml-functions@" in str(denied.value) and "storage.objects.get" in str(denied.value)
    with pytest.raises(gexc.Forbidden):
        trigger.bucket(s.output_bucket).blob("training_gatecheck.summary.json").upload_from_string(b"{}")
    # overwriting needs storage.objects.delete besides create: the jobs have both on staging
    blob = merge.bucket(s.staging_bucket).blob("runs/gatecheck/x.json")
    blob.upload_from_string(b"1")
    blob.upload_from_string(b"2")
    assert blob.download_as_bytes() == b"2"
    log = (s.home / "stack" / "gate.log").read_text()
    assert '"permission": "storage.objects.get"' in log and "training_gatecheck.parquet" in log


def test_gate_refuses_a_job_deploy_does_not_let_the_functions_start(stack_env: LocalStack) -> None:
    port = gate_ports(stack_env.settings)["completion"]
    body = {"overrides": {"containerOverrides": [{"args": ["eurusd"]}]}}
    url = f"http://127.0.0.1:{port}/v2/projects/{PROJECT}/locations/us-central1/jobs"
    refused = requests.post(f"{url}/another-job:run", json=body, timeout=10)
    assert refused.status_code == 403
    assert refused.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "run.jobs.run" in refused.json()["error"]["message"]
    # the jobs' account may not start jobs at all
    port = gate_ports(stack_env.settings)["merge"]
    refused = requests.post(f"http://127.0.0.1:{port}/v2/projects/{PROJECT}/locations/us-central1/jobs/"
                            "bqx-ml-merge:run", json=body, timeout=10)
    assert refused.status_code == 403


def test_stack_up_says_who_each_service_runs_as(local_stack: LocalStack) -> None:
    lines: list[str] = []
    local_stack.stack.up(progress=lines.append)  # already up: only reports
    text = "\n".join(lines)
    assert "trigger    up on" in text and "as bqx-ml-functions@bqx-ml.iam.gserviceaccount.com" in text
    assert "merge reaches GCS and the Run API through the IAM gate" in text
    assert "as bqx-ml-pipeline@bqx-ml.iam.gserviceaccount.com" in text


# ---------------------------------------------------------------- a missing grant fails a whole run


def _without(deploy: Path, resource: str) -> None:
    """Remove one `resource "type" "name" { ... }` block from the Terraform copy in `deploy`."""
    path = deploy / "iam.tf"
    text = path.read_text()
    start = text.index(resource)
    end = text.index("\n}\n", start) + 3
    path.write_text(text[:start] + text[end:])


REMOVED = {
    # the jobs' account loses the output bucket: the first job to touch it (the extract reads the published summary
    # to reuse checkpoints; the merge writes the file) fails the run with GCS's 403
    "jobs_output": ('resource "google_storage_bucket_iam_member" "jobs_output"', ("extract", "merge"),
                    "storage.objects.", "/buckets/bqx-ml-output/"),
    # the functions may no longer start the merge: Cloud Run's 403, recorded as the run's failure (not "merging")
    "functions_launch_merge": ('resource "google_cloud_run_v2_job_iam_member" "functions_launch_merge"',
                               ("completion",), "run.jobs.run", "/jobs/bqx-ml-merge"),
}


@pytest.mark.stack
@pytest.mark.parametrize("binding", sorted(REMOVED))
def test_a_run_fails_when_one_binding_is_removed(local_stack: LocalStack, tmp_path: Path, binding: str) -> None:
    resource, components, permission, on = REMOVED[binding]
    deploy = tmp_path / "deploy"
    shutil.copytree(deploy_dir(local_stack.settings), deploy)
    _without(deploy, resource)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(local_stack.settings.warehouse, home / "warehouse.duckdb")
    use_free_ports()
    env = {**os.environ, "BQX_LOCAL": "1", "BQX_HOME": str(home), "BQX_DEPLOY_DIR": str(deploy),
           "BQX_CLAIM_LEASE_SECONDS": "5"}
    env = {k: v for k, v in env.items() if k not in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST",
                                                     "BQX_RUN_API_ENDPOINT", "BQX_WAREHOUSE")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("BQX_PORT_")})
    cli = [sys.executable, "-m", "bqx.cli"]
    try:
        up = subprocess.run([*cli, "stack", "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        run = subprocess.run([*cli, "run", "eurusd", "--timeout", "150"], env=env, capture_output=True, text=True,
                             timeout=240, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([*cli, "stack", "down"], env=env, capture_output=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "FAILED in" in out and "403" in out and permission in out, out  # the cause, where bqx run shows it
    log = (home / "stack" / "gate.log").read_text()
    denied = [json.loads(line) for line in log.splitlines() if '"permission denied"' in line]
    assert any(d["component"] in components and d["permission"].startswith(permission) and on in d["resource"]
               for d in denied), denied


# ---------------------------------------------------------------- a missing dependency fails the function


def test_a_function_packaged_without_a_dependency_it_imports_fails(stack_env: LocalStack, tmp_path: Path) -> None:
    pins = (REPO / "deploy" / "functions-requirements.txt").read_text().splitlines()
    short = tmp_path / "requirements.txt"
    short.write_text("\n".join(p for p in pins if not p.startswith(("pyarrow==", "numpy=="))) + "\n")
    source = artifacts.function_source(REPO, "completion", tmp_path / "fn", short)
    venv = artifacts.function_venv(stack_env.settings.cache, source)
    from bqx.local.stack import free_port

    port = free_port()
    log = open(tmp_path / "fn.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([str(venv / "bin" / "python"), "-m", "functions_framework", "--target", "completion",
                             "--source", str(source / "main.py"), "--signature-type", "cloudevent",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=source, stdout=log, stderr=subprocess.STDOUT)
    try:
        from cloudevents.conversion import to_structured

        event = storage_event(stack_env.settings.staging_bucket, "checkpoints/eurusd/r0000000000000000/x.parquet", 1)
        headers, body = to_structured(event)
        deadline = time.time() + 60
        while True:
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/", data=body, headers=headers, timeout=30)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "fn.log").read_text()
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(10)
    assert reply.status_code == 500  # redelivered forever in the cloud: no merge would ever start
    assert "No module named 'numpy'" in (tmp_path / "fn.log").read_text() or \
        "No module named 'pyarrow'" in (tmp_path / "fn.log").read_text()


# ---------------------------------------------------------------- an env override cannot load code into a job


def test_job_command_ignores_interpreter_variables(local_stack: LocalStack, tmp_path: Path) -> None:
    runtime = local_stack.stack.build()
    plant = tmp_path / "plant"
    plant.mkdir()
    marker = tmp_path / "ran"
    (plant / "bqxplant.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass W(Warning):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(plant), "PYTHONWARNINGS": "ignore::bqxplant.W"}
    argv = artifacts.job_command(REPO, runtime.job_app, "extract", runtime.job_venv / "bin" / "python")
    assert argv[1:4] == ["-I", "-u", "-B"]  # jobs/Dockerfile's ENTRYPOINT, as the stack runs it
    # the control: the same interpreter without the image's flags imports the planted module at start-up
    subprocess.run([argv[0], "-c", "pass"], env=env, timeout=60, capture_output=True)
    assert marker.exists()
    marker.unlink()
    proc = subprocess.run([*argv, "notapair"], env=env, capture_output=True, text=True, timeout=60)
    assert "notapair" in proc.stdout + proc.stderr  # the job ran and refused the pair ...
    assert not marker.exists()  # ... and the override loaded nothing
