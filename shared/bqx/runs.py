"""A run's state, read from the buckets alone (works the same against the cloud and the local stack)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bqx import ids, layout, storage
from bqx.catalog import Manifest, family_of
from bqx.config import Settings
from bqx.errors import TerminalError


@dataclass
class RunState:
    pair: str
    run_id: str | None
    state: str  # none | requested | extracting | merging | done | failed
    expected: int = 0
    present: int = 0
    families: dict[str, list[int]] = field(default_factory=dict)  # family -> [present, expected]
    error: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    merge_execution: str | None = None
    extract_execution: str | None = None
    requested_at: float | None = None
    bytes: int = 0
    first_checkpoint_at: float | None = None
    last_checkpoint_at: float | None = None
    tables_per_second: float | None = None
    eta_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def submit(settings: Settings, pair: str, force: bool = False) -> str:
    """Drop requests/<pair>.json in the staging bucket; returns the run id the trigger will use."""
    blob = storage.bucket(settings, settings.staging_bucket).blob(layout.request(pair))
    body = {"pair": pair, "requested_by": "bqx", **({"force": True} if force else {})}
    blob.upload_from_string(storage.dumps(body), content_type="application/json")
    return ids.run_id_for_object(settings.staging_bucket, blob.name, blob.generation)


def latest_run(settings: Settings, pair: str) -> str | None:
    found = storage.read_json(settings, settings.staging_bucket, layout.latest(pair))
    return None if found is None else str(found[0].get("run_id"))


def active_run_id(settings: Settings, pair: str) -> str | None:
    """The pair's latest run id while it is active (the same rule the trigger applies), else None."""
    from bqx.handlers import active_run

    found = storage.read_json(settings, settings.staging_bucket, layout.latest(pair))
    if found is None:
        return None
    return str(found[0]["run_id"]) if active_run(settings, pair, found[0]) is not None else None


def state(settings: Settings, pair: str, run_id: str | None = None) -> RunState:
    s = settings
    pointer = storage.read_json(s, s.staging_bucket, layout.latest(pair))
    if run_id is None:
        if pointer is None:
            return RunState(pair, None, "none")
        run_id = str(pointer[0]["run_id"])
    rs = RunState(pair, run_id, "requested")
    if pointer and pointer[0].get("run_id") == run_id:
        rs.requested_at = pointer[0].get("requested_at")
    err = storage.read_json(s, s.staging_bucket, layout.run_error(pair, run_id))
    summary = storage.read_json(s, s.output_bucket, layout.summary(pair))
    if summary and summary[0].get("run_id") == run_id:
        rs.summary = summary[0]
    for stage in ("extract", "merge"):
        c = storage.read_json(s, s.staging_bucket, layout.claim(pair, run_id, stage))
        if c:
            setattr(rs, f"{stage}_execution", c[0].get("execution"))
    found = storage.read_json(s, s.staging_bucket, layout.manifest(pair, run_id))
    if found:
        manifest = Manifest.from_json(found[0])
        objects = storage.list_objects(s, s.staging_bucket, layout.checkpoints_prefix(pair, run_id))
        present = {n: v for n, v in objects.items() if n in manifest.expected_objects()}
        rs.expected, rs.present = len(manifest.tables), len(present)
        rs.bytes = sum(size for size, _ in present.values())
        if present:
            times = sorted(t for _, t in present.values())
            rs.first_checkpoint_at, rs.last_checkpoint_at = times[0], times[-1]
            start = float(found[0].get("created_at") or times[0])
            elapsed = max(time.time() if rs.present < rs.expected else times[-1], times[-1]) - start
            if elapsed > 0:
                rs.tables_per_second = round(rs.present / elapsed, 3)
                rs.eta_seconds = round((rs.expected - rs.present) / rs.tables_per_second, 1)
        for t in manifest.tables:
            fam = rs.families.setdefault(family_of(t.name), [0, 0])
            fam[1] += 1
            fam[0] += t.checkpoint in present
        rs.state = "extracting"
        if rs.present == rs.expected:
            rs.state = "merging"
    elif rs.extract_execution:
        rs.state = "extracting"
    if rs.summary:
        rs.state = "done"
    elif err:
        rs.error, rs.state = err[0], "failed"
    return rs


def follow(settings: Settings, pair: str, run_id: str, timeout: float, on_update=None, poll: float = 0.5):  # type: ignore[no-untyped-def]
    """Poll until the run is done or failed; returns the final RunState."""
    deadline = time.time() + timeout
    while True:
        rs = state(settings, pair, run_id)
        if on_update:
            on_update(rs)
        if rs.state in ("done", "failed"):
            return rs
        if time.time() > deadline:
            raise TerminalError(
                f"{pair}: run {run_id} still {rs.state} after {timeout:.0f}s "
                f"({rs.present}/{rs.expected} checkpoints); see `bqx status {pair}`"
            )
        time.sleep(poll)
