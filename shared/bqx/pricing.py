"""List prices used for every cost figure bqx shows, in one place (USD, us-central1, on-demand).

Sources: BigQuery on-demand analysis per TiB scanned; Cloud Run jobs (tier 1) per vCPU-second and per
GiB-second of memory; Cloud Storage class A operations. Prices change: these are estimates, not invoices.
The jobs' resources (vCPUs, memory) are the ones deploy/names.json gives Cloud Run, read from the checkout when a
cost is first computed (the CLI and reports do; the job image, which has no deploy/, only uses the prices).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bqx.errors import ConfigError

BIGQUERY_PER_TIB_SCANNED = 6.25
CLOUD_RUN_PER_VCPU_SECOND = 0.000018
CLOUD_RUN_PER_GIB_SECOND = 0.000002
GCS_PER_1000_CLASS_A = 0.005
TIB = 1 << 40

NAMES_JSON = Path(__file__).resolve().parents[2] / "deploy" / "names.json"
_MEMORY_UNITS = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / (1 << 30), "M": 1e6 / (1 << 30)}


@dataclass(frozen=True)
class Resources:
    vcpu: float
    gib: float

    @property
    def usd_per_second(self) -> float:
        return self.vcpu * CLOUD_RUN_PER_VCPU_SECOND + self.gib * CLOUD_RUN_PER_GIB_SECOND


def _gib(memory: str) -> float:
    """Cloud Run's memory limit ('8Gi', '512Mi') in GiB."""
    unit = next((u for u in _MEMORY_UNITS if memory.endswith(u)), None)
    if unit is None:
        raise ConfigError(f"names.json: memory {memory!r} is not in Gi or Mi")
    return float(memory[: -len(unit)]) * _MEMORY_UNITS[unit]


@functools.cache
def resources(job: str) -> Resources:
    """The `extract` or `merge` job's vCPUs and memory, as deploy/names.json deploys them."""
    try:
        spec = json.loads(NAMES_JSON.read_text())["jobs"][job]
    except FileNotFoundError:
        raise ConfigError(f"pricing needs the checkout's {NAMES_JSON} (the jobs' resources)") from None
    return Resources(float(spec["cpu"]), _gib(spec["memory"]))


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
        return self.extract_seconds * self.extract_tasks * resources("extract").usd_per_second

    @property
    def merge_usd(self) -> float:
        return self.merge_seconds * resources("merge").usd_per_second

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
