"""Cost arithmetic at the list prices stated in bqx.pricing."""

from __future__ import annotations

import pytest

from bqx import pricing


def test_bigquery_cost_is_per_tib_scanned() -> None:
    c = pricing.Cost(bigquery_bytes=pricing.TIB * 2, extract_seconds=0, merge_seconds=0)
    assert c.bigquery_usd == pytest.approx(2 * pricing.BIGQUERY_PER_TIB_SCANNED)


def test_cloud_run_cost_uses_each_jobs_resources() -> None:
    c = pricing.Cost(0, extract_seconds=100, merge_seconds=50, extract_tasks=2)
    per_extract_second = 4 * pricing.CLOUD_RUN_PER_VCPU_SECOND + 8 * pricing.CLOUD_RUN_PER_GIB_SECOND
    per_merge_second = 1 * pricing.CLOUD_RUN_PER_VCPU_SECOND + 2 * pricing.CLOUD_RUN_PER_GIB_SECOND
    assert c.extract_usd == pytest.approx(200 * per_extract_second)
    assert c.merge_usd == pytest.approx(50 * per_merge_second)
    assert c.total_usd == pytest.approx(c.extract_usd + c.merge_usd)
    assert c.to_json()["total_usd"] == pytest.approx(round(c.total_usd, 6))


def test_logical_bytes() -> None:
    cols = [("interval_time", "TIMESTAMP"), ("a", "DOUBLE"), ("flag", "BOOLEAN")]
    assert pricing.logical_bytes(cols, 1000) == 1000 * (8 + 8 + 1)
