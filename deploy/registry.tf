# Job images (bqx-ml-extract, bqx-ml-merge) and the functions' build images live in one Docker repository.
resource "google_artifact_registry_repository" "images" {
  project       = var.project
  location      = local.region
  repository_id = local.names.artifact_repository
  format        = "DOCKER"
  description   = "bqx job images and function builds"
  kms_key_name  = var.kms_key

  docker_config {
    immutable_tags = false
  }

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  depends_on = [google_project_service.apis]
}
