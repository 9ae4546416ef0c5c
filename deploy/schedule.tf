# Daily runs (issue 20): Cloud Scheduler publishes one request naming the pairs to the requests topic, where the
# trigger function takes it like any other request. Created paused; `schedule_enabled = true` turns it on.
# Cloud Scheduler publishes as its own service agent, whose role (granted by Google) carries pubsub.topics.publish.

resource "google_cloud_scheduler_job" "daily" {
  name        = "bqx-daily-run"
  project     = var.project
  region      = local.region
  description = "Request a bqx run of the scheduled pairs."
  schedule    = var.schedule_cron
  time_zone   = var.schedule_time_zone
  paused      = !var.schedule_enabled

  pubsub_target {
    topic_name = google_pubsub_topic.requests.id
    data       = base64encode(jsonencode({ pairs = local.schedule_pairs, origin = "schedule" }))
  }

  lifecycle {
    precondition {
      condition     = length(local.schedule_pairs) > 0 && length(setsubtract(local.schedule_pairs, local.names.pairs)) == 0
      error_message = "schedule_pairs must name at least one pair, each one of names.json pairs."
    }
  }

  depends_on = [google_project_service.apis]
}
