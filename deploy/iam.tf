# Service accounts and every role they hold. No primitive role (owner/editor/viewer) and nothing project-wide
# beyond bigquery.jobUser and bigquery.readSessionUser (the jobs), eventarc.eventReceiver (Eventarc),
# logging.logWriter (builds) and the Google-managed Cloud Storage agent's pubsub.publisher, which Eventarc's storage
# triggers require. tests/test_deploy.py holds the allow-list each binding here is checked against.
#
# One account per component, so a bug or a compromise in one cannot do another's writes: only the merge writes the
# output bucket, only the extract writes checkpoints and manifests, the functions write only their own run-state
# objects. Where a role must cover part of a bucket, an IAM condition on the object name limits it. Reads of the
# staging bucket are not split: listing is checked on the bucket itself, which a name prefix cannot express.

resource "google_service_account" "trigger" {
  project      = var.project
  account_id   = local.names.service_accounts.trigger
  display_name = "bqx trigger function (requests -> extract job)"
}

resource "google_service_account" "completion" {
  project      = var.project
  account_id   = local.names.service_accounts.completion
  display_name = "bqx completion function (checkpoints -> merge job)"
}

resource "google_service_account" "extract" {
  project      = var.project
  account_id   = local.names.service_accounts.extract
  display_name = "bqx extract job"
}

resource "google_service_account" "merge" {
  project      = var.project
  account_id   = local.names.service_accounts.merge
  display_name = "bqx merge job"
}

resource "google_service_account" "events" {
  project      = var.project
  account_id   = local.names.service_accounts.events
  display_name = "bqx Eventarc triggers (invokes the two functions)"
}

resource "google_service_account" "build" {
  project      = var.project
  account_id   = local.names.service_accounts.build
  display_name = "bqx function builds"
}

# Object-name prefixes the conditions below test (IAM names objects projects/_/buckets/<bucket>/objects/<name>).
locals {
  staging_objects = "projects/_/buckets/${google_storage_bucket.staging.name}/objects/"
  output_objects  = "projects/_/buckets/${google_storage_bucket.output.name}/objects/"
}

# Every pipeline component reads run state in staging (manifests, claims, listings of checkpoints and reports). The
# trigger too, since it drains the extract queue: listing queue/ is a bucket-level permission a name condition
# cannot scope (bqx.schedule).
resource "google_storage_bucket_iam_member" "trigger_staging_reader" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.trigger.member
}

resource "google_storage_bucket_iam_member" "completion_staging_reader" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.completion.member
}

resource "google_storage_bucket_iam_member" "extract_staging_reader" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.extract.member
}

resource "google_storage_bucket_iam_member" "merge_staging_reader" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.merge.member
}

# The trigger reads a pair's training_<pair>.summary.json to tell a finished run from an active one ("already
# running"), and the extract reads it to find the published run whose checkpoints it may reuse: summaries only.
resource "google_storage_bucket_iam_member" "trigger_output_summaries" {
  bucket = google_storage_bucket.output.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.trigger.member

  condition {
    title       = "run summaries only"
    description = "training_<pair>.summary.json in the output bucket, not the training files."
    expression  = "resource.name.startsWith(\"${local.output_objects}training_\") && resource.name.endsWith(\".summary.json\")"
  }
}

resource "google_storage_bucket_iam_member" "extract_output_summaries" {
  bucket = google_storage_bucket.output.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.extract.member

  condition {
    title       = "run summaries only"
    description = "training_<pair>.summary.json in the output bucket, not the training files."
    expression  = "resource.name.startsWith(\"${local.output_objects}training_\") && resource.name.endsWith(\".summary.json\")"
  }
}

# run.jobs.runWithOverrides stays: an execution needs its pair (container args) and run id (BQX_RUN_ID), which only
# overrides carry. What an override could do beyond that is closed elsewhere: the functions pass only the pair, the run
# id and a task count (bqx.gcp.launch); the jobs run `python -I` (jobs/Dockerfile), so PYTHON* variables load nothing; and
# the job launcher is bound per job, to the one function that starts it.
resource "google_project_iam_custom_role" "job_launcher" {
  project     = var.project
  role_id     = "bqxJobLauncher"
  title       = "bqx job launcher"
  description = "Start a Cloud Run job execution with container overrides (args, env, task count), and see when it ends. Bound per job."
  permissions = ["run.jobs.run", "run.jobs.runWithOverrides", "run.executions.get"]
}

# The completion function marks a checkpoint validated (a metadata patch) or sets a bad one aside (copy, then delete
# that generation); it never creates one, so a checkpoint's content is only ever the extract's.
resource "google_project_iam_custom_role" "checkpoint_validator" {
  project     = var.project
  role_id     = "bqxCheckpointValidator"
  title       = "bqx checkpoint validator"
  description = "Read, mark (metadata) and delete checkpoints; no create. Bound on the staging bucket's checkpoints/."
  permissions = ["storage.objects.get", "storage.objects.update", "storage.objects.delete"]
}

# ---------------------------------------------------------------- trigger: read requests, register the run
# (runs/<pair>/latest.json swapped, runs/<pair>/<run>/extract.claim created once, error.json if Cloud Run refuses the
# launch), start the extract job. objectUser, not objectCreator, on these names: the claim and latest.json are
# replaced under generation preconditions (an overwrite needs delete) and a lost create-once race must be GCS's 412.

resource "google_storage_bucket_iam_member" "trigger_requests" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.trigger.member

  condition {
    title       = "requests only"
    description = "Read requests/<pair>.json."
    expression  = "resource.name.startsWith(\"${local.staging_objects}requests/\")"
  }
}

resource "google_storage_bucket_iam_member" "trigger_run_state" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.trigger.member

  condition {
    title       = "latest pointer, extract claim, run error"
    description = "runs/<pair>/latest.json, runs/<pair>/<run>/extract.claim and error.json; no checkpoint or manifest."
    expression  = "resource.name.startsWith(\"${local.staging_objects}runs/\") && (resource.name.endsWith(\"/latest.json\") || resource.name.endsWith(\"/extract.claim\") || resource.name.endsWith(\"/error.json\"))"
  }
}

# The extract queue (bqx.schedule): requests waiting for a slot and the max_active_extracts slots themselves.
resource "google_storage_bucket_iam_member" "trigger_queue" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.trigger.member

  condition {
    title       = "extract queue"
    description = "queue/requests/<pair>/<run>.json and queue/slots/<n>.json."
    expression  = "resource.name.startsWith(\"${local.staging_objects}queue/\")"
  }
}

resource "google_cloud_run_v2_job_iam_member" "trigger_launch_extract" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.extract.name
  role     = google_project_iam_custom_role.job_launcher.id
  member   = google_service_account.trigger.member
}

# Cloud Run checks iam.serviceAccounts.actAs on a job's service account when an execution is started with overrides
# (besides run.jobs.runWithOverrides on the job): each function may act as the one job account it launches.
resource "google_service_account_iam_member" "trigger_act_as_extract" {
  service_account_id = google_service_account.extract.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.trigger.member
}

# ---------------------------------------------------------------- completion: validate checkpoints (mark, or set
# aside in quarantine/), create runs/<pair>/<run>/merge.claim once, record error.json, start the merge job.

resource "google_storage_bucket_iam_member" "completion_checkpoints" {
  bucket = google_storage_bucket.staging.name
  role   = google_project_iam_custom_role.checkpoint_validator.id
  member = google_service_account.completion.member

  condition {
    title       = "checkpoints only"
    description = "Mark or delete checkpoints/<pair>/<run>/<table>.parquet; never create one."
    expression  = "resource.name.startsWith(\"${local.staging_objects}checkpoints/\")"
  }
}

resource "google_storage_bucket_iam_member" "completion_quarantine" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.completion.member

  condition {
    title       = "quarantine only"
    description = "Copy a bad checkpoint to quarantine/<pair>/<run>/<table>.parquet."
    expression  = "resource.name.startsWith(\"${local.staging_objects}quarantine/\")"
  }
}

resource "google_storage_bucket_iam_member" "completion_run_state" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.completion.member

  condition {
    title       = "merge claim and run error"
    description = "runs/<pair>/<run>/merge.claim and error.json; no manifest, latest pointer or extract claim."
    expression  = "resource.name.startsWith(\"${local.staging_objects}runs/\") && (resource.name.endsWith(\"/merge.claim\") || resource.name.endsWith(\"/error.json\"))"
  }
}

resource "google_cloud_run_v2_job_iam_member" "completion_launch_merge" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.merge.name
  role     = google_project_iam_custom_role.job_launcher.id
  member   = google_service_account.completion.member
}

resource "google_service_account_iam_member" "completion_act_as_merge" {
  service_account_id = google_service_account.merge.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.completion.member
}

# ---------------------------------------------------------------- extract: read the warehouse, write checkpoints
# and its run state (latest pointer and extract claim when started by hand, manifest, task reports, error.json).

resource "google_bigquery_dataset_iam_member" "extract_warehouse_reader" {
  project    = var.project
  dataset_id = data.google_bigquery_dataset.warehouse.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = google_service_account.extract.member
}

resource "google_project_iam_member" "extract_bigquery_jobs" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.extract.member
}

# Tables are read through the BigQuery Storage Read API (bqx.source), whose read sessions are project resources.
resource "google_project_iam_member" "extract_read_sessions" {
  project = var.project
  role    = "roles/bigquery.readSessionUser"
  member  = google_service_account.extract.member
}

resource "google_storage_bucket_iam_member" "extract_checkpoints" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.extract.member

  condition {
    title       = "checkpoints only"
    description = "Write checkpoints/<pair>/<run>/<table>.parquet (streamed, or copied from the published run)."
    expression  = "resource.name.startsWith(\"${local.staging_objects}checkpoints/\")"
  }
}

# Task reports (runs/<pair>/<run>/extract/task-<i>-attempt-<a>.json) and footer indexes (.../footers/...) have no
# fixed suffix a condition can name, so this one lists what the extract may not touch under runs/: the merge's
# claim, progress and BigQuery exports.
resource "google_storage_bucket_iam_member" "extract_run_state" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.extract.member

  condition {
    title       = "run state, not the merge's"
    description = "runs/ objects except merge.claim, merge.started, merge-progress.json, the merge's BigQuery exports (*.parquet) and compose pieces (*.compose)."
    expression  = "resource.name.startsWith(\"${local.staging_objects}runs/\") && !resource.name.endsWith(\"/merge.claim\") && !resource.name.endsWith(\"/merge.started\") && !resource.name.endsWith(\"/merge-progress.json\") && !resource.name.endsWith(\".parquet\") && !resource.name.endsWith(\".compose\")"
  }
}

# ---------------------------------------------------------------- merge: read checkpoints, keep its own run state
# (merge.claim, merge-progress.json, error.json, BigQuery exports under runs/<pair>/<run>/bigquery/), own the temp
# dataset's tables, and write the output bucket: the only account that may.

resource "google_project_iam_member" "merge_bigquery_jobs" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.merge.member
}

resource "google_bigquery_dataset_iam_member" "merge_temp_editor" {
  project    = var.project
  dataset_id = google_bigquery_dataset.temp.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = google_service_account.merge.member
}

resource "google_storage_bucket_iam_member" "merge_run_state" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.merge.member

  condition {
    title       = "merge claim, progress, run error and end, BigQuery exports, compose pieces"
    description = "runs/<pair>/<run>/merge.claim, merge.started, merge-progress.json, error.json, done.json, bigquery/**.parquet, compose/*.compose and the composed *.parquet."
    expression  = "resource.name.startsWith(\"${local.staging_objects}runs/\") && (resource.name.endsWith(\"/merge.claim\") || resource.name.endsWith(\"/merge.started\") || resource.name.endsWith(\"/merge-progress.json\") || resource.name.endsWith(\"/error.json\") || resource.name.endsWith(\"/done.json\") || resource.name.endsWith(\".parquet\") || resource.name.endsWith(\".compose\"))"
  }
}

resource "google_storage_bucket_iam_member" "merge_output" {
  bucket = google_storage_bucket.output.name
  role   = "roles/storage.objectUser"
  member = google_service_account.merge.member
}

# ---------------------------------------------------------------- Eventarc: receive events, invoke the functions.

resource "google_project_iam_member" "events_receiver" {
  project = var.project
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.events.member
}

resource "google_cloud_run_v2_service_iam_member" "events_invoke_trigger" {
  project  = var.project
  location = local.region
  name     = google_cloudfunctions2_function.trigger.name
  role     = "roles/run.invoker"
  member   = google_service_account.events.member
}

resource "google_cloud_run_v2_service_iam_member" "events_invoke_completion" {
  project  = var.project
  location = local.region
  name     = google_cloudfunctions2_function.completion.name
  role     = "roles/run.invoker"
  member   = google_service_account.events.member
}

# Pub/Sub mints the push tokens Eventarc deliveries carry, as the events account only.
resource "google_service_account_iam_member" "pubsub_tokens_for_events" {
  service_account_id = google_service_account.events.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent
}

# Eventarc's Cloud Storage triggers need the project's Cloud Storage service agent to publish to Pub/Sub.
resource "google_project_iam_member" "gcs_agent_publisher" {
  project = var.project
  role    = "roles/pubsub.publisher"
  member  = local.gcs_service_agent
}

# ---------------------------------------------------------------- function builds (Cloud Build, as the build account)

resource "google_project_iam_member" "build_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}

resource "google_artifact_registry_repository_iam_member" "build_push" {
  project    = var.project
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

resource "google_storage_bucket_iam_member" "build_sources" {
  bucket = google_storage_bucket.sources.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}

# Cloud Functions copies each upload into its own gcf-v2-sources-<number>-<region> bucket before building: the build
# reads it there, and only there (IAM condition on the bucket name).
resource "google_project_iam_member" "build_gcf_sources" {
  project = var.project
  role    = "roles/storage.objectViewer"
  member  = google_service_account.build.member

  condition {
    title       = "gcf-v2-sources only"
    description = "Read the function sources Cloud Functions staged for this project, nothing else."
    expression  = "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-${data.google_project.this.number}-${local.region}\")"
  }
}
