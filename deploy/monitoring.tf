# Failed runs (issue 20): a bqx component that ends a run in failure logs jsonPayload.event="run_failed" at ERROR; a
# log-based metric counts those lines from the two functions (Cloud Run services named after them, as Cloud Functions
# gen2 runs them) and the two jobs, and an alert policy tells the channels in alert_notification_channels.

resource "google_logging_metric" "run_failed" {
  name    = "bqx/run_failed"
  project = var.project
  filter  = "jsonPayload.event=\"run_failed\" AND severity>=ERROR AND ((resource.type=\"cloud_run_revision\" AND resource.labels.service_name=(\"${google_cloudfunctions2_function.trigger.name}\" OR \"${google_cloudfunctions2_function.completion.name}\")) OR (resource.type=\"cloud_run_job\" AND resource.labels.job_name=(\"${google_cloud_run_v2_job.extract.name}\" OR \"${google_cloud_run_v2_job.merge.name}\")))"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "bqx failed runs"

    labels {
      key         = "pair"
      value_type  = "STRING"
      description = "The pair whose run failed."
    }
  }

  label_extractors = {
    pair = "EXTRACT(jsonPayload.pair)"
  }

  depends_on = [google_project_service.apis]
}

# A log-based metric is written against the monitored resource of its log lines, and a condition's filter names one
# resource type: one condition for the functions, one for the jobs.
resource "google_monitoring_alert_policy" "run_failed" {
  display_name          = "bqx: a run failed"
  project               = var.project
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "failed runs (functions)"
    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.run_failed.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  conditions {
    display_name = "failed runs (jobs)"
    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.run_failed.name}\" AND resource.type=\"cloud_run_job\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    content   = "A bqx run failed. `bqx status <pair>` (or runs/<pair>/<run>/error.json in the staging bucket) says why and how to retry."
    mime_type = "text/markdown"
  }

  alert_strategy {
    auto_close = "86400s"
  }
}
