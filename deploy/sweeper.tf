# The sweeper (issue 17.5): a job killed from outside (out of memory, its task timeout, a lost instance) records
# nothing, and an extract killed before its report never starts the completion function's handoff. Every
# `sweep_interval_minutes`, Cloud Scheduler posts a `bqx.sweep` CloudEvent to the completion function, which asks
# the Run API how each active run's recorded executions ended: one that failed is recorded in the run's error.json
# (stage, cause, retry command), and an extract that finished with no merge started has its handoff re-driven
# (bqx.sweeper). The completion function already reads run state, writes error.json and merge.claim, and starts
# the merge; the sweep adds only reading executions of the two jobs. Separate from the daily schedule (schedule.tf).

resource "google_service_account" "sweeper" {
  project      = var.project
  account_id   = local.names.service_accounts.sweeper
  display_name = "bqx sweeper schedule (invokes the completion function's sweep)"
}

resource "google_cloud_scheduler_job" "sweep" {
  name             = "bqx-sweep"
  project          = var.project
  region           = local.region
  description      = "Record runs whose job died without a word; re-drive lost handoffs (bqx.sweeper)."
  schedule         = "*/${var.sweep_interval_minutes} * * * *"
  time_zone        = "Etc/UTC"
  attempt_deadline = "300s"

  retry_config {
    retry_count = 1
  }

  # A CloudEvent in binary mode: the function's framework reads these headers; the body is the event's data.
  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.completion.service_config[0].uri
    body        = base64encode(jsonencode({ sweep = true }))
    headers = {
      "Content-Type"   = "application/json"
      "ce-specversion" = "1.0"
      "ce-type"        = "bqx.sweep"
      "ce-source"      = "//cloudscheduler.googleapis.com/projects/${var.project}/locations/${local.region}/jobs/bqx-sweep"
      "ce-id"          = "bqx-sweep"
    }
    oidc_token {
      service_account_email = google_service_account.sweeper.email
      audience              = google_cloudfunctions2_function.completion.service_config[0].uri
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_service_iam_member" "sweeper_invoke_completion" {
  project  = var.project
  location = local.region
  name     = google_cloudfunctions2_function.completion.name
  role     = "roles/run.invoker"
  member   = google_service_account.sweeper.member
}

# How an execution ended (get_execution), bound per job: nothing else of Cloud Run.
resource "google_project_iam_custom_role" "execution_reader" {
  project     = var.project
  role_id     = "bqxExecutionReader"
  title       = "bqx execution reader"
  description = "Read a Cloud Run job's executions (how each ended). Bound per job."
  permissions = ["run.executions.get"]
}

resource "google_cloud_run_v2_job_iam_member" "completion_read_extract_executions" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.extract.name
  role     = google_project_iam_custom_role.execution_reader.id
  member   = google_service_account.completion.member
}

resource "google_cloud_run_v2_job_iam_member" "completion_read_merge_executions" {
  project  = var.project
  location = local.region
  name     = google_cloud_run_v2_job.merge.name
  role     = google_project_iam_custom_role.execution_reader.id
  member   = google_service_account.completion.member
}
