# Three buckets, all with uniform bucket-level access and public access prevention enforced.
# staging: requests/, runs/, checkpoints/, quarantine/ (the pipeline's state). output: the training files.
# sources: the functions' source zips built by deploy/package_functions.py.

resource "google_storage_bucket" "staging" {
  # checkov:skip=CKV_GCP_62:Access logs would be written for every checkpoint and claim; Cloud Audit Logs (Data Access) is the documented alternative.
  # checkov:skip=CKV_GCP_78:Not versioned on purpose: claims are create-once objects guarded by generation preconditions and deleted on failed launches; noncurrent versions would only add cost.
  name                        = local.staging_bucket
  project                     = var.project
  location                    = upper(local.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  dynamic "encryption" {
    for_each = var.kms_key == null ? [] : [var.kms_key]
    content {
      default_kms_key_name = encryption.value
    }
  }

  lifecycle_rule {
    condition {
      age            = local.names.checkpoint_retention_days
      matches_prefix = ["checkpoints/", "quarantine/"]
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "output" {
  # checkov:skip=CKV_GCP_62:Access logs for one object per pair add little; Cloud Audit Logs (Data Access) cover reads if wanted.
  name                        = local.output_bucket
  project                     = var.project
  location                    = upper(local.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection

  versioning {
    enabled = true
  }

  dynamic "encryption" {
    for_each = var.kms_key == null ? [] : [var.kms_key]
    content {
      default_kms_key_name = encryption.value
    }
  }

  # Half-written merges live under tmp/<run_id>/ until published; anything left there is debris.
  lifecycle_rule {
    condition {
      age            = local.names.output_tmp_retention_days
      matches_prefix = ["tmp/"]
    }
    action {
      type = "Delete"
    }
  }

  # Keep the keep_versions newest superseded generations of each training file, not forever: a backstop beside the
  # per-run copies bqx keeps (versions/<pair>/<run>/, pruned to keep_versions by the merge job). No age rule beside
  # it: lifecycle rules are OR'ed, so one would cut the kept versions short.
  lifecycle_rule {
    condition {
      num_newer_versions = local.keep_versions
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "sources" {
  # checkov:skip=CKV_GCP_62:Holds only deployment artifacts uploaded by Terraform; access logs add nothing.
  name                        = local.sources_bucket
  project                     = var.project
  location                    = upper(local.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      num_newer_versions = 3
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}
