# The merge's scratch dataset: every table in it expires on its own, so a crashed merge leaves no lasting cost.
resource "google_bigquery_dataset" "temp" {
  project                     = var.project
  dataset_id                  = local.temp_dataset
  location                    = data.google_bigquery_dataset.warehouse.location # next to the data it joins
  description                 = "bqx merge temporary tables (expire after ${local.names.temp_table_expiration_days} day(s))"
  default_table_expiration_ms = local.names.temp_table_expiration_days * 86400000
  delete_contents_on_destroy  = true

  dynamic "default_encryption_configuration" {
    for_each = var.kms_key == null ? [] : [var.kms_key]
    content {
      kms_key_name = default_encryption_configuration.value
    }
  }

  depends_on = [google_project_service.apis]
}

# The warehouse dataset already exists (it is the pipeline's input); only the jobs' read access is managed here.
data "google_bigquery_dataset" "warehouse" {
  project    = var.project
  dataset_id = local.warehouse_dataset
}
