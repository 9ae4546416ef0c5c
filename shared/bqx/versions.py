"""Every published training file stays reachable by run, with its schema and the drift against the run before.

Beside training_<pair>.parquet the merge publishes training_<pair>.schema.json: every column with its Arrow type and
the warehouse table it came from, and each table's row count at extraction. Each published run is also kept as
versions/<pair>/<run>/training_<pair>.{parquet,summary.json,schema.json} (per-run objects, not bucket generations:
see README "Kept versions"); the newest `keep_versions` runs are kept, older ones deleted when a run is published.
A run's summary carries its drift against the pair's previously published run; `restore` makes a kept run current
again through the same server-side copy, recorded in the summary (restored_from).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bqx import layout
from bqx.catalog import KEY, Manifest
from bqx.config import Settings
from bqx.errors import TerminalError, TransientError
from bqx.gcp import storage
from bqx.logs import Log

log = Log("bqx.versions")


# ------------------------------------------------------------------------------------------------ schema and drift
def schema_of(manifest: Manifest) -> dict[str, Any]:
    """The training file's columns in file order (key, targets, then each feature table's), each with its type and
    source table, and each table's rows as the source counted them (its fingerprint), as training_<pair>.schema.json."""
    t = manifest.targets
    key_type = next((c.type for c in t.columns if c.name == KEY), "timestamp[us, tz=UTC]")
    columns = [{"name": KEY, "type": key_type, "table": t.name}]
    columns += [{"name": c.name, "type": c.type, "table": t.name} for c in t.value_columns]
    for f in manifest.features:
        prefix = layout.prefix_of(manifest.pair, f.name)
        columns += [{"name": f"{prefix}_{c.name}", "type": c.type, "table": f.name} for c in f.value_columns]
    tables = {x.name: {"role": x.role, "columns": len(x.value_columns), "rows": _rows(x.fingerprint)}
              for x in manifest.tables}
    return {"pair": manifest.pair, "run_id": manifest.run_id, "columns": columns, "tables": tables}


def _rows(fingerprint: str) -> int | None:
    parts = fingerprint.split("/")  # <version>/<rows>/<schema digest> (bqx.extract.sources.fingerprint)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def drift(before: dict[str, Any], after: dict[str, Any], rows_before: int | None,
          rows_after: int | None) -> dict[str, Any]:
    """What changed from one published schema (and row count) to the next."""
    old = {c["name"]: c for c in before.get("columns", [])}
    new = {c["name"]: c for c in after.get("columns", [])}
    old_tables, new_tables = before.get("tables", {}), after.get("tables", {})
    table_rows = {name: {"before": old_tables[name].get("rows"), "after": t.get("rows")}
                  for name, t in new_tables.items()
                  if name in old_tables and old_tables[name].get("rows") != t.get("rows")}
    out = {
        "against_run": before.get("run_id"),
        "columns_added": sorted(set(new) - set(old)),
        "columns_removed": sorted(set(old) - set(new)),
        "columns_retyped": [{"column": n, "before": old[n]["type"], "after": new[n]["type"]}
                            for n in sorted(set(old) & set(new)) if old[n]["type"] != new[n]["type"]],
        "rows": {"before": rows_before, "after": rows_after,
                 "change": None if rows_before is None or rows_after is None else rows_after - rows_before},
        "tables_added": sorted(set(new_tables) - set(old_tables)),
        "tables_removed": sorted(set(old_tables) - set(new_tables)),
        "table_rows_changed": table_rows,
    }
    out["changed"] = bool(out["columns_added"] or out["columns_removed"] or out["columns_retyped"]
                          or out["tables_added"] or out["tables_removed"] or table_rows or out["rows"]["change"])
    return out


def describe(d: dict[str, Any] | None) -> list[str]:
    """Drift as lines for people (bqx report, bqx diff)."""
    if not d:
        return ["no earlier published run to compare with"]
    lines = [f"against run {d.get('against_run')}:"]
    r = d.get("rows") or {}
    lines.append(f"  rows: {r.get('before')} -> {r.get('after')} ({r.get('change'):+d})" if r.get("change") is not None
                 else f"  rows: {r.get('before')} -> {r.get('after')}")
    for key, label in (("columns_added", "columns added"), ("columns_removed", "columns removed"),
                       ("tables_added", "tables added"), ("tables_removed", "tables gone")):
        items = d.get(key) or []
        if items:
            lines.append(f"  {label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}")
    for c in d.get("columns_retyped") or []:
        lines.append(f"  retyped: {c['column']}: {c['before']} -> {c['after']}")
    for name, rows in sorted((d.get("table_rows_changed") or {}).items()):
        lines.append(f"  table {name}: rows {rows['before']} -> {rows['after']}")
    if not d.get("changed"):
        lines.append("  nothing changed")
    return lines


# ------------------------------------------------------------------------------------------------ publishing
def keep_file(s: Settings, pair: str, run_id: str, source: Any) -> None:
    """Copy the run's checked training file (`source`, a blob) to its kept version, server-side."""
    target = storage.bucket(s, s.output_bucket).blob(layout.version(pair, run_id))
    token, _, _ = target.rewrite(source)
    while token is not None:
        token, _, _ = target.rewrite(source, token=token)


def drift_since_published(s: Settings, manifest: Manifest, summary: dict[str, Any],
                          schema: dict[str, Any]) -> dict[str, Any] | None:
    """The run's drift (its `schema`: schema_of(manifest)) against the pair's currently published run (None for its
    first), read before publishing."""
    before = storage.read_json(s, s.output_bucket, layout.schema(manifest.pair))
    if before is None or before[0].get("run_id") == manifest.run_id:
        return None
    previous = storage.read_json(s, s.output_bucket, layout.summary(manifest.pair))
    rows_before = previous[0].get("rows") if previous and previous[0].get("run_id") == before[0]["run_id"] else None
    return drift(before[0], schema, rows_before, summary.get("rows"))


def keep_schema(s: Settings, manifest: Manifest, schema: dict[str, Any]) -> None:
    """Before publishing: the run's schema, kept by run. Readers of the current schema find it through the summary,
    which publishing then commits, so they never see the file without its schema."""
    storage.write_json(s, s.output_bucket, layout.version(manifest.pair, manifest.run_id, "schema.json"), schema)


def keep_published(s: Settings, manifest: Manifest, summary: dict[str, Any], schema: dict[str, Any]) -> None:
    """After publishing: training_<pair>.schema.json beside the file (for people and tools that look there), and the
    run's summary kept."""
    storage.write_json(s, s.output_bucket, layout.schema(manifest.pair), schema)
    keep_summary(s, summary)


def keep_summary(s: Settings, summary: dict[str, Any]) -> None:
    """Keep the run's summary beside its file, then delete versions beyond the newest `keep_versions`."""
    pair = summary["pair"]
    storage.write_json(s, s.output_bucket, layout.version(pair, summary["run_id"], "summary.json"), summary)
    for old in history(s, pair)[s.keep_versions:]:
        for kind in ("parquet", "summary.json", "schema.json"):
            try:
                storage.bucket(s, s.output_bucket).blob(layout.version(pair, old.run_id, kind)).delete()
            except Exception as exc:  # noqa: BLE001 - pruning is best effort; the next publish tries again
                log.debug(f"pruning {old.run_id}: {exc}")
        log.info("kept version pruned", pair=pair, run_id=old.run_id, keep_versions=s.keep_versions)


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Version:
    """One kept published run of a pair."""

    pair: str
    run_id: str
    published_at: float
    rows: int
    columns: int
    bytes: int
    crc32c: str
    cost_usd: float | None
    current: bool
    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "summary"}


def history(s: Settings, pair: str) -> list[Version]:
    """The pair's kept published runs, newest first, the current one marked."""
    current = storage.read_json(s, s.output_bucket, layout.summary(pair))
    current_run = current[0].get("run_id") if current else None
    out = []
    for name in storage.list_names(s, s.output_bucket, layout.versions_prefix(pair)):
        if not name.endswith(".summary.json"):
            continue
        found = storage.read_json(s, s.output_bucket, name)
        if found is None:
            continue
        x = found[0]
        out.append(Version(pair, str(x.get("run_id")), float(x.get("published_at") or 0), int(x.get("rows") or 0),
                           int(x.get("columns") or 0), int(x.get("bytes") or 0), str(x.get("crc32c") or ""),
                           (x.get("cost") or {}).get("total_usd"), x.get("run_id") == current_run, x))
    return sorted(out, key=lambda v: -v.published_at)


def version_summary(s: Settings, pair: str, run_id: str) -> dict[str, Any]:
    found = storage.read_json(s, s.output_bucket, layout.version(pair, run_id, "summary.json"))
    if found is None:
        kept = ", ".join(v.run_id for v in history(s, pair)) or "none"
        raise TerminalError(f"{pair} has no kept version of run {run_id} (kept: {kept}; see `bqx history {pair}`)")
    return found[0]


def schema(s: Settings, pair: str, run_id: str | None = None) -> dict[str, Any]:
    """The schema of run `run_id`, or of the published run (the one the summary names: training_<pair>.schema.json
    is written after the summary, so right after a publish it can still be the previous run's)."""
    published = run_id is None
    if published:
        current = storage.read_json(s, s.output_bucket, layout.summary(pair))
        run_id = current[0].get("run_id") if current is not None else None
    found = storage.read_json(s, s.output_bucket, layout.version(pair, run_id, "schema.json")) if run_id else None
    if found is None and published:
        found = storage.read_json(s, s.output_bucket, layout.schema(pair))
    if found is None:
        raise TerminalError(f"no schema for {pair}{f' run {run_id}' if run_id else ''}: published before schemas "
                            "were kept, or not kept any more")
    return found[0]


def diff(s: Settings, pair: str, run_a: str | None = None, run_b: str | None = None) -> dict[str, Any] | None:
    """Drift from run_a to run_b (both kept); without them, the current run's drift against the one before."""
    if run_a is None and run_b is None:
        current = storage.read_json(s, s.output_bucket, layout.summary(pair))
        if current is None:
            raise TerminalError(f"{pair} has no published run yet")
        return current[0].get("drift")
    if run_a is None or run_b is None:
        raise TerminalError("name two runs, or none")
    a, b = version_summary(s, pair, run_a), version_summary(s, pair, run_b)
    return drift(schema(s, pair, run_a), schema(s, pair, run_b), a.get("rows"), b.get("rows"))


def restore(s: Settings, pair: str, run_id: str) -> dict[str, Any]:
    """Make a kept run's training file current again: the same server-side copy and crc32c check as a merge's
    publish, then its schema and a summary recording the restore (restored_from, restored_at) and a done record."""
    from bqx.merge.publish import promote

    summary = dict(version_summary(s, pair, run_id))
    bucket = storage.bucket(s, s.output_bucket)
    source = bucket.get_blob(layout.version(pair, run_id))
    if source is None:
        raise TerminalError(f"the kept training file of run {run_id} of {pair} is gone")
    if summary.get("crc32c") and source.crc32c != summary["crc32c"]:
        raise TransientError(f"kept file of run {run_id} has crc32c {source.crc32c}, its summary says "
                             f"{summary['crc32c']}; not restored")
    final = promote(s, pair, source)
    storage.write_json(s, s.output_bucket, layout.schema(pair), schema(s, pair, run_id))
    # the summary names the file's new generation: readers read the file at it (bqx.runs.published_output)
    summary.update(restored_from=run_id, restored_at=time.time(), output_generation=int(final.generation))
    storage.write_json(s, s.output_bucket, layout.summary(pair), summary)
    log.info("training file restored", pair=pair, run_id=run_id, crc32c=source.crc32c)
    return summary
