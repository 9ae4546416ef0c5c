"""Static checks of the Google Cloud deployment (deploy/*.tf, deploy/names.json, jobs/Dockerfile, function packaging).

No cloud access: the Terraform is parsed with python-hcl2 and its expressions evaluated by bqx.local.terraform, which
understands the subset deploy/ uses (references, coalesce/merge/tostring/upper, jsondecode(file(names.json)), object
literals, templates). Anything outside that subset fails loudly rather than being skipped, so a check cannot pass by
not looking. Resource attributes known only after apply evaluate to Ref("type.name.attr").
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from bqx import events
from bqx.config import Settings, parse_bytes
from bqx.local.terraform import Evaluator, Ref, deploy_texts, load_tf
from bqx.pairs import PAIRS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMES = json.loads((DEPLOY / "names.json").read_text())

# ---------------------------------------------------------------------------------------------- the Terraform


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return load_tf(deploy_texts())


@pytest.fixture(scope="module")
def ev(tf: dict[str, Any]) -> Evaluator:
    return Evaluator(tf, {"project": "my-proj"})


def resources(tf: dict[str, Any], rtype: str) -> dict[str, Any]:
    return tf["resource"].get(rtype, {})


def one(blocks: Any) -> Any:
    assert isinstance(blocks, list) and len(blocks) == 1, blocks
    return blocks[0]


def dynamic_env(ev: Evaluator, container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        env[ev.value(entry["name"])] = ev.value(entry["value"])
    for dyn in container.get("dynamic", []):
        for label, body in dyn.items():
            assert label == "env", f"unexpected dynamic block {label}"
            content = one(body["content"])
            assert (content["name"], content["value"]) == ("${env.key}", "${env.value}")
            env.update(ev.value(body["for_each"]))
    return env


# ---------------------------------------------------------------------------------------------- names.json <-> code

NAME_SETTINGS = {"project", "region", "staging_bucket", "output_bucket", "dataset", "temp_dataset", "extract_job",
                 "merge_job", "request_topic", "dead_letter_topic", "run_events_topic", "max_active_extracts"}


def test_names_json_equals_settings_defaults():
    defaults = Settings()
    assert NAME_SETTINGS <= set(NAMES["settings"]), "names.json lacks a name the code uses"
    for key, value in NAMES["settings"].items():
        assert getattr(defaults, key) == value, f"names.json settings.{key}={value!r}, bqx.config says " \
                                                f"{getattr(defaults, key)!r}"


def _sentinel(field_name: str, default: Any) -> tuple[str, Any]:
    """A value different from the default, as env text and as the parsed value."""
    if field_name == "merge_method":
        return "polars", "polars"
    if field_name == "memory_budget":
        return "3MiB", 3 << 20
    if isinstance(default, bool):
        raise AssertionError(f"no sentinel for {field_name}")
    if isinstance(default, int):
        return "7", 7
    if isinstance(default, float):
        return "7.5", 7.5
    return f"sentinel-{field_name}", f"sentinel-{field_name}"


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("BQX_") or key in ("MERGE_METHOD", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
            monkeypatch.delenv(key)


def test_env_names_are_the_ones_settings_reads(monkeypatch):
    settable = {f.name for f in fields(Settings)}
    defaults = Settings()
    for field_name, env_name in NAMES["env"].items():
        assert field_name in settable, f"names.json env.{field_name}: Settings has no such field"
        _clear_env(monkeypatch)
        text, parsed = _sentinel(field_name, getattr(defaults, field_name))
        monkeypatch.setenv(env_name, text)
        got = getattr(Settings.from_env(), field_name)
        assert got == parsed, f"{env_name}={text!r} did not set Settings.{field_name} (got {got!r})"


def test_pairs_and_event_types_match_code():
    assert NAMES["pairs"] == list(PAIRS)
    assert NAMES["event_types"]["object_finalized"] == events.FINALIZED
    assert NAMES["event_types"]["pubsub_published"] == events.PUBSUB


def test_job_resources_are_the_original_systems():
    # The issue fixes these numbers; names.json carries them to Terraform.
    want = {"extract": ("4", "8Gi", 7200), "merge": ("1", "2Gi", 1800)}
    for job, (cpu, memory, timeout) in want.items():
        spec = NAMES["jobs"][job]
        assert (spec["cpu"], spec["memory"], spec["timeout_seconds"]) == (cpu, memory, timeout), job
        assert (ROOT / spec["entrypoint"]).is_file()
    budget = parse_bytes(NAMES["jobs"]["merge"]["memory_budget"])
    assert budget == Settings().memory_budget
    assert budget <= parse_bytes(NAMES["jobs"]["merge"]["memory"].replace("Gi", "GiB")) // 2, \
        "the merge's memory budget must leave headroom inside the container"


def test_function_names_are_the_decorated_handlers():
    for spec in NAMES["functions"].values():
        tree = ast.parse((ROOT / spec["source"] / "main.py").read_text())
        handlers = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                    and any("cloud_event" in ast.unparse(d) for d in n.decorator_list)]
        assert handlers == [spec["entry_point"]], f"{spec['source']}/main.py defines {handlers}"


# ------------------------------------------------------------------------------------------- Terraform <-> names.json


def test_jobs_match_names_json(tf, ev):
    jobs = resources(tf, "google_cloud_run_v2_job")
    assert set(jobs) == {"extract", "merge"}
    for job, body in jobs.items():
        spec = NAMES["jobs"][job]
        assert ev.value(body["name"]) == NAMES["settings"][f"{job}_job"]
        outer = one(body["template"])
        inner = one(outer["template"])
        container = one(inner["containers"])
        limits = one(container["resources"])["limits"]
        assert ev.value(limits["cpu"]) == spec["cpu"], f"{job} cpu"
        assert ev.value(limits["memory"]) == spec["memory"], f"{job} memory"
        assert ev.value(inner["timeout"]) == f"{spec['timeout_seconds']}s", f"{job} timeout"
        assert ev.value(inner["max_retries"]) == NAMES["settings"]["task_max_retries"]
        assert ev.value(outer["task_count"]) == spec["task_count"]
        assert ev.value(inner["service_account"]) == f"google_service_account.{job}.email"  # one account per job
        image = ev.value(container["image"])
        assert f"/{NAMES['images'][job]}:" in image, image
        assert "args" not in container and "command" not in container, "the image's entrypoint and per-run args rule"


def test_task_counts_and_retries_are_variables(tf):
    ev = Evaluator(tf, {"project": "p", "extract_task_count": 6, "extract_max_retries": 5, "merge_max_retries": 2})
    jobs = resources(tf, "google_cloud_run_v2_job")
    ext, mrg = one(jobs["extract"]["template"]), one(jobs["merge"]["template"])
    assert ev.value(ext["task_count"]) == 6 and ev.value(ext["parallelism"]) == 6
    assert ev.value(one(ext["template"])["max_retries"]) == 5
    assert ev.value(one(mrg["template"])["max_retries"]) == 2
    # The job's own record of "last attempt" must agree with Cloud Run's retry count.
    assert dynamic_env(ev, one(one(ext["template"])["containers"]))["BQX_TASK_MAX_RETRIES"] == "5"
    assert dynamic_env(ev, one(one(mrg["template"])["containers"]))["BQX_TASK_MAX_RETRIES"] == "2"
    assert "merge_task_count" in tf["variable"]


OVERRIDES = {"project": "tf-proj", "region": "europe-west4", "staging_bucket": "tf-staging",
             "output_bucket": "tf-output", "warehouse_dataset": "tf_wh", "temp_dataset": "tf_tmp",
             "merge_method": "polars", "row_limit": 100000}


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    _clear_env(monkeypatch)
    known = set(NAMES["env"].values())
    for key, value in env.items():
        assert key in known, f"Terraform sets {key}, which bqx.config does not read"
        assert isinstance(value, str) and not isinstance(value, Ref), f"{key} is not a plain string: {value!r}"
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def test_job_env_carries_terraform_variables_into_settings(tf, monkeypatch):
    ev = Evaluator(tf, OVERRIDES)
    jobs = resources(tf, "google_cloud_run_v2_job")
    for job in ("extract", "merge"):
        env = dynamic_env(ev, one(one(one(jobs[job]["template"])["template"])["containers"]))
        s = _settings_from(env, monkeypatch)
        assert (s.project, s.region, s.staging_bucket, s.output_bucket) == \
               ("tf-proj", "europe-west4", "tf-staging", "tf-output"), job
        assert (s.dataset, s.temp_dataset, s.warehouse, s.row_limit) == ("tf_wh", "tf_tmp", "bigquery", 100000)
        assert (s.extract_job, s.merge_job) == (NAMES["settings"]["extract_job"], NAMES["settings"]["merge_job"])
        assert s.local is False
        if job == "merge":
            assert s.merge_method == "polars"
            assert s.memory_budget == parse_bytes(NAMES["jobs"]["merge"]["memory_budget"])


def test_defaults_flow_from_names_json(tf, monkeypatch):
    ev = Evaluator(tf, {"project": NAMES["settings"]["project"]})
    env = dynamic_env(ev, one(one(one(resources(tf, "google_cloud_run_v2_job")["merge"]["template"])["template"])
                              ["containers"]))
    s = _settings_from(env, monkeypatch)
    d = Settings()
    for key in NAME_SETTINGS | {"merge_method", "task_max_retries", "claim_lease_seconds"}:
        assert getattr(s, key) == getattr(d, key), key


def test_functions_env_carries_names_into_settings(tf, monkeypatch):
    ev = Evaluator(tf, OVERRIDES)
    for name in NAMES["functions"]:
        fn = resources(tf, "google_cloudfunctions2_function")[name]
        env = ev.value(one(fn["service_config"])["environment_variables"])
        s = _settings_from(env, monkeypatch)
        assert (s.project, s.region, s.staging_bucket) == ("tf-proj", "europe-west4", "tf-staging"), name
        assert (s.extract_job, s.merge_job) == (NAMES["settings"]["extract_job"], NAMES["settings"]["merge_job"])
        assert s.claim_lease_seconds == NAMES["settings"]["claim_lease_seconds"]


def test_names_of_buckets_topics_datasets(tf, ev):
    buckets = resources(tf, "google_storage_bucket")
    assert ev.value(buckets["staging"]["name"]) == NAMES["settings"]["staging_bucket"]
    assert ev.value(buckets["output"]["name"]) == NAMES["settings"]["output_bucket"]
    topics = resources(tf, "google_pubsub_topic")
    assert ev.value(topics["requests"]["name"]) == NAMES["settings"]["request_topic"]
    assert ev.value(topics["dead_letter"]["name"]) == NAMES["settings"]["dead_letter_topic"]
    assert ev.value(topics["run_events"]["name"]) == NAMES["settings"]["run_events_topic"]
    temp = resources(tf, "google_bigquery_dataset")["temp"]
    assert ev.value(temp["dataset_id"]) == NAMES["settings"]["temp_dataset"]
    assert ev.value(temp["default_table_expiration_ms"]) == NAMES["temp_table_expiration_days"] * 86_400_000 > 0
    assert ev.value(tf["data"]["google_bigquery_dataset"]["warehouse"]["dataset_id"]) == NAMES["settings"]["dataset"]
    assert ev.local("region") == NAMES["settings"]["region"]
    assert resources(tf, "google_artifact_registry_repository")["images"]["format"] == "DOCKER"


# ---------------------------------------------------------------------------------------------- IAM

PRIMITIVE = re.compile(r"roles/(owner|editor|viewer)\b")
CUSTOM_LAUNCHER = "google_project_iam_custom_role.job_launcher.id"
CUSTOM_VALIDATOR = "google_project_iam_custom_role.checkpoint_validator.id"
CUSTOM_READER = "google_project_iam_custom_role.execution_reader.id"
# The permissions each custom role may hold at most.
CUSTOM_PERMISSIONS = {
    "job_launcher": {"run.jobs.run", "run.jobs.runWithOverrides", "run.executions.get"},
    "checkpoint_validator": {"storage.objects.get", "storage.objects.update", "storage.objects.delete"},
    "execution_reader": {"run.executions.get"},
}

# Where each role may be granted. A role missing here, or an IAM resource type missing here, fails the test.
ALLOWED = {
    "google_project_iam_member": {"roles/bigquery.jobUser", "roles/bigquery.readSessionUser",
                                  "roles/eventarc.eventReceiver", "roles/logging.logWriter",
                                  "roles/pubsub.publisher", "roles/storage.objectViewer"},
    "google_storage_bucket_iam_member": {"roles/storage.objectUser", "roles/storage.objectViewer", CUSTOM_VALIDATOR},
    "google_bigquery_dataset_iam_member": {"roles/bigquery.dataViewer", "roles/bigquery.dataEditor"},
    "google_cloud_run_v2_job_iam_member": {CUSTOM_LAUNCHER, CUSTOM_READER},
    "google_cloud_run_v2_service_iam_member": {"roles/run.invoker"},
    "google_service_account_iam_member": {"roles/iam.serviceAccountUser", "roles/iam.serviceAccountTokenCreator"},
    "google_pubsub_topic_iam_member": {"roles/pubsub.publisher"},
    "google_pubsub_subscription_iam_member": {"roles/pubsub.subscriber"},
    "google_artifact_registry_repository_iam_member": {"roles/artifactregistry.writer"},
}
# Project-wide grants only for these members' kinds; a conditional grant is required for storage reads.
PROJECT_CONDITIONAL = {"roles/storage.objectViewer"}


def iam_bindings(tf: dict[str, Any], ev: Evaluator) -> list[tuple[str, str, str, Any, dict[str, Any]]]:
    """(resource type, resource name, role, member, body) for every IAM grant."""
    out = []
    for rtype, named in tf["resource"].items():
        if "_iam_" not in rtype or rtype == "google_project_iam_custom_role":
            continue
        for rname, body in named.items():
            members = [body["member"]] if "member" in body else body.get("members", [])
            for member in members:
                out.append((rtype, rname, ev.value(body["role"]), ev.value(member), body))
    return out


def check_iam(tf: dict[str, Any], ev: Evaluator, texts: dict[str, str]) -> None:
    for name, text in texts.items():
        assert not PRIMITIVE.search(text), f"{name} mentions a primitive role"
        assert "allUsers" not in text and "allAuthenticatedUsers" not in text, f"{name} grants to the public"
    for rtype in tf["resource"]:
        assert not rtype.endswith(("_iam_policy", "_iam_binding")), f"{rtype}: authoritative IAM is not used here"
    bindings = iam_bindings(tf, ev)
    assert bindings, "no IAM bindings found"
    for rtype, rname, role, _member, body in bindings:
        assert rtype in ALLOWED, f"{rtype}.{rname}: IAM resource type not in the allow-list"
        assert role in ALLOWED[rtype], f"{rtype}.{rname}: {role} is not allowed on that scope"
        assert not PRIMITIVE.search(str(role)), f"{rtype}.{rname}: primitive role {role}"
        if rtype == "google_project_iam_member" and role in PROJECT_CONDITIONAL:
            assert body.get("condition"), f"{rtype}.{rname}: project-wide {role} needs an IAM condition"
    for rname, body in resources(tf, "google_project_iam_custom_role").items():
        perms, allowed = set(ev.value(body["permissions"])), CUSTOM_PERMISSIONS.get(rname, set())
        assert perms <= allowed, f"custom role {rname} has {perms - allowed}"


def test_iam_roles_are_narrow(tf, ev):
    check_iam(tf, ev, deploy_texts())


@pytest.mark.parametrize("bad", [
    'resource "google_project_iam_member" "x" {\n  project = "p"\n  role = "roles/editor"\n  member = "user:a@b"\n}\n',
    'resource "google_storage_bucket_iam_member" "x" {\n  bucket = "b"\n  role = "roles/storage.admin"\n'
    '  member = "user:a@b"\n}\n',
    'resource "google_project_iam_member" "x" {\n  project = "p"\n  role = "roles/storage.objectViewer"\n'
    '  member = "user:a@b"\n}\n',
    'resource "google_project_iam_binding" "x" {\n  project = "p"\n  role = "roles/bigquery.jobUser"\n'
    '  members = ["user:a@b"]\n}\n',
    'resource "google_storage_bucket_iam_member" "x" {\n  bucket = "b"\n  role = "roles/storage.objectViewer"\n'
    '  member = "allUsers"\n}\n',
])
def test_iam_check_rejects_broad_grants(bad):
    texts = {**deploy_texts(), "zz_bad.tf": bad}
    tf = load_tf(texts)
    with pytest.raises(AssertionError):
        check_iam(tf, Evaluator(tf, {"project": "p"}), texts)


def _grants_of(tf: dict[str, Any], ev: Evaluator, account: str) -> Counter[tuple[str, str, str, bool]]:
    """(resource type, role, target, conditional?) of each grant to `account`, counted."""
    member = f"google_service_account.{account}.member"
    out: Counter[tuple[str, str, str, bool]] = Counter()
    for rtype, _rname, role, m, body in iam_bindings(tf, ev):
        if m != member:
            continue
        target = next((ev.value(body[k]) for k in ("bucket", "dataset_id", "name", "service_account_id",
                                                   "repository", "topic", "subscription") if k in body), "project")
        out[(rtype, str(role), str(target), bool(body.get("condition")))] += 1
    return out


BUCKET, JOB, SA = "google_storage_bucket_iam_member", "google_cloud_run_v2_job_iam_member", \
    "google_service_account_iam_member"
STAGING, OUTPUT = "google_storage_bucket.staging.name", "google_storage_bucket.output.name"
RUN_EVENTS = ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", "google_pubsub_topic.run_events.name", False)
VIEWER, USER = "roles/storage.objectViewer", "roles/storage.objectUser"


def test_trigger_reads_requests_registers_runs_and_starts_only_the_extract(tf, ev):
    assert _grants_of(tf, ev, "trigger") == Counter({
        (BUCKET, VIEWER, STAGING, True): 1,  # requests/ only
        (BUCKET, VIEWER, STAGING, False): 1,  # listing the extract queue (bqx.schedule)
        (BUCKET, USER, STAGING, True): 2,  # latest.json, extract.claim, error.json; the extract queue (queue/)
        (BUCKET, VIEWER, OUTPUT, True): 1,  # summaries only
        (JOB, CUSTOM_LAUNCHER, "google_cloud_run_v2_job.extract.name", False): 1,
        (SA, "roles/iam.serviceAccountUser", "google_service_account.extract.name", False): 1,
        RUN_EVENTS: 1,  # the end of a run, on that topic only
    })
    perms = set(ev.value(resources(tf, "google_project_iam_custom_role")["job_launcher"]["permissions"]))
    assert {"run.jobs.run", "run.jobs.runWithOverrides"} <= perms


def test_completion_validates_checkpoints_and_starts_only_the_merge(tf, ev):
    assert _grants_of(tf, ev, "completion") == Counter({
        (BUCKET, VIEWER, STAGING, False): 1,
        (BUCKET, CUSTOM_VALIDATOR, STAGING, True): 1,  # checkpoints/: mark or delete, never create
        (BUCKET, USER, STAGING, True): 2,  # quarantine/; merge.claim and error.json
        (JOB, CUSTOM_LAUNCHER, "google_cloud_run_v2_job.merge.name", False): 1,
        (JOB, CUSTOM_READER, "google_cloud_run_v2_job.extract.name", False): 1,  # the sweeper: how executions ended
        (JOB, CUSTOM_READER, "google_cloud_run_v2_job.merge.name", False): 1,
        (SA, "roles/iam.serviceAccountUser", "google_service_account.merge.name", False): 1,
        RUN_EVENTS: 1,  # the end of a run, on that topic only
    })
    perms = set(ev.value(resources(tf, "google_project_iam_custom_role")["checkpoint_validator"]["permissions"]))
    assert "storage.objects.update" in perms and "storage.objects.create" not in perms


def test_extract_grants(tf, ev):
    assert _grants_of(tf, ev, "extract") == Counter({
        ("google_bigquery_dataset_iam_member", "roles/bigquery.dataViewer",
         "data.google_bigquery_dataset.warehouse.dataset_id", False): 1,
        ("google_project_iam_member", "roles/bigquery.jobUser", "project", False): 1,
        ("google_project_iam_member", "roles/bigquery.readSessionUser", "project", False): 1,
        (BUCKET, VIEWER, STAGING, False): 1,
        (BUCKET, USER, STAGING, True): 2,  # checkpoints/; runs/ but the merge's objects
        (BUCKET, VIEWER, OUTPUT, True): 1,  # summaries only
        RUN_EVENTS: 1,  # the end of a run, on that topic only
    })


def test_merge_grants(tf, ev):
    assert _grants_of(tf, ev, "merge") == Counter({
        ("google_project_iam_member", "roles/bigquery.jobUser", "project", False): 1,
        ("google_bigquery_dataset_iam_member", "roles/bigquery.dataEditor",
         "google_bigquery_dataset.temp.dataset_id", False): 1,
        (BUCKET, VIEWER, STAGING, False): 1,
        (BUCKET, USER, STAGING, True): 1,  # its claim, progress, error.json and BigQuery exports
        (BUCKET, USER, OUTPUT, False): 1,
        RUN_EVENTS: 1,  # the end of a run, on that topic only
    })


def test_only_the_merge_writes_output_and_staging_writes_are_conditional(tf, ev):
    for rtype, rname, role, member, body in iam_bindings(tf, ev):
        if rtype != BUCKET or role == VIEWER:
            continue
        target = ev.value(body["bucket"])
        if target == OUTPUT:
            assert member == "google_service_account.merge.member", f"{rname}: only the merge writes the output"
        if target == STAGING:
            assert body.get("condition"), f"{rname}: a write grant on staging must name its objects"


def test_events_account_only_receives_and_invokes(tf, ev):
    assert _grants_of(tf, ev, "events") == Counter({
        ("google_project_iam_member", "roles/eventarc.eventReceiver", "project", False): 1,
        ("google_cloud_run_v2_service_iam_member", "roles/run.invoker", "google_cloudfunctions2_function.trigger.name",
         False): 1,
        ("google_cloud_run_v2_service_iam_member", "roles/run.invoker",
         "google_cloudfunctions2_function.completion.name", False): 1,
    })


# ---------------------------------------------------------------------------------------------- buckets


def test_buckets_are_private_with_uniform_access(tf, ev):
    buckets = resources(tf, "google_storage_bucket")
    assert {"staging", "output"} <= set(buckets)
    for name, body in buckets.items():
        assert body.get("uniform_bucket_level_access") is True, name
        assert body.get("public_access_prevention") == "enforced", name
    for rtype in tf["resource"]:
        assert "acl" not in rtype, f"{rtype}: ACLs are off (uniform bucket-level access)"


def _delete_prefixes(ev: Evaluator, bucket: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for rule in bucket.get("lifecycle_rule", []):
        if one(rule["action"])["type"] != "Delete":
            continue
        cond = one(rule["condition"])
        for prefix in ev.value(cond.get("matches_prefix", [])):
            out[prefix] = ev.value(cond.get("age"))
    return out


def test_lifecycle_deletes_old_checkpoints_and_tmp(tf, ev):
    buckets = resources(tf, "google_storage_bucket")
    staging = _delete_prefixes(ev, buckets["staging"])
    assert staging.get("checkpoints/") == NAMES["checkpoint_retention_days"] > 0
    assert "runs/" not in staging and "requests/" not in staging, "run state and claims are never aged out"
    assert _delete_prefixes(ev, buckets["output"]).get("tmp/") == NAMES["output_tmp_retention_days"] > 0
    assert all(not p.startswith("training_") for p in _delete_prefixes(ev, buckets["output"]))


def test_output_keeps_the_last_versions_of_each_training_file(tf, ev):
    # one number for both: the per-run copies bqx prunes (BQX_KEEP_VERSIONS) and the file's superseded generations
    assert tf["variable"]["keep_versions"]["default"] is None
    assert ev.value("${local.common_env}")["BQX_KEEP_VERSIONS"] == str(NAMES["settings"]["keep_versions"])
    assert Settings().keep_versions == NAMES["settings"]["keep_versions"]
    rules = resources(tf, "google_storage_bucket")["output"]["lifecycle_rule"]
    noncurrent = [one(r["condition"]) for r in rules if one(r["action"])["type"] == "Delete"
                  and one(r["condition"]).get("with_state") == "ARCHIVED"]
    assert [ev.value(c["num_newer_versions"]) for c in noncurrent] == [NAMES["settings"]["keep_versions"]]
    # rules are OR'ed: an age rule on noncurrent versions would delete kept versions early
    assert not any("days_since_noncurrent_time" in c or "age" in c for c in noncurrent)
    assert Evaluator(tf, {"project": "p", "keep_versions": 5}).value(noncurrent[0]["num_newer_versions"]) == 5


# ---------------------------------------------------------------------------------------------- daily runs (issue 20)


def _schedule_message(tf: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    import base64

    job = resources(tf, "google_cloud_scheduler_job")["daily"]
    data = Evaluator(tf, {"project": "p", **variables}).value(one(job["pubsub_target"])["data"])
    return json.loads(base64.b64decode(data))


def test_schedule_publishes_one_request_naming_valid_pairs(tf, ev):
    variables = tf["variable"]
    assert variables["schedule_enabled"]["default"] is False
    assert variables["schedule_pairs"]["default"] is None and ev.local("schedule_pairs") == NAMES["pairs"]
    assert len(NAMES["pairs"]) == 28
    assert isinstance(variables["schedule_cron"]["default"], str) and variables["schedule_cron"]["default"].strip()
    assert isinstance(variables["schedule_time_zone"]["default"], str)
    job = resources(tf, "google_cloud_scheduler_job")["daily"]
    assert job["paused"] == "${!var.schedule_enabled}", "the job exists, paused until schedule_enabled"
    assert ev.value(job["schedule"]) == variables["schedule_cron"]["default"]
    assert ev.value(job["time_zone"]) == variables["schedule_time_zone"]["default"]
    target = one(job["pubsub_target"])
    assert ev.value(target["topic_name"]) == "google_pubsub_topic.requests.id"
    message = _schedule_message(tf, {})
    assert message == {"pairs": NAMES["pairs"], "origin": "schedule"}
    assert set(message["pairs"]) <= set(PAIRS)
    assert _schedule_message(tf, {"schedule_pairs": ["gbpusd", "eurusd"]})["pairs"] == ["gbpusd", "eurusd"]
    # a pair outside names.json (or none at all) stops `terraform plan`
    precondition = one(one(job["lifecycle"])["precondition"])["condition"]
    assert "setsubtract(local.schedule_pairs, local.names.pairs)" in precondition
    assert "length(local.schedule_pairs) > 0" in precondition


def test_run_events_topic_takes_the_ends_of_runs_from_the_four_components(tf, ev):
    publishers = {ev.value(body["member"]) for body in resources(tf, "google_pubsub_topic_iam_member").values()
                  if ev.value(body["topic"]) == "google_pubsub_topic.run_events.name"}
    assert publishers == {f"google_service_account.{c}.member" for c in ("trigger", "completion", "extract", "merge")}
    for rname, body in resources(tf, "google_pubsub_topic_iam_member").items():
        assert ev.value(body["role"]) == "roles/pubsub.publisher", rname
    env = ev.local("common_env")
    assert env["BQX_RUN_EVENTS_TOPIC"] == NAMES["settings"]["run_events_topic"]
    assert env["BQX_MAX_ACTIVE_EXTRACTS"] == str(NAMES["settings"]["max_active_extracts"])


def test_failed_runs_are_counted_and_alerted(tf, ev):
    metric = resources(tf, "google_logging_metric")["run_failed"]
    flt = ev.value(metric["filter"])
    assert 'jsonPayload.event="run_failed"' in flt and "severity>=ERROR" in flt
    for component in ("google_cloudfunctions2_function.trigger.name", "google_cloudfunctions2_function.completion.name",
                      "google_cloud_run_v2_job.extract.name", "google_cloud_run_v2_job.merge.name"):
        assert "${" + component + "}" in flt, component
    assert one(metric["metric_descriptor"])["metric_kind"] == "DELTA"
    policy = resources(tf, "google_monitoring_alert_policy")["run_failed"]
    assert policy["notification_channels"] == "${var.alert_notification_channels}"
    assert tf["variable"]["alert_notification_channels"]["default"] == []
    conditions = policy["conditions"]
    assert {ev.value(one(c["condition_threshold"])["filter"]).split(" AND ")[1] for c in conditions} == {
        'resource.type="cloud_run_revision"', 'resource.type="cloud_run_job"'}
    for c in conditions:
        threshold = one(c["condition_threshold"])
        assert 'metric.type="logging.googleapis.com/user/${google_logging_metric.run_failed.name}"' in \
            ev.value(threshold["filter"])
        assert threshold["comparison"] == "COMPARISON_GT" and threshold["threshold_value"] == 0


# ---------------------------------------------------------------------------------------------- triggers


def test_functions_and_their_storage_triggers(tf, ev):
    fns = resources(tf, "google_cloudfunctions2_function")
    assert set(fns) == set(NAMES["functions"])
    for name, body in fns.items():
        spec = NAMES["functions"][name]
        build = one(body["build_config"])
        assert ev.value(body["name"]) == name
        assert ev.value(build["entry_point"]) == spec["entry_point"]
        assert ev.value(build["runtime"]) == NAMES["runtime"]
        source = one(one(build["source"])["storage_source"])
        assert ev.value(source["object"]) == f"google_storage_bucket_object.function_source.{name}.name"
        service = one(body["service_config"])
        assert ev.value(service["service_account_email"]) == f"google_service_account.{name}.email"
        assert ev.value(service["ingress_settings"]) == "ALLOW_INTERNAL_ONLY"
        trigger = one(body["event_trigger"])
        assert ev.value(trigger["event_type"]) == events.FINALIZED
        filters = {ev.value(f["attribute"]): ev.value(f["value"]) for f in trigger["event_filters"]}
        assert filters == {"bucket": "google_storage_bucket.staging.name"}, name
        assert ev.value(trigger["trigger_region"]) == ev.local("region")
        assert ev.value(trigger["retry_policy"]) == "RETRY_POLICY_RETRY", "transient failures must be redelivered"
        assert ev.value(trigger["service_account_email"]) == "google_service_account.events.email"


def test_requests_topic_triggers_the_trigger_function(tf, ev):
    triggers = resources(tf, "google_eventarc_trigger")
    assert set(triggers) == {"requests"}
    t = triggers["requests"]
    match = {ev.value(m["attribute"]): ev.value(m["value"]) for m in t["matching_criteria"]}
    assert match == {"type": events.PUBSUB}
    dest = one(one(t["destination"])["cloud_run_service"])
    assert ev.value(dest["service"]) == "google_cloudfunctions2_function.trigger.name"
    assert ev.value(one(one(t["transport"])["pubsub"])["topic"]) == "google_pubsub_topic.requests.id"
    assert ev.value(t["service_account"]) == "google_service_account.events.email"


def test_dead_letter_topic_is_wired(tf, ev):
    sub = resources(tf, "google_pubsub_subscription")["dead_letters"]
    assert ev.value(sub["topic"]) == "google_pubsub_topic.dead_letter.id"
    pub = resources(tf, "google_pubsub_topic_iam_member")["dead_letter_publisher"]
    assert ev.value(pub["topic"]) == "google_pubsub_topic.dead_letter.name"
    assert ev.value(pub["member"]) == ev.local("pubsub_service_agent")
    assert "requests_subscription" in tf["output"]


# ---------------------------------------------------------------------------------------------- images and packaging


def _requirements(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", line)
        assert m, f"{path.name}: {line!r} is not pinned as name==version"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_dockerfile_builds_both_jobs_as_non_root():
    text = (ROOT / "jobs" / "Dockerfile").read_text()
    stages: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            base, current = m.group(1), (m.group(2) or "")
            assert base in stages or (":" in base and not base.endswith(":latest") and "slim" in base), base
            stages[current] = list(stages.get(base, []))
        elif line and not line.startswith("#"):
            stages[current].append(line)
    for job in ("extract", "merge"):
        lines = stages[job]
        users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{job} image runs as root"
        entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
        isolated = ["python", "-I", "-u", "-B"]  # PYTHON* variables (overrides) are ignored; unbuffered logs
        assert json.loads(entry[-1][len("ENTRYPOINT"):]) == [*isolated, NAMES["jobs"][job]["entrypoint"]]
    assert "--no-deps -r /tmp/jobs.txt" in text and "pip check" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] and "!requirements/jobs.txt" in ignore


def test_requirements_are_pinned_and_closed():
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    env = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    for path in (ROOT / "requirements" / "jobs.txt", DEPLOY / "functions-requirements.txt"):
        pins = _requirements(path)
        checked = 0
        for name, version in pins.items():
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                continue
            if dist.version != version:
                continue  # metadata of another version says nothing about this pin
            checked += 1
            for raw in dist.requires or []:
                req = Requirement(raw)
                if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                    continue
                dep = req.name.lower().replace("_", "-")
                assert dep in pins, f"{path.name}: {name}=={version} needs {req}, which is not pinned"
                assert req.specifier.contains(pins[dep], prereleases=True), \
                    f"{path.name}: {name} needs {req}, pinned {dep}=={pins[dep]}"
        assert checked >= len(pins) // 2, f"{path.name}: too few pins could be checked against installed metadata"


_IMPORTED_DISTS = """
import importlib, json, os, sys, site
from importlib.metadata import distributions
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)  # the interpreter's own start-up (site hooks) is not the code's doing
for mod in sys.argv[2].split(","):
    importlib.import_module(mod)
roots = [p for p in sys.path if p.endswith("site-packages")]
loaded = set()
for name, m in list(sys.modules.items()):
    path = None if name in before else getattr(m, "__file__", None)
    for root in roots:
        if path and path.startswith(root + os.sep):
            loaded.add(os.path.relpath(path, root).replace(os.sep, "/"))
used = set()
for d in distributions():
    record = d.read_text("RECORD") or ""
    if any(line.split(",", 1)[0] in loaded for line in record.splitlines()):
        used.add(d.metadata["Name"].lower().replace("_", "-"))
import bqx
print(json.dumps({"dists": sorted(used), "bqx": bqx.__file__}))
"""


def _start_import(where: Path, modules: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-I", "-c", _IMPORTED_DISTS, str(where), ",".join(modules)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=where)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both function zips built twice, and (in parallel) what the packaged function and the jobs import."""
    sys.path.insert(0, str(DEPLOY))
    try:
        import package_functions
    finally:
        sys.path.remove(str(DEPLOY))
    base = tmp_path_factory.mktemp("functions")
    first, second = package_functions.package(base / "a"), package_functions.package(base / "b")
    fn_dir = base / "a" / "trigger"
    fn = _start_import(fn_dir, ["main", "bqx.serving", "bqx.trigger", "bqx.completion.handler", "google.cloud.run_v2",
                                "google.cloud.storage"])
    # What the job image holds: shared/bqx on PYTHONPATH, plus the modules the jobs import lazily in the cloud.
    job_modules = ["bqx.extract.job", "bqx.merge.job", "bqx.extract.sources", "bqx.merge.publish",
                   "google.cloud.bigquery", "google.cloud.storage", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.fs",
                   "polars"]
    job_modules += [f"bqx.merge.{p.stem}" for p in (ROOT / "shared" / "bqx" / "merge").glob("*.py")]  # every method
    jobs = _start_import(ROOT / "shared", job_modules)
    return {"first": first, "second": second, "fn_dir": fn_dir, "fn": _result(fn), "jobs": _result(jobs)}


def test_packaged_functions_import_their_bundled_bqx(packaged):
    pins = _requirements(DEPLOY / "functions-requirements.txt")
    for name, zip_path in packaged["first"].items():
        assert zip_path.read_bytes() == packaged["second"][name].read_bytes(), f"{name}.zip is not reproducible"
        with zipfile.ZipFile(zip_path) as zf:
            names = set(zf.namelist())
            assert zf.read("main.py") == (ROOT / NAMES["functions"][name]["source"] / "main.py").read_bytes()
            assert zf.read("requirements.txt") == (DEPLOY / "functions-requirements.txt").read_bytes()
        assert {"bqx/__init__.py", "bqx/completion/handler.py", "bqx/config.py"} <= names
        assert not any(n.startswith("bqx/local/") for n in names)
    # The function, run from its unpacked source, imports the bundled bqx and only pinned distributions.
    got = packaged["fn"]
    assert Path(got["bqx"]).is_relative_to(packaged["fn_dir"]), got["bqx"]
    missing = set(got["dists"]) - set(pins) - {"bqx"}
    assert not missing, f"the functions import {sorted(missing)}, not in deploy/functions-requirements.txt"


def test_jobs_import_only_pinned_distributions(packaged):
    pins = _requirements(ROOT / "requirements" / "jobs.txt")
    got = packaged["jobs"]
    assert "pyarrow" in got["dists"] and "google-cloud-bigquery" in got["dists"], got["dists"]
    missing = set(got["dists"]) - set(pins) - {"bqx"}
    assert not missing, f"the jobs import {sorted(missing)}, not in requirements/jobs.txt"


def test_merge_memory_budget_is_the_settings_default():
    """The merge job's budget is deployed as the code's default (config.MEMORY_BUDGET), so a merge started by hand
    outside Cloud Run holds what the deployed one does."""
    from bqx.config import MEMORY_BUDGET, parse_bytes

    assert NAMES["jobs"]["merge"]["memory_budget"] == MEMORY_BUDGET
    assert Settings().memory_budget == parse_bytes(MEMORY_BUDGET)
