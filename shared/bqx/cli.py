"""`bqx`: a thin command line over the library. Domain errors become clear messages and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from bqx.config import MEMORY_BUDGET, MERGE_METHODS, Settings, parse_bytes
from bqx.errors import BqxError, ConfigError, UnknownPair
from bqx.pairs import PAIRS, validate_pair


def _settings(cloud: bool = False) -> Settings:
    """The command's settings, read once: Google Cloud's with --cloud, else the embedded local stack's, with this
    process (and the processes it starts) pointed at the stack."""
    if cloud:
        return Settings.from_env()
    os.environ.setdefault("BQX_LOCAL", "1")
    from bqx.local.stack import client_env

    s = Settings.from_env()
    os.environ.update(client_env(s))  # for the client libraries, which read the emulators' variables themselves
    return s


# Options several commands share, declared once (as sqlite-utils' output_options); help may differ by command.
def cloud_option(help: str = "Use Google Cloud instead of the local stack."):  # type: ignore[no-untyped-def]
    return click.option("--cloud", is_flag=True, help=help)


def json_option(help: str | None = None):  # type: ignore[no-untyped-def]
    return click.option("--json", "as_json", is_flag=True, help=help)


def all_option(help: str | None = "All 28 pairs."):  # type: ignore[no-untyped-def]
    return click.option("--all", "all_pairs", is_flag=True, help=help)


def rows_option(help: str):  # type: ignore[no-untyped-def]
    return click.option("--rows", type=int, default=None,
                        help=f"{help}  [default: $BQX_WAREHOUSE_ROWS, else the generator's]")


_DEFAULTS = Settings()  # what an option shows as its default when neither it nor the environment sets one


class _Size(click.ParamType):
    """A size such as 1GiB or 512MiB, parsed by bqx.config.parse_bytes (as the settings parse BQX_MEMORY_BUDGET)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def _pairs(pairs: tuple[str, ...], all_pairs: bool) -> list[str]:
    if all_pairs:
        return list(PAIRS)
    if not pairs:
        raise click.UsageError("name at least one pair, or --all")
    try:
        return [validate_pair(p) for p in pairs]
    except UnknownPair as exc:
        raise click.ClickException(str(exc)) from None


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BqxError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bqx", prog_name="bqx")
def main() -> None:
    """bqx: BigQuery feature warehouse -> one training Parquet file per FX pair.

    Runs on Google Cloud (Cloud Run jobs + Cloud Functions) or, by default, on an embedded local stack
    (fake-gcs-server, the Pub/Sub emulator, functions-framework, a local Cloud Run API, DuckDB).
    """


# ---------------------------------------------------------------------------------------------- stack
@main.group()
def stack() -> None:
    """Manage the local stack (emulators, functions, Cloud Run API)."""


@stack.command("up")
def stack_up() -> None:
    """Start every local service (idempotent)."""
    from bqx.local.stack import Stack

    Stack(_settings()).up(progress=_echo)
    _echo("local stack is up; `bqx stack down` stops it")


@stack.command("down")
@click.option("--purge", is_flag=True, help="Also delete the emulated buckets' data.")
def stack_down(purge: bool) -> None:
    """Stop every local service."""
    import shutil

    from bqx.local.stack import Stack

    s = _settings()
    stopped = Stack(s).down()
    _echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if purge:
        shutil.rmtree(s.home / "gcs", ignore_errors=True)
        _echo(f"purged {s.home / 'gcs'}")


@stack.command("restart")
def stack_restart() -> None:
    """Stop every local service and start them again from this checkout's code (the buckets' data is kept)."""
    from bqx.local.stack import Stack

    st = Stack(_settings())
    _echo(f"stopped: {', '.join(st.down()) or 'nothing was running'}")
    st.up(progress=_echo)
    _echo("local stack is up; `bqx stack down` stops it")


@stack.command("status")
@json_option()
def stack_status(as_json: bool) -> None:
    """Show which local services run."""
    from bqx.local.stack import Stack

    st = Stack(_settings()).status()
    if as_json:
        click.echo(json.dumps(st))
        return
    for name, v in st.items():
        click.echo(f"{name:10s} {'up  ' if v['up'] else 'down'} port {v['port']}  pid {v['pid'] or '-'}")


@stack.command("dead-letters")
def stack_dead_letters() -> None:
    """Show (and drain) messages that exhausted their delivery attempts."""
    from bqx.local.stack import Stack

    msgs = Stack(_settings()).dead_letters()
    click.echo(json.dumps(msgs, indent=1))
    _echo(f"{len(msgs)} dead-lettered message(s)")


def _gcloud_env(s) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment that points the real gcloud at the local stack, offline: a gcloud config of its own under the
    state dir (created, with the `gce` file that stops gcloud probing the metadata server), no credentials, no
    metrics or update checks, and endpoint overrides for Pub/Sub, Cloud Storage and Cloud Run.

    gcloud sends `run` commands to the regional host it derives from the override (run.bqx.internal ->
    us-central1-run.bqx.internal), which resolves nowhere; http_proxy sends those requests to the local Run API,
    which serves only that made-up host. Pub/Sub and storage go straight to 127.0.0.1 (no_proxy)."""
    from bqx.local.runapi import LOCAL_RUN_HOST

    config = s.home / "gcloud"
    config.mkdir(parents=True, exist_ok=True)
    (config / "gce").write_text("False")
    p = s.ports
    return {
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_PROJECT": s.project,
        "CLOUDSDK_RUN_REGION": s.region,
        "CLOUDSDK_METRICS_ENVIRONMENT": "local",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_GCE_CHECK": "True",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://127.0.0.1:{p.pubsub}/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"http://127.0.0.1:{p.gcs}/storage/v1/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": f"http://{LOCAL_RUN_HOST}/",
        "http_proxy": f"http://127.0.0.1:{p.run_api}",
        "no_proxy": "127.0.0.1,localhost",
    }


# gcloud's own proxy settings would win over http_proxy and send every call elsewhere
_GCLOUD_UNSET = ("CLOUDSDK_PROXY_TYPE", "CLOUDSDK_PROXY_ADDRESS", "CLOUDSDK_PROXY_PORT")


@stack.command("env")
def stack_env() -> None:
    """Print shell lines that point the real gcloud at the local stack, offline.

    \b
        eval "$(bqx stack env)"
        gcloud pubsub topics publish bqx-requests --message='{"pair":"eurusd"}'
        gcloud storage cp request.json gs://bqx-ml-staging/requests/eurusd.json
        gcloud run jobs execute bqx-ml-extract --args=eurusd
        gcloud run jobs executions list

    gcloud gets a config directory of its own under the state dir, no credentials (never the metadata server),
    and endpoint overrides for Pub/Sub and Cloud Storage (127.0.0.1) and Cloud Run (run.bqx.internal, reached
    through http_proxy: the local Run API serves that made-up host only and refuses to proxy anything else, so
    in that shell other plain-http requests fail; https is untouched). Start the stack first (`bqx stack up`).
    """
    import shlex

    from bqx.local.stack import port_open

    s = _settings()
    env = _gcloud_env(s)
    if not port_open(s.ports.run_api):
        _echo("note: the local stack is not running; start it with `bqx stack up`")
    click.echo(f"unset {' '.join(_GCLOUD_UNSET)}")
    for key, value in env.items():
        click.echo(f"export {key}={shlex.quote(value)}")


# ---------------------------------------------------------------------------------------------- warehouse
@main.group()
def warehouse() -> None:
    """The synthetic DuckDB warehouse standing in for BigQuery."""


@warehouse.command("generate")
@click.argument("pairs", nargs=-1)
@all_option()
@rows_option("Rows per table.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--table-scale", type=float, default=1.0, show_default=True, help="Fraction of each family's tables.")
@click.option("--column-scale", type=float, default=1.0, show_default=True, help="Fraction of columns.")
def warehouse_generate(pairs: tuple[str, ...], all_pairs: bool, rows: int | None, seed: int,
                       table_scale: float, column_scale: float) -> None:
    """Generate (or regenerate) the tables of PAIRS."""
    from bqx.local.warehouse import DEFAULT_ROWS, Shape

    s = _settings()
    shape = Shape(rows or s.warehouse_rows or DEFAULT_ROWS, seed, table_scale, column_scale)
    for pair in _pairs(pairs, all_pairs):
        _generate(s, pair, shape)


def _generate(s, pair: str, shape) -> None:  # type: ignore[no-untyped-def]
    from bqx.local.warehouse import Warehouse

    t0 = time.time()
    with _generate_progress(pair) as progress:
        n = Warehouse(Path(s.warehouse), s.dataset).generate(pair, shape, progress=progress)
    _echo(f"warehouse: {pair}: {n} tables ({shape.describe()}) in {time.time() - t0:.1f}s -> {s.warehouse}")


@contextlib.contextmanager
def _generate_progress(pair: str) -> Iterator[Any]:
    """A progress bar (tables of 668, rows, elapsed) on a terminal; otherwise a line every 10 s and at the end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if console.is_terminal:
        bar = Progress(TextColumn(f"generating {pair}"), BarColumn(), MofNCompleteColumn(), TextColumn("tables"),
                       TextColumn("{task.fields[rows]:,} rows"), TimeElapsedColumn(), console=console)
        with bar:
            task = bar.add_task(pair, total=None, rows=0)
            yield lambda p: bar.update(task, completed=p.tables, total=p.total, rows=p.rows)
        return
    last = [time.time()]

    def line(p) -> None:  # type: ignore[no-untyped-def]
        if time.time() - last[0] >= 10 or p.tables == p.total:
            last[0] = time.time()
            _echo(f"warehouse: {pair}: {p.tables}/{p.total} tables, {p.rows:,} rows, {p.seconds:.0f}s")

    yield line


@warehouse.command("touch")
@click.argument("pair")
@click.argument("tables", nargs=-1, required=True)
def warehouse_touch(pair: str, tables: tuple[str, ...]) -> None:
    """Mark TABLES of PAIR as updated, without changing their rows (a new version, as an update in BigQuery
    changes a table's modification time): the next `bqx run PAIR` extracts them again and reuses the others."""
    from bqx.local.warehouse import Warehouse

    pair = _pairs((pair,), False)[0]
    s = _settings()
    versions = Warehouse(Path(s.warehouse), s.dataset).touch(pair, list(tables))
    _echo(f"warehouse: {pair}: {len(versions)} table(s) have a new version: {', '.join(versions)}")


@warehouse.command("info")
def warehouse_info() -> None:
    """List the generated pairs and their shapes."""
    from bqx.local.warehouse import Warehouse

    s = _settings()
    found = Warehouse(Path(s.warehouse), s.dataset).pairs()
    click.echo(f"{s.warehouse}: {len(found)} pair(s)")
    for pair, shape in sorted(found.items()):
        click.echo(f"  {pair}: {shape}")


def _watch(s, pairs: list[str], interval: float, explicit: bool) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bqx import runs

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.fields[pair]:7s}"), TextColumn("{task.fields[state]:10s}"), BarColumn(),
                        TextColumn("{task.completed:.0f}/{task.total:.0f}"), TextColumn("{task.fields[extra]}"),
                        TimeElapsedColumn(), console=console)  # the clock moves even while a poll waits on GCS
    tasks: dict[str, Any] = {}
    with Live(progress, console=console, refresh_per_second=4):
        while True:
            states = [runs.state(s, p) for p in pairs]
            for rs in states:
                if rs.state == "none" and not explicit:
                    continue
                extra = ""
                if rs.eta_seconds is not None and rs.state == "extracting":
                    extra = f"{rs.validated} validated, {rs.tables_per_second:.1f} tables/s, ETA {rs.eta_seconds:.0f}s"
                if rs.state == "handoff":
                    extra = f"{rs.validated} validated; starting the merge"
                if rs.state in ("merging", "publishing") and rs.merge_progress:
                    extra = _merge_counts(rs.merge_progress)
                if rs.state == "failed" and rs.error:
                    extra = f"{rs.error.get('stage')}: {str(rs.error.get('error'))[:80]}"
                if rs.summary:
                    extra = f"{rs.summary['rows']} rows x {rs.summary['columns']} cols"
                fields = {"pair": rs.pair, "state": rs.state, "extra": extra}
                if rs.pair not in tasks:
                    tasks[rs.pair] = progress.add_task("", total=max(rs.expected, 1), **fields)
                progress.update(tasks[rs.pair], completed=rs.present, total=max(rs.expected, 1), **fields)
            if all(r.state in ("done", "failed", "none") for r in states):
                break
            time.sleep(interval)


def _calibration(s, pairs: list[str]) -> tuple[float, float, str] | None:  # type: ignore[no-untyped-def]
    """(extract seconds, merge seconds) per byte scanned, measured by the newest published run of one of `pairs`
    (else of any pair), and which run that was; None before any run was published."""
    from bqx import layout
    from bqx.gcp import storage
    from bqx.pairs import PAIRS

    for pair in dict.fromkeys([*pairs, *PAIRS]):
        found = storage.read_json(s, s.output_bucket, layout.summary(pair))
        cost = (found[0].get("cost") or {}) if found else {}
        if found and (found[0].get("reused") or {}).get("tables"):
            continue  # its extract copied checkpoints it did not scan: seconds per byte scanned would mislead
        scanned = cost.get("bigquery_bytes") or 0
        if scanned and cost.get("extract_seconds") and cost.get("merge_seconds"):
            return (cost["extract_seconds"] / scanned, cost["merge_seconds"] / scanned,
                    f"run {found[0].get('run_id')} of {pair}")  # type: ignore[index]
    return None


def _dry_run(s, pairs: list[str], as_json: bool) -> None:  # type: ignore[no-untyped-def]
    """Estimate bytes scanned and Cloud Run time before anything runs: times scale the newest published run's
    measured seconds per byte scanned (its summary's cost), or rough guesses before there is one."""
    from bqx import pricing
    from bqx.extract.sources import open_source

    source = open_source(s)
    calibration = _calibration(s, pairs)
    for pair in pairs:
        tables = source.discover(pair)
        scanned = sum(source.estimate_bytes(t.name, s.row_limit) for t in tables)
        if calibration:
            extract_s, merge_s, basis = scanned * calibration[0], scanned * calibration[1], calibration[2]
        else:  # ~12 tables/s and ~60 MB/s on 2 cores: guesses until a run has been measured
            extract_s, merge_s, basis = len(tables) / 12.0 + scanned / 200e6, scanned / 60e6 + 5, ""
        cost = pricing.Cost(scanned, extract_s, merge_s, 1, len(tables) + 8)
        out = {"pair": pair, "tables": len(tables), "bytes_scanned": scanned, "calibrated_from": basis or None,
               **cost.to_json()}
        if as_json:
            click.echo(json.dumps(out))
        else:
            click.echo(f"{pair}: {len(tables)} tables, {scanned / 1e9:.2f} GB scanned -> BigQuery "
                       f"${cost.bigquery_usd:.4f}; extract ~{extract_s:.0f}s (${cost.extract_usd:.4f}), merge "
                       f"~{merge_s:.0f}s (${cost.merge_usd:.4f}); total ~${cost.total_usd:.4f} at list prices; "
                       + (f"times scaled from {basis}" if basis else "times are rough guesses until a run is "
                          "published"))


# ---------------------------------------------------------------------------------------------- run
def _prepare_local(s, pairs: list[str], rows: int | None) -> None:  # type: ignore[no-untyped-def]
    from bqx.local.stack import Stack

    _prepare_local_warehouse(s, pairs, rows)  # first: a --rows the warehouse does not have is refused at once
    st = Stack(s)
    if not st.is_up():
        _echo("starting the local stack ...")
        st.up(progress=lambda m: _echo("  " + m))
    elif stale := st.stale():
        from bqx.local.stack import STALE_HINT

        _echo("warning: " + STALE_HINT.format(", ".join(stale)))


def _prepare_local_warehouse(s, pairs: list[str], rows: int | None) -> None:  # type: ignore[no-untyped-def]
    from bqx.local.warehouse import DEFAULT_ROWS, Shape, Warehouse

    have = Warehouse(Path(s.warehouse), s.dataset).pairs()
    for pair in pairs:
        if pair not in have:
            _generate(s, pair, Shape(rows or s.warehouse_rows or DEFAULT_ROWS))
        elif rows and f"rows={rows} " not in have[pair] + " ":
            # --rows shapes a warehouse being generated; silently running the old shape would mislead
            raise click.ClickException(
                f"{pair}'s local warehouse was generated with {have[pair].split()[0]}, not rows={rows}: --rows "
                f"applies when a pair's warehouse is generated. To run at {rows:,} rows, regenerate it first (its "
                f"tables change, so the next run extracts them all): bqx warehouse generate {pair} --rows {rows}")


def _merge_counts(p: dict[str, Any]) -> str:
    """The merge job's progress (bqx.merge.publish.Progress): tables written, or the compose merge's current step
    (footers read, then compose calls)."""
    if p.get("step"):
        return f"{p.get('done', 0)}/{p.get('total')} {p['step']}"
    return f"{p.get('tables_written', 0)}/{p.get('tables')} tables written"


STORAGE_WAIT_SHOWN = 5.0  # seconds a status poll may wait before the line says storage is busy


def _progress_line(rs, since: float | None = None) -> str:  # type: ignore[no-untyped-def]
    """One line for the run's stage; `since` (when the stage began) adds its elapsed time in 5 s steps, so a
    stage that shows no other change still updates at least every 5 s. While storage does not answer the status
    poll, the last state stands, and the line says so (the local stack's fake-gcs-server answers nothing else
    while it composes or copies a large object)."""
    line = _stage_line(rs, f" ({int(time.time() - since) // 5 * 5}s)" if since is not None else "")
    if rs.storage_wait >= STORAGE_WAIT_SHOWN:
        line += f"; storage busy, no answer for {int(rs.storage_wait) // 5 * 5}s"
    return line


def _stage_line(rs, clock: str) -> str:  # type: ignore[no-untyped-def]
    if rs.state == "extracting" and rs.expected:
        width = 30
        filled = int(width * rs.present / rs.expected)
        return (f"{rs.pair}: extracting [{'#' * filled}{'.' * (width - filled)}] {rs.present}/{rs.expected} "
                f"checkpoints, {rs.validated} validated")
    if rs.state == "handoff":
        return f"{rs.pair}: all {rs.expected} checkpoints in, {rs.validated} validated; starting the merge{clock}"
    if rs.state == "merging":
        p = rs.merge_progress or {}
        tables = f" {_merge_counts(p)}" if p.get("tables") or p.get("step") else ""
        return f"{rs.pair}: merging{tables} ({(rs.merge_execution or '').rsplit('/', 1)[-1]}){clock}"
    if rs.state == "publishing":
        return f"{rs.pair}: publishing: checking the merged file and copying it to the output bucket{clock}"
    if rs.state == "queued":
        return f"{rs.pair}: queued, {rs.queued_ahead} request(s) ahead, waiting for an extract slot{clock}"
    return f"{rs.pair}: {rs.state}"


@main.command()
@click.argument("pairs", nargs=-1)
@all_option()
@json_option("Print each summary as one JSON object.")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds to wait per pair.")
@rows_option("Rows per table if the local warehouse must be generated.")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Pairs followed at once.")
@cloud_option()
@click.option("--force", is_flag=True, help="Start a new run even if one is active or the pair is up to date.")
@click.option("--accept-drift", is_flag=True,
              help="Publish even if the run has lost rows or columns against the published file.")
@click.option("--dry-run", is_flag=True, help="Only estimate bytes scanned, run time and cost; start nothing.")
def run(pairs: tuple[str, ...], all_pairs: bool, as_json: bool, timeout: float, rows: int | None,
        concurrency: int, cloud: bool, force: bool, accept_drift: bool, dry_run: bool) -> None:
    """Request PAIRS and follow each run until its training file is published.

    A pair whose warehouse tables are all unchanged since its last published run is up to date: its summary is shown
    and no run starts (--force starts one). A new run extracts only the tables that changed and copies the
    checkpoints of the others from that run."""
    from bqx import layout, runs

    chosen = _pairs(pairs, all_pairs)
    s = _settings(cloud)
    if dry_run:
        if not cloud:
            _prepare_local_warehouse(s, chosen, rows)
        _dry_run(s, chosen, as_json)
        return
    if not cloud:
        _prepare_local(s, chosen, rows)
    tty = sys.stderr.isatty()
    last: dict[str, str] = {}
    stage_since: dict[str, tuple[str, float]] = {}

    def show(rs) -> None:  # type: ignore[no-untyped-def]
        if stage_since.get(rs.pair, ("",))[0] != rs.state:
            stage_since[rs.pair] = (rs.state, time.time())
        line = _progress_line(rs, stage_since[rs.pair][1])
        if line != last.get(rs.pair):
            last[rs.pair] = line
            if tty and len(chosen) == 1:
                click.echo("\r\033[K" + line, err=True, nl=False)
            else:
                _echo(line)

    def decide(pair: str):  # type: ignore[no-untyped-def]
        """The run to follow without requesting one (active, or up to date), else None."""
        active = None if force else runs.active_run_id(s, pair)
        if active:
            # The trigger would acknowledge a new request as "already running": follow the active run instead.
            _echo(f"{pair}: run {active} is already active; following it (--force starts a new run)")
            return active
        if not force:
            from bqx.extract.sources import open_source

            current = runs.up_to_date(s, pair, open_source(s))
            if current is not None:
                _echo(f"{pair} is up to date: no table changed since run {current['run_id']}, published "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(current.get('published_at') or 0))} "
                      f"(--force starts a new run)")
                return runs.RunState(pair, current["run_id"], "done", summary=current)
        return None

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        decided = dict(zip(chosen, pool.map(decide, chosen), strict=True))
    wanted = [p for p, d in decided.items() if d is None]
    if len(wanted) > 1 or (all_pairs and wanted):
        # One message for all, as the schedule sends: the trigger queues them and starts max_active_extracts at once
        requested = runs.submit_pairs(s, wanted, force=force, accept_drift=accept_drift)
        _echo(f"requested {len(wanted)} pairs in one message to {s.request_topic}; at most "
              f"{s.max_active_extracts} extract at once, the others queued")
    else:
        requested = {p: runs.submit(s, p, force=force, accept_drift=accept_drift) for p in wanted}
        for p, run_id in requested.items():
            _echo(f"{p}: requested gs://{s.staging_bucket}/{layout.request(p)} (run {run_id})")
    decided.update(requested)

    def one(pair: str):  # type: ignore[no-untyped-def]
        found = decided[pair]
        if isinstance(found, runs.RunState):
            return found
        return runs.follow(s, pair, found, timeout, on_update=show)

    failed = 0
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        for rs in pool.map(one, chosen):
            if tty and len(chosen) == 1:
                click.echo("", err=True)
            if rs.state == "failed":
                failed += 1
                e = rs.error or {}
                _echo(f"{rs.pair}: FAILED in {e.get('stage')}: {e.get('error')}\n  retry with: {e.get('retry')}")
                continue
            summary = rs.summary or {}
            if as_json:
                click.echo(json.dumps(summary, sort_keys=True))
            else:
                click.echo(
                    f"{rs.pair}: {summary['rows']} rows x {summary['columns']} columns from "
                    f"{summary['checkpoints']} checkpoints -> {summary['output']} "
                    f"({summary['bytes'] / 1e6:.1f} MB, crc32c {summary.get('crc32c')}, "
                    f"merge {summary['merge_seconds']:.1f}s, run {summary['run_id']}"
                    + (f"; {summary['reused']['tables']} reused from run {', '.join(summary['reused']['from'])}, "
                       f"{summary['reused']['extracted']} extracted" if (summary.get("reused") or {}).get("tables")
                       else "") + ")"
                )
    if failed:
        raise click.ClickException(f"{failed} of {len(chosen)} pair(s) failed")


@main.command()
@click.argument("pairs", nargs=-1)
@all_option(None)
@cloud_option()
@click.option("--force", is_flag=True, help="Start a new run even if one is active.")
def submit(pairs: tuple[str, ...], all_pairs: bool, cloud: bool, force: bool) -> None:
    """Request PAIRS and return at once (follow with `bqx status --watch`)."""
    from bqx import runs

    chosen = _pairs(pairs, all_pairs)
    s = _settings(cloud)
    if not cloud:
        _prepare_local(s, chosen, None)
    for pair in chosen:
        active = None if force else runs.active_run_id(s, pair)
        if active:
            _echo(f"{pair}: run {active} is already active; not requesting another (--force starts one)")
            click.echo(json.dumps({"pair": pair, "run_id": active, "already_active": True}))
            continue
        click.echo(json.dumps({"pair": pair, "run_id": runs.submit(s, pair, force=force)}))


@main.command()
@click.argument("pairs", nargs=-1)
@json_option("One JSON array of run states.")
@click.option("--watch", is_flag=True, help="Live view with progress bars until every run is done or failed.")
@click.option("--interval", type=float, default=1.0, show_default=True)
@cloud_option(None)
@click.option("--no-sweep", is_flag=True, help="Do not first ask Cloud Run about active runs' executions.")
def status(pairs: tuple[str, ...], as_json: bool, watch: bool, interval: float, cloud: bool, no_sweep: bool) -> None:
    """Where each pair's newest run stands, from the buckets alone (state, checkpoints per family, ETA). First, the
    sweeper records the failure of an active run whose job died without a word (killed, out of memory, timed out)
    and re-drives a handoff whose event was lost (bqx.sweeper)."""
    from bqx import runs

    chosen = _pairs(pairs, not pairs)
    s = _settings(cloud)
    if not no_sweep:
        from bqx import sweeper

        sweeper.sweep(s, chosen)
    if watch and not as_json:
        _watch(s, chosen, interval, explicit=bool(pairs))
        return
    from bqx import schedule

    if schedule.waiting(s):  # hand on slots freed while nobody asked (the trigger drains on its events too)
        from bqx.trigger import drain

        drain(s)
    states = [runs.state(s, p) for p in chosen]
    if not pairs:  # all pairs: those with a run, in text and JSON alike
        states = [r for r in states if r.state != "none"]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in states], default=str))
        return
    if not states:
        _echo("no runs yet; start one with `bqx run PAIR`")
    for rs in states:
        extra = ""
        if rs.state == "failed" and rs.error:
            extra = f"  {rs.error.get('stage')}: {rs.error.get('error')}  (retry: {rs.error.get('retry')})"
        if rs.summary:
            extra = f"  {rs.summary['rows']} rows x {rs.summary['columns']} cols, {rs.summary['output']}"
        if rs.state == "queued":
            extra = f"  waiting for an extract slot, {rs.queued_ahead} request(s) ahead"
        click.echo(f"{rs.pair:7s} {rs.state:10s} {rs.present:>4}/{rs.expected:<4} run {rs.run_id or '-'}{extra}")


@main.command()
@click.argument("pair")
@click.option("--run-id", default=None, help="A run of PAIR other than its newest.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the HTML and PNG (default: reports/ in the state directory, $BQX_HOME).")
@cloud_option(None)
def report(pair: str, run_id: str | None, out_dir: Path | None, cloud: bool) -> None:
    """Write a run's report: timeline of every table, handoff and merge; slowest tables; retries; cost."""
    from bqx import report as rep

    pair = _pairs((pair,), False)[0]
    s = _settings(cloud)
    out_dir = out_dir or s.home / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, png_path, tl = rep.write(s, pair, out_dir, run_id)
    cost = tl.cost()
    click.echo(f"{html_path}\n{png_path}")
    if tl.summary:
        from bqx.versions import describe

        _echo("drift " + "\n".join(describe(tl.summary.get("drift"))))
    _echo(f"{len(tl.tables)} tables, extract {tl.extract_seconds:.1f}s, handoff "
          f"{'-' if tl.handoff_seconds is None else f'{tl.handoff_seconds:.2f}s'}, est. cost ${cost.total_usd:.4f}")
    for t in tl.ignored_tables:
        _echo(f"ignored: {t.name} ({t.reason})")


@main.command()
@click.option("--subscription", default=None, help="Pull subscription to create/use (default: bqx-events-<user>).")
@click.option("--max", "max_messages", type=int, default=0, help="Stop after N events (default: follow forever).")
@click.option("--timeout", type=float, default=0.0, help="Stop after this many seconds without an event.")
@click.option("--cloud", is_flag=True)
def events(subscription: str | None, max_messages: int, timeout: float, cloud: bool) -> None:
    """Follow run events: one JSON line per run that ended (done with its summary, failed with its error)."""
    import getpass

    from bqx import notify

    s = _settings(cloud)
    name = subscription or f"bqx-events-{''.join(c for c in getpass.getuser().lower() if c.isalnum()) or 'user'}"
    _echo(f"following {s.run_events_topic} through subscription {name}")
    notify.follow(s, name, lambda m: click.echo(json.dumps(m, sort_keys=True, default=str)), max_messages, timeout)


# ---------------------------------------------------------------------------------------------- versions
def _api(cloud: bool):  # type: ignore[no-untyped-def]
    """bqx.api, with the process pointed at the local stack unless --cloud."""
    from bqx import api

    os.environ["BQX_CLOUD"] = "1" if cloud else ""
    return api


@main.command()
@click.argument("pair")
@click.option("--json", "as_json", is_flag=True)
@click.option("--cloud", is_flag=True)
def history(pair: str, as_json: bool, cloud: bool) -> None:
    """PAIR's kept published runs, newest first: time, rows, columns, size, cost, crc32c (* = current)."""
    found = _api(cloud).history(_pairs((pair,), False)[0])
    if as_json:
        click.echo(json.dumps([v.to_json() for v in found]))
        return
    if not found:
        _echo(f"{pair}: no published run kept yet")
    for v in found:
        cost = "-" if v.cost_usd is None else f"${v.cost_usd:.4f}"
        click.echo(f"{'*' if v.current else ' '} {v.run_id:18s} "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.published_at))} {v.rows:>9} rows "
                   f"{v.columns:>6} cols {v.bytes / 1e6:>9.1f} MB {cost:>9} crc32c {v.crc32c}")


@main.command()
@click.argument("pair")
@click.option("--run", "run_id", default=None, help="A kept run (bqx history) instead of the current file.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write it (default: training_<pair>.parquet here).")
@click.option("--cloud", is_flag=True)
def get(pair: str, run_id: str | None, out: Path | None, cloud: bool) -> None:
    """Download PAIR's training file, current or of a kept run."""
    pair = _pairs((pair,), False)[0]
    click.echo(_api(cloud).download(pair, out or Path(f"training_{pair}.parquet"), run_id))


@main.command()
@click.argument("pair")
@click.argument("run_id")
@click.option("--cloud", is_flag=True)
def restore(pair: str, run_id: str, cloud: bool) -> None:
    """Make a kept run's training file current again (the publish's atomic copy; recorded in the summary)."""
    summary = _api(cloud).restore(_pairs((pair,), False)[0], run_id)
    click.echo(f"{pair}: run {run_id} is current again ({summary['rows']} rows x {summary['columns']} columns, "
               f"crc32c {summary.get('crc32c')})")


@main.command()
@click.argument("pair")
@click.argument("runs", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.option("--cloud", is_flag=True)
def diff(pair: str, runs: tuple[str, ...], as_json: bool, cloud: bool) -> None:
    """Schema and row drift: PAIR's current run against the one before, or RUN_A -> RUN_B."""
    from bqx.versions import describe

    if len(runs) not in (0, 2):
        raise click.UsageError("name two runs (RUN_A RUN_B), or none")
    found = _api(cloud).diff(_pairs((pair,), False)[0], *runs)
    click.echo(json.dumps(found) if as_json else "\n".join(describe(found)))


# ---------------------------------------------------------------------------------------------- merge
@main.command()
@click.argument("pair", required=False)
@click.option("--from", "src", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Merge local files instead: a directory with one Parquet file per table.")
@click.option("--to", "dst", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --from: the output Parquet file.")
@click.option("--targets", default=None, help="With --from: stem of the targets file (default: the file targets*).")
@click.option("--method", type=click.Choice(MERGE_METHODS), default=None,
              help="auto (compose when the checkpoints are aligned, else stream), stream, compose; with PAIR also "
                   f"polars or bigquery.  [default: $MERGE_METHOD or {_DEFAULTS.merge_method}]")
@click.option("--run-id", default=None, help="With PAIR: a run other than the pair's newest.")
@click.option("--memory-budget", type=_Size(), default=None,
              help=f"Bytes the merge may hold at once.  [default: $BQX_MEMORY_BUDGET or {MEMORY_BUDGET}]")
@click.option("--workers", type=int, default=None, help="Tables merged at once (default: up to 2).")
@cloud_option("With PAIR: use Google Cloud instead of the local stack.")
@json_option()
@click.option("--accept-drift", is_flag=True,
              help="With PAIR: publish even if the run has lost rows or columns against the published file.")
def merge(pair: str | None, src: Path | None, dst: Path | None, targets: str | None, method: str | None,
          run_id: str | None, memory_budget: int | None, workers: int | None, cloud: bool, as_json: bool,
          accept_drift: bool) -> None:
    """LEFT JOIN every feature table onto the targets by interval_time, memory-bounded.

    \b
    bqx merge eurusd [--method auto|stream|compose|polars|bigquery]   re-merge the pair's newest run, publish it
    bqx merge --from DIR --to FILE                        merge local Parquet files (one per table)
    """
    from dataclasses import asdict, replace

    if src is None and not pair:
        raise click.UsageError("name a PAIR, or merge local files with --from DIR --to FILE")
    pair = _pairs((pair,), False)[0] if pair else None
    # local files need no stack: the settings as they are
    s = _settings(cloud) if src is None else Settings.from_env()
    budget = memory_budget or s.memory_budget
    from bqx.merge import allocator

    allocator.configure(budget)  # before pyarrow loads
    if src is not None:
        from bqx.merge.plan import local_inputs
        from bqx.merge.stream import merge as do_merge

        if dst is None:
            raise click.UsageError("--from needs --to FILE")
        t, features = local_inputs(src, targets, pair)
        how = method or s.merge_method
        if how not in ("auto", "stream", "compose"):
            raise click.UsageError("--from merges with --method auto, stream or compose")
        tmp = dst.with_name(dst.name + ".partial")
        stats = None
        if how != "stream":  # aligned files (issue 19): the files appended and a new footer, nothing decoded
            from bqx.merge import compose

            grid = compose.local_grid(t)
            try:
                if grid is None:
                    raise compose.Misaligned(t.table, f"it names no grid ({compose.GRID_FILE_KEY}) it holds")
                with open(tmp, "wb") as sink:
                    stats = compose.merge_local(t, features, sink, grid)
            except compose.Misaligned as exc:
                tmp.unlink(missing_ok=True)
                if how == "compose":
                    raise click.ClickException(str(exc)) from None
        if stats is None:
            with open(tmp, "wb") as sink:
                stats = do_merge(t, features, sink, budget, workers)
        tmp.replace(dst)
        out = {k: v for k, v in asdict(stats).items() if k != "table_seconds"}
        if as_json:
            click.echo(json.dumps(out))
        else:
            click.echo(f"{dst}: {stats.rows} rows x {stats.columns} columns from {stats.tables} tables, "
                       f"{stats.bytes / 1e6:.1f} MB in {stats.seconds:.2f}s")
        return
    assert pair is not None
    from bqx import runs
    from bqx.merge.publish import merge_run

    chosen = method or s.merge_method
    if not cloud:
        from bqx.local.stack import Stack

        if not Stack(s).is_up():
            Stack(s).up(progress=lambda m: _echo("  " + m))
    run_id = run_id or runs.latest_run(s, pair)
    if not run_id:
        raise click.ClickException(f"{pair} has no run yet; start one with `bqx run {pair}`")
    manifest = runs.load_manifest(s, pair, run_id)
    if manifest is None:
        raise click.ClickException(f"run {run_id} of {pair} has no manifest (extraction never started?)")
    summary = merge_run(replace(s, memory_budget=budget), manifest, chosen, accept_drift=accept_drift or None)
    click.echo(json.dumps(summary) if as_json else
               f"{pair}: {summary['rows']} rows x {summary['columns']} columns -> {summary['output']} "
               f"({chosen}, {summary['merge_seconds']:.1f}s)")


if __name__ == "__main__":
    main()
