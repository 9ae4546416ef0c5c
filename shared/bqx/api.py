"""The Python API: `import bqx`, then `bqx.run("eurusd")`, `bqx.read("eurusd")`.

Every function works against the embedded local stack by default (started when needed) and against Google Cloud
with `cloud=True` or the environment variable BQX_CLOUD=1 (then the usual BQX_* settings and your Application
Default Credentials apply). The `bqx` command is a thin layer over the same functions.

    import bqx
    summary = bqx.run("eurusd")              # request a run and wait for its training file
    table = bqx.read("eurusd", columns=["interval_time", "target_bqx45_h15"])
    bqx.history("eurusd")[0].rows            # kept published runs, newest first
    bqx.status("eurusd").state               # "done"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bqx.config import Settings
from bqx.errors import TerminalError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bqx.runs import RunState
    from bqx.versions import Version

Summary = dict[str, Any]
"""A published run's summary: pair, run_id, rows, columns, output, bytes, crc32c, cost, drift, ... (README)."""

LARGE_FILE_BYTES = 2 << 30  # read() returns a dataset (read lazily) past this size instead of a table in memory


def settings(cloud: bool | None = None) -> Settings:
    """The settings for the local stack (default) or Google Cloud (`cloud=True`, or BQX_CLOUD=1), with this process
    pointed at the local stack's emulators when local."""
    if cloud is None:
        cloud = os.environ.get("BQX_CLOUD", "") in ("1", "true", "True")
    if cloud:
        return Settings.from_env()
    os.environ.setdefault("BQX_LOCAL", "1")
    from bqx.local.stack import client_env

    os.environ.update(client_env(Settings.from_env()))
    return Settings.from_env()


def _local_ready(s: Settings, pairs: list[str], rows: int | None = None) -> None:
    """Start the local stack and generate the pairs' synthetic warehouse if missing (no-op in the cloud)."""
    if not s.local:
        return
    from bqx.local.stack import Stack
    from bqx.local.warehouse import DEFAULT_ROWS, Shape, Warehouse

    stack = Stack(s)
    if not stack.is_up():
        stack.up(progress=lambda m: None)
    wh = Warehouse(Path(s.warehouse), s.dataset)
    have = wh.pairs()
    for pair in pairs:
        if pair not in have:
            wh.generate(pair, Shape(rows or DEFAULT_ROWS))


def submit(*pairs: str, force: bool = False, accept_drift: bool = False, cloud: bool | None = None) -> dict[str, str]:
    """Request pairs and return at once: pair -> run id. Several pairs go in one message, as the schedule sends,
    and start as extract slots free (at most max_active_extracts at once)."""
    from bqx import runs
    from bqx.pairs import validate_pair

    chosen = [validate_pair(p) for p in pairs]
    if not chosen:
        raise TerminalError("name at least one pair")
    s = settings(cloud)
    _local_ready(s, chosen)
    if len(chosen) > 1:
        return runs.submit_pairs(s, chosen, force=force, accept_drift=accept_drift)
    return {chosen[0]: runs.submit(s, chosen[0], force=force, accept_drift=accept_drift)}


def run(pair: str, force: bool = False, accept_drift: bool = False, timeout: float = 3600.0,
        cloud: bool | None = None) -> Summary:
    """Request a run of `pair` and wait for its training file; returns its summary. An up-to-date pair (no table
    changed since its last published run) returns the published summary without running (force=True runs anyway).
    A failed run raises TerminalError with its recorded error and the command to retry."""
    from bqx import runs
    from bqx.pairs import validate_pair

    pair = validate_pair(pair)
    s = settings(cloud)
    _local_ready(s, [pair])
    run_id = None if force else runs.active_run_id(s, pair)
    if run_id is None and not force:
        from bqx.extract.sources import open_source

        current = runs.up_to_date(s, pair, open_source(s))
        if current is not None:
            return current
    if run_id is None:
        run_id = runs.submit(s, pair, force=force, accept_drift=accept_drift)
    rs = runs.follow(s, pair, run_id, timeout)
    if rs.state == "failed":
        e = rs.error or {}
        raise TerminalError(f"{pair}: run {run_id} failed in {e.get('stage')}: {e.get('error')} "
                            f"(retry: {e.get('retry')})")
    return rs.summary or {}


def status(pair: str, run_id: str | None = None, cloud: bool | None = None) -> RunState:
    """Where the pair's newest run (or `run_id`) stands: queued, extracting, merging, done, failed, ..."""
    from bqx import runs
    from bqx.pairs import validate_pair

    return runs.state(settings(cloud), validate_pair(pair), run_id)


def history(pair: str, cloud: bool | None = None) -> list[Version]:
    """The pair's kept published runs, newest first: time, rows, columns, size, cost, crc32c, which is current."""
    from bqx import versions
    from bqx.pairs import validate_pair

    return versions.history(settings(cloud), validate_pair(pair))


def diff(pair: str, run_a: str | None = None, run_b: str | None = None, cloud: bool | None = None
         ) -> dict[str, Any] | None:
    """Schema and row drift from run_a to run_b; without them, the current run's against the one before."""
    from bqx import versions
    from bqx.pairs import validate_pair

    return versions.diff(settings(cloud), validate_pair(pair), run_a, run_b)


def restore(pair: str, run_id: str, cloud: bool | None = None) -> Summary:
    """Make a kept run's training file current again (atomic server-side copy, recorded in the summary)."""
    from bqx import versions
    from bqx.pairs import validate_pair

    return versions.restore(settings(cloud), validate_pair(pair), run_id)


def download(pair: str, path: str | Path, run_id: str | None = None, cloud: bool | None = None) -> Path:
    """Download the pair's current training file (or a kept run's) to `path`."""
    from bqx import layout
    from bqx.gcp import storage
    from bqx.pairs import validate_pair

    s = settings(cloud)
    pair = validate_pair(pair)
    name = layout.output(pair) if run_id is None else layout.version(pair, run_id)
    blob = storage.bucket(s, s.output_bucket).get_blob(name)
    if blob is None:
        raise TerminalError(f"no training file gs://{s.output_bucket}/{name}; see `bqx history {pair}`")
    out = Path(path)
    partial = out.with_name(out.name + ".partial")
    blob.download_to_filename(str(partial), checksum="crc32c")
    partial.replace(out)
    return out


def read(pair: str, columns: list[str] | None = None, run_id: str | None = None, cloud: bool | None = None
         ) -> pa.Table | pq.ParquetFile:
    """The pair's current training file (or a kept run's) as a pyarrow.Table of `columns` (all by default); a file
    larger than 2 GiB comes back as a pyarrow.parquet.ParquetFile, read lazily (`.read(columns=...)`,
    `.iter_batches()`), through ranged reads of that object generation."""
    import pyarrow.parquet as pq

    from bqx import layout
    from bqx.gcp import storage
    from bqx.gcp.objectfile import ObjectFile
    from bqx.pairs import validate_pair

    s = settings(cloud)
    pair = validate_pair(pair)
    name = layout.output(pair) if run_id is None else layout.version(pair, run_id)
    blob = storage.bucket(s, s.output_bucket).get_blob(name)
    if blob is None:
        raise TerminalError(f"no training file gs://{s.output_bucket}/{name}; run it first: bqx.run({pair!r})")
    source = ObjectFile(blob, int(blob.size))  # ranged reads of that generation: only the columns asked for
    if int(blob.size) > LARGE_FILE_BYTES:
        return pq.ParquetFile(source)  # type: ignore[arg-type]
    return pq.read_table(source, columns=columns)  # type: ignore[arg-type]
