# Requests ({"pair": "eurusd"}) arrive on the requests topic; messages the trigger function keeps failing on
# (transient errors it raises) end up on the dead-letter topic, held by a pull subscription for inspection.

resource "google_pubsub_topic" "requests" {
  name                       = local.request_topic
  project                    = var.project
  kms_key_name               = var.kms_key
  message_retention_duration = "604800s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  name                       = local.dead_letter_topic
  project                    = var.project
  kms_key_name               = var.kms_key
  message_retention_duration = "604800s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "dead_letters" {
  name                       = local.names.dead_letter_subscription
  project                    = var.project
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
  retain_acked_messages      = false
  ack_deadline_seconds       = 60

  expiration_policy {
    ttl = "" # never expires
  }
}

# Pub/Sub forwards undeliverable messages as its own service agent: it must publish to the dead-letter topic
# and acknowledge on the subscription Eventarc created for the requests trigger.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  project = var.project
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "requests_dead_letter_subscriber" {
  project      = var.project
  subscription = google_eventarc_trigger.requests.transport[0].pubsub[0].subscription
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}

# A run's end is announced here: the merge job on success; on failure whichever component ends the run (the
# trigger when Cloud Run refuses the extract, the completion function, either job). Each may publish here only.
resource "google_pubsub_topic" "run_events" {
  name                       = local.run_events_topic
  project                    = var.project
  kms_key_name               = var.kms_key
  message_retention_duration = "604800s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic_iam_member" "trigger_run_events" {
  project = var.project
  topic   = google_pubsub_topic.run_events.name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.trigger.member
}

resource "google_pubsub_topic_iam_member" "completion_run_events" {
  project = var.project
  topic   = google_pubsub_topic.run_events.name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.completion.member
}

resource "google_pubsub_topic_iam_member" "extract_run_events" {
  project = var.project
  topic   = google_pubsub_topic.run_events.name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.extract.member
}

resource "google_pubsub_topic_iam_member" "merge_run_events" {
  project = var.project
  topic   = google_pubsub_topic.run_events.name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.merge.member
}
