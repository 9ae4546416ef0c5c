# Service accounts and every role they hold. No primitive role (owner/editor/viewer) and nothing project-wide
# beyond bigquery.jobUser (jobs), eventarc.eventReceiver (Eventarc), logging.logWriter (builds) and the
# Google-managed Cloud Storage agent's pubsub.publisher, which Eventarc's storage triggers require.
# tests/test_deploy.py holds the allow-list each binding here is checked against.

resource "google_service_account" "jobs" {
  project      = var.project
  account_id   = local.names.service_accounts.jobs
  display_name = "bqx extract and merge jobs"
}

resource "google_service_account" "functions" {
  project      = var.project
  account_id   = local.names.service_accounts.functions
  display_name = "bqx trigger and completion functions"
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

# ---------------------------------------------------------------- jobs: read the warehouse, run queries,
# write checkpoints and run state to staging, publish to output, own the temp dataset's tables.

resource "google_bigquery_dataset_iam_member" "jobs_warehouse_reader" {
  project    = var.project
  dataset_id = data.google_bigquery_dataset.warehouse.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = google_service_account.jobs.member
}

resource "google_project_iam_member" "jobs_bigquery_jobs" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.jobs.member
}

resource "google_bigquery_dataset_iam_member" "jobs_temp_editor" {
  project    = var.project
  dataset_id = google_bigquery_dataset.temp.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = google_service_account.jobs.member
}

resource "google_storage_bucket_iam_member" "jobs_staging" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.jobs.member
}

resource "google_storage_bucket_iam_member" "jobs_output" {
  bucket = google_storage_bucket.output.name
  role   = "roles/storage.objectUser"
  member = google_service_account.jobs.member
}

# ---------------------------------------------------------------- functions: read/write staging objects (requests,
# manifests, claims, latest.json; list checkpoints) and start exactly these two jobs with overrides.

resource "google_storage_bucket_iam_member" "functions_staging" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = google_service_account.functions.member
}

# The trigger reads a pair's training_<pair>.summary.json to tell a finished run from an active one ("already
# running"); it may read those summaries and nothing else in the output bucket.
resource "google_storage_bucket_iam_member" "functions_output_summaries" {
  bucket = google_storage_bucket.output.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.functions.member

  condition {
    title       = "run summaries only"
    description = "training_<pair>.summary.json in the output bucket, not the training files."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.output.name}/objects/training_\") && resource.name.endsWith(\".summary.json\")"
  }
}

# run.jobs.runWithOverrides stays: an execution needs its pair (container args) and run id (BQX_RUN_ID), which only
# overrides carry. What an override could do beyond that is closed elsewhere: the functions pass only the pair, the run
# id and a task count (bqx.launch); the jobs run `python -I` (jobs/Dockerfile), so PYTHON* variables load nothing; and
# the job launcher is bound per job, to this account only.
resource "google_project_iam_custom_role" "job_launcher" {
  project     = var.project
  role_id     = "bqxJobLauncher"
  title       = "bqx job launcher"
  description = "Start a Cloud Run job execution with container overrides (args, env, task count). Bound per job."
  permissions = ["run.jobs.run", "run.jobs.runWithOverrides"]
}

resource "google_cloud_run_v2_job_iam_member" "functions_launch_extract" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.extract.name
  role     = google_project_iam_custom_role.job_launcher.id
  member   = google_service_account.functions.member
}

resource "google_cloud_run_v2_job_iam_member" "functions_launch_merge" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.merge.name
  role     = google_project_iam_custom_role.job_launcher.id
  member   = google_service_account.functions.member
}

# Starting a job that runs as the jobs' account means acting as it (iam.serviceAccounts.actAs), on that account only.
resource "google_service_account_iam_member" "functions_act_as_jobs" {
  service_account_id = google_service_account.jobs.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.functions.member
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
