# The two Cloud Run jobs, with the original system's resources (names.json). Their args (the pair) and BQX_RUN_ID
# come per execution, as container overrides from the functions (or `gcloud run jobs execute --args`).

resource "google_cloud_run_v2_job" "extract" {
  name                = local.extract_job
  project             = var.project
  location            = local.region
  deletion_protection = var.deletion_protection
  launch_stage        = "GA"

  template {
    task_count  = local.extract_task_count
    parallelism = local.extract_task_count

    template {
      service_account = google_service_account.extract.email
      timeout         = "${local.names.jobs.extract.timeout_seconds}s"
      max_retries     = local.extract_max_retries

      containers {
        image = local.extract_image

        resources {
          limits = {
            cpu    = local.names.jobs.extract.cpu
            memory = local.names.jobs.extract.memory
          }
        }

        dynamic "env" {
          for_each = local.extract_env
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_job" "merge" {
  name                = local.merge_job
  project             = var.project
  location            = local.region
  deletion_protection = var.deletion_protection
  launch_stage        = "GA"

  template {
    task_count  = local.merge_task_count
    parallelism = 1

    template {
      service_account = google_service_account.merge.email
      timeout         = "${local.names.jobs.merge.timeout_seconds}s"
      max_retries     = local.merge_max_retries

      containers {
        image = local.merge_image

        resources {
          limits = {
            cpu    = local.names.jobs.merge.cpu
            memory = local.names.jobs.merge.memory
          }
        }

        dynamic "env" {
          for_each = local.merge_env
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.apis]
}
