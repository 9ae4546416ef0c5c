"""List prices used for every cost figure bqx shows, in one place (USD, us-central1, on-demand).

Sources: BigQuery on-demand analysis per TiB scanned; Cloud Run jobs (tier 1) per vCPU-second and per
GiB-second of memory; Cloud Storage class A operations. Prices change: these are estimates, not invoices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BIGQUERY_PER_TIB_SCANNED = 6.25
CLOUD_RUN_PER_VCPU_SECOND = 0.000018
CLOUD_RUN_PER_GIB_SECOND = 0.000002
GCS_PER_1000_CLASS_A = 0.005
TIB = 1 << 40

# The jobs' resources, as deploy/ sets them (DESIGN.md).
EXTRACT_VCPU, EXTRACT_GIB = 4, 8
MERGE_VCPU, MERGE_GIB = 1, 2


@dataclass(frozen=True)
class Cost:
    bigquery_bytes: int
    extract_seconds: float
    merge_seconds: float
    extract_tasks: int = 1
    objects_written: int = 0

    @property
    def bigquery_usd(self) -> float:
        return self.bigquery_bytes / TIB * BIGQUERY_PER_TIB_SCANNED

    @property
    def extract_usd(self) -> float:
        s = self.extract_seconds * self.extract_tasks
        return s * (EXTRACT_VCPU * CLOUD_RUN_PER_VCPU_SECOND + EXTRACT_GIB * CLOUD_RUN_PER_GIB_SECOND)

    @property
    def merge_usd(self) -> float:
        return self.merge_seconds * (MERGE_VCPU * CLOUD_RUN_PER_VCPU_SECOND + MERGE_GIB * CLOUD_RUN_PER_GIB_SECOND)

    @property
    def storage_ops_usd(self) -> float:
        return self.objects_written / 1000 * GCS_PER_1000_CLASS_A

    @property
    def total_usd(self) -> float:
        return self.bigquery_usd + self.extract_usd + self.merge_usd + self.storage_ops_usd

    def to_json(self) -> dict[str, float]:
        out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        for k in ("bigquery_usd", "extract_usd", "merge_usd", "storage_ops_usd", "total_usd"):
            out[k] = round(getattr(self, k), 6)
        out["prices"] = {"bigquery_per_tib": BIGQUERY_PER_TIB_SCANNED, "run_vcpu_second": CLOUD_RUN_PER_VCPU_SECOND,
                         "run_gib_second": CLOUD_RUN_PER_GIB_SECOND, "gcs_per_1000_class_a": GCS_PER_1000_CLASS_A}
        return out


def logical_bytes(columns: list[tuple[str, str]], rows: int) -> int:
    """Bytes BigQuery bills for scanning these columns: 8 per numeric/timestamp value, a guess for strings."""
    width = {"bool": 1, "boolean": 1}
    return rows * sum(width.get(t.lower(), 16 if "string" in t.lower() or "varchar" in t.lower() else 8)
                      for _, t in columns)
