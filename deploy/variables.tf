# Every variable whose default is null takes its default from names.json (see locals.tf), the file the code's
# settings are tested against, so Terraform and bqx.config cannot drift apart.

variable "project" {
  description = "Google Cloud project id to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the buckets, functions, jobs, registry and Eventarc triggers (default: names.json)."
  type        = string
  default     = null
}

variable "staging_bucket" {
  description = "Staging bucket: requests, run manifests, claims, checkpoints (globally unique; default: names.json)."
  type        = string
  default     = null
}

variable "output_bucket" {
  description = "Output bucket: training_<pair>.parquet and its summary (globally unique; default: names.json)."
  type        = string
  default     = null
}

variable "sources_bucket" {
  description = "Bucket holding the functions' source zips (default: <staging_bucket>-fn-sources)."
  type        = string
  default     = null
}

variable "warehouse_dataset" {
  description = "Existing BigQuery dataset with every pair's feature and targets tables (default: names.json)."
  type        = string
  default     = null
}

variable "temp_dataset" {
  description = "BigQuery dataset for the merge's temporary tables, created here (default: names.json)."
  type        = string
  default     = null
}

variable "pairs" {
  description = "Currency pairs to print trigger commands for (default: every pair in names.json, which equals bqx.pairs)."
  type        = list(string)
  default     = null

  validation {
    condition     = alltrue([for p in coalesce(var.pairs, []) : can(regex("^[a-z]{6}$", p))])
    error_message = "Each pair is six lower-case letters, e.g. eurusd."
  }
}

variable "image_tag" {
  description = "Tag of the job images in the Artifact Registry repository (built by deploy/cloudbuild.yaml)."
  type        = string
  default     = "latest"
}

variable "extract_task_count" {
  description = "Tasks per extract execution; tables are sharded across them by CLOUD_RUN_TASK_INDEX."
  type        = number
  default     = null
}

variable "extract_max_retries" {
  description = "Cloud Run retries per extract task (also BQX_TASK_MAX_RETRIES; default: names.json)."
  type        = number
  default     = null
}

variable "merge_task_count" {
  description = "Tasks per merge execution. The merge publishes one file, so it runs as one task."
  type        = number
  default     = null

  validation {
    condition     = var.merge_task_count == null || var.merge_task_count == 1
    error_message = "The merge job writes one training file and must run as a single task."
  }
}

variable "merge_max_retries" {
  description = "Cloud Run retries per merge task (also BQX_TASK_MAX_RETRIES; default: names.json)."
  type        = number
  default     = null
}

variable "merge_method" {
  description = "Merge method the merge job uses: auto (compose for aligned runs, else stream), stream, compose, polars or bigquery (MERGE_METHOD; default: names.json)."
  type        = string
  default     = null

  validation {
    condition     = contains(["auto", "stream", "compose", "polars", "bigquery"], coalesce(var.merge_method, "auto"))
    error_message = "merge_method is one of auto, stream, compose, polars, bigquery."
  }
}

variable "row_limit" {
  description = "Rows read per table (0 = all; the original runs sampled ~100000)."
  type        = number
  default     = 0
}

variable "deletion_protection" {
  description = "Protect the jobs and the output bucket's contents from terraform destroy."
  type        = bool
  default     = true
}

variable "kms_key" {
  description = "Optional Cloud KMS key (projects/.../cryptoKeys/...) for buckets, topics and the temp dataset; null = Google-managed keys."
  type        = string
  default     = null
}

# ---------------------------------------------------------------- daily runs and their alerting (issue 20)

variable "schedule_enabled" {
  description = "Run the scheduled pairs on schedule_cron (the Cloud Scheduler job exists either way, paused when false)."
  type        = bool
  default     = false
}

variable "schedule_cron" {
  description = "When the scheduled run is requested (unix-cron)."
  type        = string
  default     = "0 2 * * *"
}

variable "schedule_time_zone" {
  description = "Time zone of schedule_cron (tz database name)."
  type        = string
  default     = "Etc/UTC"
}

variable "schedule_pairs" {
  description = "Pairs the scheduled run requests (default: all pairs in names.json)."
  type        = list(string)
  default     = null
}

variable "alert_notification_channels" {
  description = "Monitoring notification channel ids (projects/<p>/notificationChannels/<id>) told when a run fails."
  type        = list(string)
  default     = []
}

variable "keep_versions" {
  description = "Published runs of each pair kept reachable (versions/<pair>/<run>/, bqx history/get/restore; BQX_KEEP_VERSIONS), and superseded generations of the current file kept as a backstop (default: names.json)."
  type        = number
  default     = null

  validation {
    condition     = coalesce(var.keep_versions, 1) >= 1
    error_message = "keep_versions must be at least 1."
  }
}

variable "sweep_interval_minutes" {
  description = "How often the sweeper asks Cloud Run how active runs' jobs ended (sweeper.tf), in minutes (1-59)."
  type        = number
  default     = 10
  validation {
    condition     = var.sweep_interval_minutes >= 1 && var.sweep_interval_minutes <= 59
    error_message = "sweep_interval_minutes must be between 1 and 59."
  }
}
