# names.json is the single source of names and defaults; a variable left null falls back to it.
locals {
  names = jsondecode(file("${path.module}/names.json"))

  region            = coalesce(var.region, local.names.settings.region)
  staging_bucket    = coalesce(var.staging_bucket, local.names.settings.staging_bucket)
  output_bucket     = coalesce(var.output_bucket, local.names.settings.output_bucket)
  sources_bucket    = coalesce(var.sources_bucket, "${local.staging_bucket}${local.names.sources_bucket_suffix}")
  warehouse_dataset = coalesce(var.warehouse_dataset, local.names.settings.dataset)
  temp_dataset      = coalesce(var.temp_dataset, local.names.settings.temp_dataset)
  extract_job       = local.names.settings.extract_job
  merge_job         = local.names.settings.merge_job
  request_topic     = local.names.settings.request_topic
  dead_letter_topic = local.names.settings.dead_letter_topic
  run_events_topic  = local.names.settings.run_events_topic
  keep_versions     = coalesce(var.keep_versions, local.names.settings.keep_versions)
  merge_method      = coalesce(var.merge_method, local.names.settings.merge_method)
  pairs             = coalesce(var.pairs, local.names.pairs)
  schedule_pairs    = coalesce(var.schedule_pairs, local.names.pairs)

  extract_task_count  = coalesce(var.extract_task_count, local.names.jobs.extract.task_count)
  extract_max_retries = coalesce(var.extract_max_retries, local.names.settings.task_max_retries)
  merge_task_count    = coalesce(var.merge_task_count, local.names.jobs.merge.task_count)
  merge_max_retries   = coalesce(var.merge_max_retries, local.names.settings.task_max_retries)

  registry_host = "${local.region}-docker.pkg.dev"
  image_base    = "${local.registry_host}/${var.project}/${google_artifact_registry_repository.images.repository_id}"
  extract_image = "${local.image_base}/${local.names.images.extract}:${var.image_tag}"
  merge_image   = "${local.image_base}/${local.names.images.merge}:${var.image_tag}"

  # Environment both functions and both jobs read through bqx.config.Settings.from_env.
  common_env = {
    BQX_PROJECT             = var.project
    BQX_REGION              = local.region
    BQX_STAGING_BUCKET      = local.staging_bucket
    BQX_OUTPUT_BUCKET       = local.output_bucket
    BQX_EXTRACT_JOB         = local.extract_job
    BQX_MERGE_JOB           = local.merge_job
    BQX_REQUEST_TOPIC       = local.request_topic
    BQX_DEAD_LETTER_TOPIC   = local.dead_letter_topic
    BQX_RUN_EVENTS_TOPIC    = local.run_events_topic
    BQX_MAX_ACTIVE_EXTRACTS = tostring(local.names.settings.max_active_extracts)
    BQX_CLAIM_LEASE_SECONDS = tostring(local.names.settings.claim_lease_seconds)
    BQX_KEEP_VERSIONS       = tostring(local.keep_versions)
  }

  # What only the jobs read (the warehouse dataset is read in the deployment project).
  job_env = merge(local.common_env, {
    BQX_WAREHOUSE    = "bigquery"
    BQX_DATASET      = local.warehouse_dataset
    BQX_TEMP_DATASET = local.temp_dataset
    BQX_ROW_LIMIT    = tostring(var.row_limit)
  })

  extract_env = merge(local.job_env, {
    BQX_TASK_MAX_RETRIES = tostring(local.extract_max_retries)
  })

  merge_env = merge(local.job_env, {
    BQX_TASK_MAX_RETRIES = tostring(local.merge_max_retries)
    BQX_MEMORY_BUDGET    = local.names.jobs.merge.memory_budget
    MERGE_METHOD         = local.merge_method
  })

  gcs_service_agent    = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

data "google_project" "this" {
  project_id = var.project
}

data "google_storage_project_service_account" "gcs" {
  project = var.project
}
