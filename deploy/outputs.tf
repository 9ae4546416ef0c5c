output "staging_bucket" {
  value = google_storage_bucket.staging.name
}

output "output_bucket" {
  value = google_storage_bucket.output.name
}

output "request_topic" {
  value = google_pubsub_topic.requests.name
}

output "requests_subscription" {
  description = "Subscription Eventarc created for the requests trigger; docs/DEPLOY.md attaches the dead-letter topic to it."
  value       = google_eventarc_trigger.requests.transport[0].pubsub[0].subscription
}

output "dead_letter_topic" {
  value = google_pubsub_topic.dead_letter.id
}

output "extract_job" {
  value = google_cloud_run_v2_job.extract.name
}

output "merge_job" {
  value = google_cloud_run_v2_job.merge.name
}

output "images" {
  description = "Where deploy/cloudbuild.yaml pushes the job images."
  value       = { extract = local.extract_image, merge = local.merge_image }
}

output "service_accounts" {
  description = "The account each component runs as."
  value = {
    trigger    = google_service_account.trigger.email
    completion = google_service_account.completion.email
    extract    = google_service_account.extract.email
    merge      = google_service_account.merge.email
  }
}

output "request_commands" {
  description = "One way to start each pair: upload a request object."
  value = {
    for p in local.pairs : p => "echo '{\"pair\": \"${p}\"}' | gcloud storage cp - gs://${google_storage_bucket.staging.name}/requests/${p}.json"
  }
}
