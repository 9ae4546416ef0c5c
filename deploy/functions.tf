# The two functions (Cloud Functions gen2). Their source is functions/<name>/main.py plus a copy of shared/bqx and a
# pinned requirements.txt, zipped by deploy/package_functions.py into build/functions/<name>.zip before `apply`.
#
# Eventarc's Cloud Storage triggers filter by bucket, not by prefix: both functions see every object finalized in the
# staging bucket and ignore what is not theirs (trigger: requests/*.json; completion: checkpoints/...).

locals {
  function_zip = {
    for name, fn in local.names.functions : name => "${path.module}/../build/functions/${name}.zip"
  }
}

resource "google_storage_bucket_object" "function_source" {
  for_each = local.function_zip
  # The object name carries the zip's hash, so a changed source is a new object and the function redeploys.
  name   = "${each.key}/${filemd5(each.value)}.zip"
  bucket = google_storage_bucket.sources.name
  source = each.value
}

resource "google_cloudfunctions2_function" "trigger" {
  name     = local.names.functions.trigger.entry_point
  project  = var.project
  location = local.region

  build_config {
    runtime           = local.names.runtime
    entry_point       = local.names.functions.trigger.entry_point
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.images.id

    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.function_source["trigger"].name
      }
    }
  }

  service_config {
    service_account_email          = google_service_account.trigger.email
    available_memory               = local.names.functions.trigger.memory
    timeout_seconds                = local.names.functions.trigger.timeout_seconds
    max_instance_count             = local.names.functions.trigger.max_instances
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    environment_variables          = local.common_env
  }

  # Request objects: gs://<staging>/requests/<pair>.json finalized.
  event_trigger {
    trigger_region        = local.region
    event_type            = local.names.event_types.object_finalized
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.events.email

    event_filters {
      attribute = "bucket"
      value     = google_storage_bucket.staging.name
    }
  }

  depends_on = [
    google_project_iam_member.events_receiver,
    google_project_iam_member.gcs_agent_publisher,
    google_project_iam_member.build_logs,
    google_project_iam_member.build_gcf_sources,
    google_artifact_registry_repository_iam_member.build_push,
    google_storage_bucket_iam_member.build_sources,
  ]
}

# The trigger function's second trigger: {"pair": ...} messages on the requests topic. Eventarc creates the Pub/Sub
# subscription; its name is an output, and docs/DEPLOY.md attaches the dead-letter policy to it.
resource "google_eventarc_trigger" "requests" {
  name            = "${local.names.functions.trigger.entry_point}-requests"
  project         = var.project
  location        = local.region
  service_account = google_service_account.events.email

  matching_criteria {
    attribute = "type"
    value     = local.names.event_types.pubsub_published
  }

  destination {
    cloud_run_service {
      service = google_cloudfunctions2_function.trigger.name
      region  = local.region
    }
  }

  transport {
    pubsub {
      topic = google_pubsub_topic.requests.id
    }
  }

  depends_on = [google_project_iam_member.events_receiver]
}

resource "google_cloudfunctions2_function" "completion" {
  name     = local.names.functions.completion.entry_point
  project  = var.project
  location = local.region

  build_config {
    runtime           = local.names.runtime
    entry_point       = local.names.functions.completion.entry_point
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.images.id

    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.function_source["completion"].name
      }
    }
  }

  service_config {
    service_account_email          = google_service_account.completion.email
    available_memory               = local.names.functions.completion.memory
    timeout_seconds                = local.names.functions.completion.timeout_seconds
    max_instance_count             = local.names.functions.completion.max_instances
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    environment_variables          = local.common_env
  }

  # Checkpoints: gs://<staging>/checkpoints/<pair>/<run_id>/<table>.parquet finalized.
  event_trigger {
    trigger_region        = local.region
    event_type            = local.names.event_types.object_finalized
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.events.email

    event_filters {
      attribute = "bucket"
      value     = google_storage_bucket.staging.name
    }
  }

  depends_on = [
    google_project_iam_member.events_receiver,
    google_project_iam_member.gcs_agent_publisher,
    google_project_iam_member.build_logs,
    google_project_iam_member.build_gcf_sources,
    google_artifact_registry_repository_iam_member.build_push,
    google_storage_bucket_iam_member.build_sources,
  ]
}
