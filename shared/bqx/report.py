"""A run's timeline, cost and report (self-contained HTML with an inline SVG, plus a PNG), from the buckets."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bqx import layout, pricing, runs
from bqx.catalog import IgnoredTable
from bqx.config import Settings
from bqx.errors import TerminalError
from bqx.gcp import storage


@dataclass
class TableSpan:
    table: str
    start: float
    end: float
    rows: int = 0
    bytes: int = 0
    attempts: int = 1
    reused_from: str = ""  # copied from this run's checkpoint: nothing read from the warehouse


@dataclass
class Timeline:
    pair: str
    run_id: str
    requested_at: float | None = None
    extract_launched_at: float | None = None
    manifest_at: float | None = None
    tables: list[TableSpan] = field(default_factory=list)
    extract_tasks: int = 1
    extract_seconds: float = 0.0
    merge_claimed_at: float | None = None
    merge_launched_at: float | None = None
    published_at: float | None = None
    merge_seconds: float | None = None
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    bigquery_bytes: int = 0
    ignored_tables: list[IgnoredTable] = field(default_factory=list)  # the pair's tables the run left out, and why

    @property
    def reused(self) -> list[TableSpan]:
        return [t for t in self.tables if t.reused_from]

    def reuse_json(self) -> dict[str, Any]:
        """What the run reused, for its summary: tables copied from earlier runs, tables extracted, those runs."""
        return {"tables": len(self.reused), "extracted": len(self.tables) - len(self.reused),
                "from": sorted({t.reused_from for t in self.reused})}

    @property
    def last_checkpoint_at(self) -> float | None:
        return max((t.end for t in self.tables), default=None)

    @property
    def handoff_seconds(self) -> float | None:
        last = self.last_checkpoint_at
        return None if last is None or self.merge_launched_at is None else self.merge_launched_at - last

    def cost(self) -> pricing.Cost:
        merge = self.merge_seconds or 0.0
        return pricing.Cost(self.bigquery_bytes, self.extract_seconds, merge, self.extract_tasks,
                            objects_written=len(self.tables) + 8)


def load(settings: Settings, pair: str, run_id: str | None = None) -> Timeline:
    s = settings
    latest = storage.read_json(s, s.staging_bucket, layout.latest(pair))
    if run_id is None:
        if latest is None:
            raise TerminalError(f"{pair} has no run yet; start one with `bqx run {pair}`")
        run_id = str(latest[0]["run_id"])
    tl = Timeline(pair, run_id)
    if latest and latest[0].get("run_id") == run_id:
        tl.requested_at = latest[0].get("requested_at")
    for stage in ("extract", "merge"):
        claim = storage.read_json(s, s.staging_bucket, layout.claim(pair, run_id, stage))
        if claim:
            if stage == "extract":
                tl.extract_launched_at = claim[0].get("launched_at")
            else:
                tl.merge_claimed_at, tl.merge_launched_at = claim[0].get("claimed_at"), claim[0].get("launched_at")
    manifest = runs.load_manifest(s, pair, run_id)
    if manifest:
        tl.manifest_at = manifest.created_at
        tl.ignored_tables = list(manifest.ignored_tables)
    spans: dict[str, TableSpan] = {}
    tasks: dict[int, float] = {}
    for name in storage.list_names(s, s.staging_bucket, layout.extract_reports_prefix(pair, run_id)):
        rep = storage.read_json(s, s.staging_bucket, name)
        if not rep:
            continue
        body = rep[0]
        tl.extract_tasks = max(tl.extract_tasks, int(body.get("task_count") or 1))
        tasks[int(body.get("task_index") or 0)] = tasks.get(int(body.get("task_index") or 0), 0.0) + float(
            body.get("seconds") or 0.0)
        for t in body.get("tables", []):
            if t.get("skipped"):
                continue
            spans[t["table"]] = TableSpan(t["table"], t["started_at"], t["started_at"] + t["seconds"], t["rows"],
                                          t["bytes"], t.get("attempts") or 1,
                                          str(t.get("reused_from") or "") if t.get("reused") else "")
    if manifest:
        objects = storage.list_objects(s, s.staging_bucket, layout.checkpoints_prefix(pair, run_id))
        cols = {t.name: len(t.columns) for t in manifest.tables}
        for t in manifest.tables:
            if t.name not in spans and t.checkpoint in objects:
                created = objects[t.checkpoint][1]
                spans[t.name] = TableSpan(t.name, created, created, 0, objects[t.checkpoint][0])
        # BigQuery bills what was read: a reused table's checkpoint was copied, not queried. The table's own rows
        # (its fingerprint's count, capped by the row limit as the dry run does), not the checkpoint's: an aligned
        # checkpoint holds the targets' rows.
        rows = {t.name: int(t.fingerprint.split("/")[1]) for t in manifest.tables if t.fingerprint.count("/") == 2}
        limit = manifest.row_limit

        def billed(span: TableSpan) -> int:
            n = rows.get(span.table, span.rows)
            return (min(n, limit) if limit else n) * cols.get(span.table, 0) * 8

        tl.bigquery_bytes = sum(billed(span) for span in spans.values() if not span.reused_from)
    tl.tables = sorted(spans.values(), key=lambda x: x.start)
    tl.extract_seconds = max(tasks.values(), default=0.0)
    summary = storage.read_json(s, s.output_bucket, layout.summary(pair))
    if summary and summary[0].get("run_id") == run_id:
        tl.summary = summary[0]
        tl.published_at = summary[0].get("published_at")
        tl.merge_seconds = summary[0].get("seconds")
    err = storage.read_json(s, s.staging_bucket, layout.run_error(pair, run_id))
    if err:
        tl.error = err[0]
    return tl


# ------------------------------------------------------------------------------------------------ rendering
def _bars(tl: Timeline) -> tuple[float, list[tuple[str, float, float, str]]]:
    """(origin, [(label, start, end, kind)]) with times relative to the origin."""
    origin = min(x for x in (tl.requested_at, tl.extract_launched_at, tl.manifest_at,
                             tl.tables[0].start if tl.tables else None) if x is not None) if (
        tl.tables or tl.requested_at) else time.time()
    bars = [(t.table, t.start - origin, max(t.end - origin, t.start - origin),
             "reused" if t.reused_from else "retry" if t.attempts > 1 else "table") for t in tl.tables]
    if tl.last_checkpoint_at and tl.merge_launched_at:
        bars.append(("handoff", tl.last_checkpoint_at - origin, tl.merge_launched_at - origin, "handoff"))
    if tl.merge_launched_at and tl.published_at:
        bars.append(("merge", tl.merge_launched_at - origin, tl.published_at - origin, "merge"))
    return origin, bars


COLORS = {"table": "#4e79a7", "reused": "#bab0ac", "retry": "#e15759", "handoff": "#f28e2b", "merge": "#59a14f"}


def svg(tl: Timeline, width: int = 1000, row: int = 4) -> str:
    _, bars = _bars(tl)
    if not bars:
        return "<p>No timings recorded yet.</p>"
    span = max(max(e for _, _, e, _ in bars), 1e-3)
    left, height = 150, row * len(bars) + 40
    scale = (width - left - 10) / span
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
             f'font-family="sans-serif">']
    for i, (label, s0, e0, kind) in enumerate(bars):
        y = 20 + i * row
        w = max((e0 - s0) * scale, 1.0)
        parts.append(f'<rect class="bar {kind}" data-table="{html.escape(label)}" x="{left + s0 * scale:.1f}" '
                     f'y="{y}" width="{w:.1f}" height="{max(row - 1, 1)}" fill="{COLORS[kind]}">'
                     f'<title>{html.escape(label)}: {s0:.2f}s - {e0:.2f}s</title></rect>')
        if kind in ("handoff", "merge"):
            parts.append(f'<text x="4" y="{y + row}">{kind}</text>')
    for k in range(6):
        x = left + (width - left - 10) * k / 5
        parts.append(f'<text x="{x:.0f}" y="12">{span * k / 5:.1f}s</text>')
    parts.append(f'<text x="4" y="12">{len(tl.tables)} tables</text></svg>')
    return "".join(parts)


def html_report(tl: Timeline) -> str:
    cost = tl.cost().to_json()
    slow = sorted((t for t in tl.tables if not t.reused_from), key=lambda t: t.start - t.end)[:10]
    retried = [t for t in tl.tables if t.attempts > 1]
    rows = "".join(f"<tr><td>{html.escape(t.table)}</td><td>{t.end - t.start:.3f}</td><td>{t.rows}</td>"
                   f"<td>{t.bytes}</td><td>{t.attempts}</td></tr>" for t in slow)
    stages = {
        "extract (wall, slowest task)": tl.extract_seconds,
        "handoff (last checkpoint -> merge launched)": tl.handoff_seconds,
        "merge job (launch -> published)": (tl.published_at - tl.merge_launched_at)
        if tl.published_at and tl.merge_launched_at else None,
    }
    stage_rows = "".join(f"<tr><td>{k}</td><td>{'-' if v is None else f'{v:.2f} s'}</td></tr>"
                         for k, v in stages.items())
    cost_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in cost.items() if k != "prices")
    summary = tl.summary or {}
    reused = tl.reuse_json()
    extracted = [t.table for t in tl.tables if not t.reused_from]
    names = html.escape(", ".join(extracted[:20])) + (" ..." if len(extracted) > 20 else "")
    reuse = (f"<p class='reuse'>{reused['tables']} of {len(tl.tables)} checkpoints reused: copied from run "
             f"{html.escape(', '.join(reused['from']))}, where their tables had the same fingerprint (version, rows, "
             f"schema) and row limit; nothing of them was read from the warehouse. {reused['extracted']} extracted"
             f"{': ' + names if extracted else ''}.</p>") if reused["tables"] else (
        "<p class='reuse'>No checkpoint reused: every table was extracted.</p>")
    ignored = "".join(f"<li>{html.escape(t.name)}: {html.escape(t.reason)}</li>" for t in tl.ignored_tables)
    ignored = (f"<p class='error'>{len(tl.ignored_tables)} table(s) of the pair left out of the training file:</p>"
               f"<ul>{ignored}</ul>") if ignored else ""
    err = (f"<p class='error'>Failed in {html.escape(str(tl.error.get('stage')))}: "
           f"{html.escape(str(tl.error.get('error')))} — retry: <code>{html.escape(str(tl.error.get('retry')))}"
           f"</code></p>") if tl.error else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bqx run {tl.pair} {tl.run_id}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:2px 8px;text-align:left}}.error{{color:#b00}}</style></head><body>
<h1>{tl.pair}: run {tl.run_id}</h1>{err}
<p>{summary.get('rows', '-')} rows × {summary.get('columns', '-')} columns from {len(tl.tables)} checkpoints;
output {html.escape(str(summary.get('output', '(not published)')))}; crc32c {summary.get('crc32c', '-')}</p>
{reuse}{ignored}
<h2>Drift</h2><pre class="drift">{html.escape(chr(10).join(_drift_lines(summary)))}</pre>
<h2>Timeline</h2><p>Each bar is one table's extraction (red: retried; grey: reused, a copy of an earlier run's
checkpoint), then the handoff and the merge.</p>
{svg(tl)}
<h2>Stages</h2><table>{stage_rows}</table>
<h2>Slowest tables</h2><table><tr><th>table</th><th>seconds</th><th>rows</th><th>bytes</th><th>attempts</th></tr>
{rows}</table>
<h2>Retries</h2><p>{len(retried)} table(s) needed more than one attempt{': ' if retried else ''}
{', '.join(html.escape(t.table) for t in retried[:20])}</p>
<h2>Cost (estimate at list prices; BigQuery bytes of the extracted tables only)</h2><table>{cost_rows}</table>
<p>Prices: {html.escape(str(cost['prices']))}</p></body></html>"""


def _drift_lines(summary: dict[str, Any]) -> list[str]:
    from bqx.versions import describe

    return describe(summary.get("drift")) if summary else ["not published"]


def png_report(tl: Timeline, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, bars = _bars(tl)
    fig, ax = plt.subplots(figsize=(11, 6), dpi=100)
    for i, (_, s0, e0, kind) in enumerate(bars):
        ax.broken_barh([(s0, max(e0 - s0, 0.01))], (i, 0.9), facecolors=COLORS[kind])
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("tables (by start time), then handoff and merge")
    ax.set_title(f"bqx {tl.pair} run {tl.run_id}: {len(tl.tables)} tables")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(settings: Settings, pair: str, out_dir: Path, run_id: str | None = None) -> tuple[Path, Path, Timeline]:
    tl = load(settings, pair, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"report_{pair}_{tl.run_id}.html"
    png_path = out_dir / f"report_{pair}_{tl.run_id}.png"
    html_path.write_text(html_report(tl))
    png_report(tl, png_path)
    return html_path, png_path, tl
