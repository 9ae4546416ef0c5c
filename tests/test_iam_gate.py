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

from bqx import layout
from bqx.local import artifacts
from bqx.local.gate import Gate
from bqx.local.iam import Policy, Resource, condition_holds, job_accounts, service_accounts
from bqx.local.stack import deploy_dir, gate_ports, use_free_ports
from bqx.local.terraform import Unsupported

from conftest import REPO, LocalStack, storage_event

PROJECT = "bqx-ml"
TRIGGER = "serviceAccount:bqx-ml-trigger@bqx-ml.iam.gserviceaccount.com"
COMPLETION = "serviceAccount:bqx-ml-completion@bqx-ml.iam.gserviceaccount.com"
EXTRACT = "serviceAccount:bqx-ml-extract@bqx-ml.iam.gserviceaccount.com"
MERGE = "serviceAccount:bqx-ml-merge@bqx-ml.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_terraform({"project": PROJECT})


def obj(bucket: str, name: str) -> Resource:
    return Resource.object(PROJECT, bucket, name)


# ---------------------------------------------------------------- the policy deploy/ declares


def test_components_run_as_the_accounts_deploy_gives_them() -> None:
    assert service_accounts({"project": PROJECT}) == {
        "trigger": "bqx-ml-trigger@bqx-ml.iam.gserviceaccount.com",
        "completion": "bqx-ml-completion@bqx-ml.iam.gserviceaccount.com",
        "extract": "bqx-ml-extract@bqx-ml.iam.gserviceaccount.com",
        "merge": "bqx-ml-merge@bqx-ml.iam.gserviceaccount.com",
    }


def test_policy_grants_what_the_pipeline_needs(policy: Policy) -> None:
    staging, output = "bqx-ml-staging", "bqx-ml-output"
    assert policy.allows(TRIGGER, "storage.objects.create", obj(staging, "runs/eurusd/latest.json"))
    assert policy.allows(TRIGGER, "storage.objects.get", obj(output, "training_eurusd.summary.json"))
    assert policy.allows(TRIGGER, "run.jobs.runWithOverrides", Resource.job(PROJECT, "us-central1", "bqx-ml-extract"))
    assert policy.allows(COMPLETION, "run.jobs.runWithOverrides", Resource.job(PROJECT, "us-central1", "bqx-ml-merge"))
    assert policy.allows(COMPLETION, "storage.objects.update", obj(staging, "checkpoints/eurusd/r1/t.parquet"))
    report = "runs/eurusd/r1/extract/task-0000-attempt-01.json"
    assert policy.allows(EXTRACT, "storage.objects.create", obj(staging, report))
    footers = layout.extract_footers("eurusd", "r1", 0, 1)  # the extract writes its footer index, the merge reads it
    assert policy.allows(EXTRACT, "storage.objects.create", obj(staging, footers))
    assert policy.allows(MERGE, "storage.objects.get", obj(staging, footers))
    assert not policy.allows(MERGE, "storage.objects.create", obj(staging, footers))
    assert policy.allows(EXTRACT, "storage.objects.create", obj(staging, "checkpoints/eurusd/r1/t.parquet"))
    assert policy.allows(MERGE, "storage.objects.create", obj(output, "training_eurusd.parquet"))
    export = "runs/eurusd/r1/bigquery/stage-000-a/part-0.parquet"  # the bigquery method's exports
    assert policy.allows(MERGE, "storage.objects.delete", obj(staging, export))
    assert not policy.allows(EXTRACT, "storage.objects.create", obj(staging, export))
    # the compose merge's footer, parts and composed file: the merge's to create and delete, not the extract's
    for piece in (layout.compose_footer("eurusd", "r1"), layout.compose_part("eurusd", "r1", 1, 3),
                  layout.compose_output("eurusd", "r1")):
        assert policy.allows(MERGE, "storage.objects.create", obj(staging, piece)), piece
        assert policy.allows(MERGE, "storage.objects.delete", obj(staging, piece)), piece
        assert not policy.allows(EXTRACT, "storage.objects.create", obj(staging, piece)), piece
    for member in (COMPLETION, EXTRACT, MERGE):
        assert policy.allows(member, "storage.objects.list", Resource.bucket(PROJECT, staging))


def test_policy_refuses_what_deploy_does_not_grant(policy: Policy) -> None:
    # the functions may read run summaries in the output bucket, not the training files, and write nothing there
    assert not policy.allows(TRIGGER, "storage.objects.get", obj("bqx-ml-output", "training_eurusd.parquet"))
    assert not policy.allows(TRIGGER, "storage.objects.create", obj("bqx-ml-output", "training_eurusd.summary.json"))
    assert not policy.allows(TRIGGER, "run.jobs.run", Resource.job(PROJECT, "us-central1", "another-job"))
    assert not policy.allows(MERGE, "run.jobs.run", Resource.job(PROJECT, "us-central1", "bqx-ml-merge"))
    assert not policy.allows(MERGE, "storage.buckets.get", Resource.bucket(PROJECT, "bqx-ml-staging"))
    assert not policy.allows(TRIGGER, "storage.objects.get", obj("another-bucket", "x"))


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
    assert "bqx-ml-trigger@" in str(denied.value) and "storage.objects.get" in str(denied.value)
    with pytest.raises(gexc.Forbidden):
        trigger.bucket(s.output_bucket).blob("training_gatecheck.summary.json").upload_from_string(b"{}")
    # overwriting needs storage.objects.delete besides create: the merge has both on its own run state
    blob = merge.bucket(s.staging_bucket).blob("runs/gatecheck/r1/merge-progress.json")
    blob.upload_from_string(b"1")
    blob.upload_from_string(b"2")
    assert blob.download_as_bytes() == b"2"
    log = (s.home / "stack" / "gate.log").read_text()
    assert '"permission": "storage.objects.get"' in log and "training_gatecheck.parquet" in log


def test_download_links_lead_back_through_the_callers_gate(stack_env: LocalStack) -> None:
    """An object's resource names its download URL (mediaLink), which the client follows for an object it listed
    or got: it must lead through the caller's gate port (where storage.objects.get is checked), not straight to
    fake-gcs-server, which would let a component read what deploy/ does not let it read."""
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    merge, trigger = _client(ports["merge"]), _client(ports["trigger"])
    # an object's own bytes are never rewritten, even JSON that names fake-gcs-server's address
    content = json.dumps({"error": f"upstream http://127.0.0.1:{s.ports.gcs}/storage/v1/b refused"}).encode()
    merge.bucket(s.output_bucket).blob("training_linkcheck.summary.json").upload_from_string(
        content, content_type="application/json")
    merge.bucket(s.output_bucket).blob("training_linkcheck.parquet").upload_from_string(b"x")
    got = trigger.bucket(s.output_bucket).get_blob("training_linkcheck.summary.json")
    assert got.media_link.startswith(f"http://127.0.0.1:{ports['trigger']}/download/"), got.media_link
    assert got.download_as_bytes() == content
    assert trigger.bucket(s.output_bucket).blob("training_linkcheck.summary.json").download_as_bytes() == content
    listed = list(merge.list_blobs(s.output_bucket, prefix="training_linkcheck"))
    assert len(listed) == 2 and all(b.media_link.startswith(f"http://127.0.0.1:{ports['merge']}/") for b in listed)
    # the trigger following the merge's link to the file it may not read is refused like any other way in
    link = next(b.media_link for b in listed if b.name.endswith(".parquet")).replace(
        f":{ports['merge']}/", f":{ports['trigger']}/")
    assert requests.get(link, timeout=10).status_code == 403


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


# ---------------------------------------------------------------- issue 17, item 12: one account per component


def _forbidden(client: storage.Client, bucket: str, name: str, data: bytes = b"x") -> str:
    """The 403 GCS answers `client` for writing `name`; fails if the write goes through."""
    with pytest.raises(gexc.Forbidden) as denied:
        client.bucket(bucket).blob(name).upload_from_string(data)
    return str(denied.value)


def test_item12_trigger_cannot_overwrite_checkpoints(stack_env: LocalStack) -> None:
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    extract, trigger = _client(ports["extract"]), _client(ports["trigger"])
    # under a pair no test runs, so the session stack's own runs never see these objects
    run = f"runs/item12/r{time.time_ns()}/"
    checkpoint = f"checkpoints/item12/r{time.time_ns()}/agg_eurusd_w45.parquet"
    for name in (checkpoint, run + "manifest.json"):
        extract.bucket(s.staging_bucket).blob(name).upload_from_string(b"extract's")
        message = _forbidden(trigger, s.staging_bucket, name)
        assert "bqx-ml-trigger@" in message and "storage.objects." in message
        assert extract.bucket(s.staging_bucket).blob(name).download_as_bytes() == b"extract's"
    _forbidden(trigger, s.staging_bucket, checkpoint.replace("agg_", "new_"))  # nor create one
    # what it does write is still its own: the pair's pointer (swapped) and the run's extract claim
    for name in ("runs/item12/latest.json", run + "extract.claim"):
        blob = trigger.bucket(s.staging_bucket).blob(name)
        blob.upload_from_string(b"1")
        blob.upload_from_string(b"2")
        assert blob.download_as_bytes() == b"2"


def test_item12_merge_only_account_writes_output(stack_env: LocalStack) -> None:
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    name = f"training_item12{time.time_ns()}.parquet"
    for component in ("trigger", "completion", "extract"):
        message = _forbidden(_client(ports[component]), s.output_bucket, name)
        assert f"bqx-ml-{component}@" in message and "storage.objects.create" in message
    merge = _client(ports["merge"]).bucket(s.output_bucket).blob(name)
    merge.upload_from_string(b"merged")
    assert merge.download_as_bytes() == b"merged"


def test_item12_extract_cannot_write_output(stack_env: LocalStack) -> None:
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    merge, extract = _client(ports["merge"]), _client(ports["extract"])
    summary = "training_item12x.summary.json"
    merge.bucket(s.output_bucket).blob(summary).upload_from_string(b"{}")
    for name in ("training_item12x.parquet", summary, "tmp/item12/training_item12x.parquet"):
        assert "bqx-ml-extract@" in _forbidden(extract, s.output_bucket, name)
    # it reads the published summary (to reuse checkpoints), and nothing else there
    assert extract.bucket(s.output_bucket).blob(summary).download_as_bytes() == b"{}"
    merge.bucket(s.output_bucket).blob("training_item12x.parquet").upload_from_string(b"x")
    with pytest.raises(gexc.Forbidden):
        extract.bucket(s.output_bucket).blob("training_item12x.parquet").download_as_bytes()
    # nor the merge's state in staging: its claim (which decides who merges)
    _forbidden(extract, s.staging_bucket, f"runs/item12/r{time.time_ns()}/merge.claim")


def test_item12_completion_marks_checkpoints_but_cannot_write_one(stack_env: LocalStack) -> None:
    s, ports = stack_env.settings, gate_ports(stack_env.settings)
    extract, completion = _client(ports["extract"]), _client(ports["completion"])
    name = f"checkpoints/item12/r{time.time_ns()}/agg_eurusd_w45.parquet"
    extract.bucket(s.staging_bucket).blob(name).upload_from_string(b"extract's")
    assert "bqx-ml-completion@" in _forbidden(completion, s.staging_bucket, name)  # no overwrite
    _forbidden(completion, s.staging_bucket, name.replace("agg_", "new_"))  # no create
    blob = completion.bucket(s.staging_bucket).get_blob(name)
    blob.metadata = {"bqx_validated": "1"}
    blob.patch()  # the validation mark: a metadata update
    assert completion.bucket(s.staging_bucket).get_blob(name).metadata == {"bqx_validated": "1"}
    _forbidden(completion, s.staging_bucket, name.replace("checkpoints/", "runs/").replace(
        "agg_eurusd_w45.parquet", "manifest.json"))


def test_item12_each_function_starts_only_its_own_job(stack_env: LocalStack) -> None:
    ports = gate_ports(stack_env.settings)
    body = {"overrides": {"containerOverrides": [{"args": ["eurusd"]}]}}
    for component, job in (("trigger", "bqx-ml-merge"), ("completion", "bqx-ml-extract")):
        refused = requests.post(f"http://127.0.0.1:{ports[component]}/v2/projects/{PROJECT}/locations/us-central1/"
                                f"jobs/{job}:run", json=body, timeout=10)
        assert refused.status_code == 403, (component, job)
        assert "run.jobs.run" in refused.json()["error"]["message"]


def test_item12_starting_a_job_acts_as_that_jobs_account_only(policy: Policy) -> None:
    gate = Gate(policy, {}, 0, 0, PROJECT, "us-central1", job_accounts=job_accounts({"project": PROJECT}))
    body = json.dumps({"overrides": {"containerOverrides": [{"args": ["eurusd"]}]}}).encode()
    _, needs = gate.needs("POST", f"/v2/projects/{PROJECT}/locations/us-central1/jobs/bqx-ml-merge:run", {}, body,
                          lambda *_: False)
    act_as = [n for n in needs if n.permission == "iam.serviceAccounts.actAs"]
    assert [n.resource.name for n in act_as] == [
        f"projects/{PROJECT}/serviceAccounts/bqx-ml-merge@bqx-ml.iam.gserviceaccount.com"]
    assert policy.allows(COMPLETION, "iam.serviceAccounts.actAs", act_as[0].resource)
    assert not policy.allows(TRIGGER, "iam.serviceAccounts.actAs", act_as[0].resource)
    extract_account = Resource.service_account(PROJECT, "bqx-ml-extract@bqx-ml.iam.gserviceaccount.com")
    assert policy.allows(TRIGGER, "iam.serviceAccounts.actAs", extract_account)
    assert not policy.allows(COMPLETION, "iam.serviceAccounts.actAs", extract_account)


def test_stack_up_says_who_each_service_runs_as(local_stack: LocalStack) -> None:
    lines: list[str] = []
    local_stack.stack.up(progress=lines.append)  # already up: only reports
    text = "\n".join(lines)
    assert "trigger    up on" in text and "as bqx-ml-trigger@bqx-ml.iam.gserviceaccount.com" in text
    assert "merge reaches GCS and the Run API through the IAM gate" in text
    assert "as bqx-ml-merge@bqx-ml.iam.gserviceaccount.com" in text


# ---------------------------------------------------------------- a missing grant fails a whole run


def _without(deploy: Path, resource: str) -> None:
    """Remove one `resource "type" "name" { ... }` block from the Terraform copy in `deploy`."""
    path = deploy / "iam.tf"
    text = path.read_text()
    start = text.index(resource)
    end = text.index("\n}\n", start) + 3
    path.write_text(text[:start] + text[end:])


REMOVED = {
    # the merge's account loses the output bucket: writing the training file fails the run with GCS's 403
    "merge_output": ('resource "google_storage_bucket_iam_member" "merge_output"', ("merge",),
                     "storage.objects.", "/buckets/bqx-ml-output/"),
    # the completion function may no longer start the merge: Cloud Run's 403, recorded as the run's failure
    "completion_launch_merge": ('resource "google_cloud_run_v2_job_iam_member" "completion_launch_merge"',
                                ("completion",), "run.jobs.run", "/jobs/bqx-ml-merge"),
    # ... nor act as the merge's account, which Cloud Run checks when an execution starts
    "completion_act_as_merge": ('resource "google_service_account_iam_member" "completion_act_as_merge"',
                                ("completion",), "iam.serviceAccounts.actAs", "/serviceAccounts/bqx-ml-merge@"),
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
