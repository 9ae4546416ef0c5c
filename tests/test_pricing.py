"""Cost arithmetic at the list prices stated in bqx.pricing, for the jobs' resources as deploy/names.json sets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bqx import pricing

NAMES = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "names.json").read_text())


def _gib(memory: str) -> float:  # this test's own reading of Cloud Run's "8Gi" / "512Mi"
    return float(memory[:-2]) / (1024 if memory.endswith("Mi") else 1)


def test_bigquery_cost_is_per_tib_scanned() -> None:
    c = pricing.Cost(bigquery_bytes=pricing.TIB * 2, extract_seconds=0, merge_seconds=0)
    assert c.bigquery_usd == pytest.approx(2 * pricing.BIGQUERY_PER_TIB_SCANNED)


def test_cloud_run_cost_uses_each_jobs_resources() -> None:
    c = pricing.Cost(0, extract_seconds=100, merge_seconds=50, extract_tasks=2)
    extract, merge = NAMES["jobs"]["extract"], NAMES["jobs"]["merge"]
    per_extract_second = (float(extract["cpu"]) * pricing.CLOUD_RUN_PER_VCPU_SECOND
                          + _gib(extract["memory"]) * pricing.CLOUD_RUN_PER_GIB_SECOND)
    per_merge_second = (float(merge["cpu"]) * pricing.CLOUD_RUN_PER_VCPU_SECOND
                        + _gib(merge["memory"]) * pricing.CLOUD_RUN_PER_GIB_SECOND)
    assert c.extract_usd == pytest.approx(200 * per_extract_second)
    assert c.merge_usd == pytest.approx(50 * per_merge_second)
    assert c.total_usd == pytest.approx(c.extract_usd + c.merge_usd)
    assert c.to_json()["total_usd"] == pytest.approx(round(c.total_usd, 6))


def test_logical_bytes() -> None:
    cols = [("interval_time", "TIMESTAMP"), ("a", "DOUBLE"), ("flag", "BOOLEAN")]
    assert pricing.logical_bytes(cols, 1000) == 1000 * (8 + 8 + 1)


def test_resources_are_the_deployed_ones() -> None:
    """A job's memory in names.json changes what its seconds cost (the file pricing reads is deploy's own)."""
    assert pricing.NAMES_JSON.resolve() == (Path(__file__).resolve().parents[1] / "deploy" / "names.json").resolve()
    assert (pricing.resources("extract").vcpu, pricing.resources("extract").gib) == (4.0, 8.0)
    assert (pricing.resources("merge").vcpu, pricing.resources("merge").gib) == (1.0, 2.0)
    assert pricing._gib("512Mi") == 0.5
