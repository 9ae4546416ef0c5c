"""Every setting bqx reads, resolved from the environment in this one module.

Each field has a type, a default and a one-line description; `Settings.from_env()` is called once per
process (functions: lazily on first event, bqx.serving; jobs: at start, bqx.job; the CLI: once per command).
This includes what Cloud Run sets for a job's task (CLOUD_RUN_*: `Settings.task`), the run a job was launched for
(BQX_RUN_ID), the log format and the local stack's own services' settings. Terraform reads the same names from
`deploy/names.json`, which a test keeps in step with the defaults here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from bqx.errors import ConfigError

_ENV_PREFIX = "BQX_"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _env_flag(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2GB', '1048576' -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    raw = text.strip().lower().replace(" ", "")
    unit = next((u for u in units if raw.endswith(u)), "b")
    number, factor = (raw[: -len(unit)] if raw.endswith(unit) else raw), units[unit]
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (use e.g. 1GiB, 512MiB)") from None
    if value <= 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return value


# auto: compose when the run's checkpoints are aligned to its grid (bqx.merge.compose), else stream.
MERGE_METHODS = ("auto", "stream", "compose", "polars", "bigquery")
MEMORY_BUDGET = "1GiB"  # the merge's default budget, as text (names.json's merge job sets the same, a test checks)


def check_merge_method(method: str) -> str:
    """The method, or a clear ConfigError (from the settings, and before a merge does any work)."""
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of: {', '.join(MERGE_METHODS)}")
    return method


def default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "bqx"


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the local stack."""

    gcs: int = 4443
    pubsub: int = 8085
    trigger: int = 8081
    completion: int = 8082
    run_api: int = 8090
    # The IAM gate: one port per component, which is how the gate knows who calls (bqx.local.gate).
    gate_trigger: int = 8091
    gate_completion: int = 8092
    gate_extract: int = 8093
    gate_merge: int = 8094
    eventarc: int = 8095  # the local Eventarc relay's health port

    @classmethod
    def from_env(cls) -> Ports:
        return cls(**{f.name: _env_int(f"BQX_PORT_{f.name.upper()}", f.default) for f in fields(cls)})


@dataclass(frozen=True)
class Task:
    """What Cloud Run tells one task of a job execution (empty outside Cloud Run)."""

    execution: str = ""
    """CLOUD_RUN_EXECUTION: the execution's id."""
    job: str = ""
    """CLOUD_RUN_JOB: the job's name."""
    index: int = 0
    """CLOUD_RUN_TASK_INDEX: this task's index among the execution's tasks."""
    count: int = 1
    """CLOUD_RUN_TASK_COUNT: how many tasks the execution has."""
    attempt: int = 0
    """CLOUD_RUN_TASK_ATTEMPT: how many times this task was retried before."""

    @classmethod
    def from_env(cls) -> Task:
        return cls(_env("CLOUD_RUN_EXECUTION", ""), _env("CLOUD_RUN_JOB", ""), _env_int("CLOUD_RUN_TASK_INDEX", 0),
                   _env_int("CLOUD_RUN_TASK_COUNT", 1), _env_int("CLOUD_RUN_TASK_ATTEMPT", 0))


@dataclass(frozen=True)
class Settings:
    project: str = "bqx-ml"
    """Google Cloud project id."""
    region: str = "us-central1"
    """Region of the Cloud Run jobs."""
    staging_bucket: str = "bqx-ml-staging"
    """Bucket for requests, run manifests, markers and checkpoints."""
    output_bucket: str = "bqx-ml-output"
    """Bucket that receives training_<pair>.parquet and its summary."""
    dataset: str = "bqx_ml_v3_features"
    """Warehouse dataset (BigQuery) holding every pair's feature and targets tables."""
    temp_dataset: str = "bqx_ml_temp"
    """BigQuery dataset for the merge's temporary tables."""
    warehouse: str = ""
    """Where tables are read: 'bigquery' or a DuckDB file path (local)."""
    extract_job: str = "bqx-ml-extract"
    """Cloud Run job that extracts one pair."""
    merge_job: str = "bqx-ml-merge"
    """Cloud Run job that merges one pair."""
    merge_method: str = "auto"
    """Merge method: auto (compose for aligned runs, else stream), stream, compose, polars or bigquery."""
    memory_budget: int = parse_bytes(MEMORY_BUDGET)
    """Bytes the merge may hold at once (BQX_MEMORY_BUDGET, e.g. 1GiB)."""
    compose_max_bytes: int = 0
    """Largest training file the compose merge builds (0: no limit). The local stack sets what its GCS emulator can
    hold: fake-gcs-server keeps a composed object whole in memory (docs/LOCAL-GCS.md)."""
    extract_concurrency: int = 4
    """Tables extracted at once by one task."""
    extract_retries: int = 4
    """Attempts per table before the task fails."""
    task_max_retries: int = 3
    """Cloud Run task retries; the last attempt records its failure for `bqx status`."""
    row_limit: int = 0
    """Rows of the targets read (0 = all); every table is limited to those keys. The original runs sampled ~100k."""
    warehouse_rows: int = 0
    """Local: rows per table when bqx generates the synthetic warehouse (0: bqx.local.warehouse's default)."""
    extract_aligned: bool = True
    """Extract every checkpoint LEFT JOINed onto the targets' keys, on the manifest's grid (issue 19)."""
    claim_lease_seconds: float = 60.0
    """After this long without a recorded execution, a claim may be taken over."""
    max_row_drop: float = 0.1
    """A run whose rows fall by more than this fraction from the pair's published file is not published."""
    active_run_max_seconds: float = 6 * 3600.0
    """A pair's run older than this no longer makes new requests wait ("already running")."""
    keep_versions: int = 10
    """Published training files kept per pair (versions/<pair>/<run>/); older ones are deleted on publish."""
    request_topic: str = "bqx-requests"
    """Pub/Sub topic carrying {"pair": ...} requests."""
    events_topic: str = "bqx-gcs-events"
    """Pub/Sub topic the local GCS emulator publishes object events to."""
    dead_letter_topic: str = "bqx-dead-letter"
    """Where poison messages end up after max delivery attempts."""
    run_events_topic: str = "bqx-run-events"
    """Pub/Sub topic where a run's end (published or failed) is announced."""
    max_active_extracts: int = 4
    """Extract jobs running at once; a scheduled request for more pairs starts the rest as these finish."""
    bigquery_api_endpoint: str = ""
    """BigQuery API endpoint override (a local stand-in in tests); empty = Google's."""
    bigquery_storage_endpoint: str = ""
    """BigQuery Storage Read API endpoint override (host:port; locally a plain-gRPC stand-in); empty = Google's."""
    bigquery_location: str = ""
    """Location of BigQuery jobs and the temp dataset (e.g. US); empty = the client's default."""
    run_api_endpoint: str = ""
    """Cloud Run Admin API endpoint override (local stand-in; local default: the stack's); empty = Google's."""
    iam_gate: bool = True
    """Local stack: components reach GCS and the Run API through the IAM gate, as their deployed accounts."""
    gate_identities: str = ""
    """The gate's own setting: JSON {port: {"component": name}} (written by the stack, read by the gate)."""
    deploy_dir: str = ""
    """Local stack: the Terraform whose identities and IAM grants the stack enforces (empty: the checkout's deploy/)."""
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "bqx")
    """Local stack: where the deployable artifacts' virtualenvs are kept (by the hash of their requirements)."""
    local: bool = False
    """True when talking to the local stack: anonymous credentials, never the metadata server."""
    home: Path = field(default_factory=default_home)
    """Local state: warehouse file, emulator data, logs, pid files."""
    ports: Ports = field(default_factory=Ports)
    storage_emulator_host: str = ""
    """STORAGE_EMULATOR_HOST (local; default: the stack's fake-gcs-server): the Cloud Storage emulator's URL. The
    storage client reads the variable itself; pyarrow's GCS filesystem is given this."""
    run_id: str = ""
    """BQX_RUN_ID: the run the trigger or the completion function launched this job for (empty: started by hand)."""
    task: Task = field(default_factory=Task)
    """The Cloud Run task this process is (jobs only)."""
    log_format: str = ""
    """BQX_LOG_FORMAT: 'json' forces JSON lines; empty: human text on a terminal, JSON otherwise."""
    log_level: str = "INFO"
    """BQX_LOG_LEVEL: the root logger's level."""
    failpoint_after_claim: str = ""
    """Tests only: a directory of tokens that make a claim's winner crash right after claiming (bqx.gcp.claims)."""
    failpoint_after_launch: str = ""
    """Tests only: the same, after Cloud Run accepted `run_job` and before the execution is recorded."""
    run_api_home: str = ""
    """The local Run API's own setting: where it keeps executions (written by the stack, read by bqx.local.runapi)."""
    local_jobs: str = ""
    """The local Run API's own setting: JSON {job: argv} of the jobs it runs (written by the stack)."""
    eventarc_routes: str = ""
    """The local Eventarc relay's own setting: JSON routes (written by the stack, read by bqx.local.eventarc)."""

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        emulator = _env("STORAGE_EMULATOR_HOST", "")
        local = _env("BQX_LOCAL", "") in ("1", "true", "True") or bool(emulator)
        home = Path(_env("BQX_HOME", str(d.home))).expanduser()
        ports = Ports.from_env()
        settings = cls(
            project=_env("BQX_PROJECT", _env("GOOGLE_CLOUD_PROJECT", d.project)),
            region=_env("BQX_REGION", d.region),
            staging_bucket=_env("BQX_STAGING_BUCKET", d.staging_bucket),
            output_bucket=_env("BQX_OUTPUT_BUCKET", d.output_bucket),
            dataset=_env("BQX_DATASET", d.dataset),
            temp_dataset=_env("BQX_TEMP_DATASET", d.temp_dataset),
            warehouse=_env("BQX_WAREHOUSE", str(home / "warehouse.duckdb") if local else "bigquery"),
            extract_job=_env("BQX_EXTRACT_JOB", d.extract_job),
            merge_job=_env("BQX_MERGE_JOB", d.merge_job),
            merge_method=_env("MERGE_METHOD", _env("BQX_MERGE_METHOD", d.merge_method)),
            memory_budget=parse_bytes(_env("BQX_MEMORY_BUDGET", MEMORY_BUDGET)),
            compose_max_bytes=parse_bytes(limit) if (limit := _env("BQX_COMPOSE_MAX_BYTES", "0")) != "0" else 0,
            extract_concurrency=_env_int("BQX_EXTRACT_CONCURRENCY", d.extract_concurrency),
            extract_retries=_env_int("BQX_EXTRACT_RETRIES", d.extract_retries),
            task_max_retries=_env_int("BQX_TASK_MAX_RETRIES", d.task_max_retries),
            row_limit=_env_int("BQX_ROW_LIMIT", d.row_limit),
            warehouse_rows=_env_int("BQX_WAREHOUSE_ROWS", d.warehouse_rows),
            extract_aligned=_env_flag("BQX_EXTRACT_ALIGNED", d.extract_aligned),
            claim_lease_seconds=_env_float("BQX_CLAIM_LEASE_SECONDS", d.claim_lease_seconds),
            max_row_drop=_env_float("BQX_MAX_ROW_DROP", d.max_row_drop),
            active_run_max_seconds=_env_float("BQX_ACTIVE_RUN_MAX_SECONDS", d.active_run_max_seconds),
            keep_versions=_env_int("BQX_KEEP_VERSIONS", d.keep_versions),
            request_topic=_env("BQX_REQUEST_TOPIC", d.request_topic),
            events_topic=_env("BQX_EVENTS_TOPIC", d.events_topic),
            dead_letter_topic=_env("BQX_DEAD_LETTER_TOPIC", d.dead_letter_topic),
            run_events_topic=_env("BQX_RUN_EVENTS_TOPIC", d.run_events_topic),
            max_active_extracts=_env_int("BQX_MAX_ACTIVE_EXTRACTS", d.max_active_extracts),
            bigquery_api_endpoint=_env("BQX_BIGQUERY_API_ENDPOINT", ""),
            bigquery_storage_endpoint=_env("BQX_BIGQUERY_STORAGE_ENDPOINT", ""),
            bigquery_location=_env("BQX_BIGQUERY_LOCATION", ""),
            run_api_endpoint=_env("BQX_RUN_API_ENDPOINT", f"http://127.0.0.1:{ports.run_api}" if local else ""),
            iam_gate=_env("BQX_IAM_GATE", "1") not in ("0", "false", "False", "off"),
            gate_identities=_env("BQX_GATE_IDENTITIES", ""),
            deploy_dir=_env("BQX_DEPLOY_DIR", ""),
            cache=Path(_env("BQX_CACHE", str(d.cache))).expanduser(),
            local=local,
            home=home,
            ports=ports,
            # local without one set: the stack's fake-gcs-server, where bqx.local.stack.client_env points clients
            storage_emulator_host=emulator or (f"http://127.0.0.1:{ports.gcs}" if local else ""),
            run_id=_env("BQX_RUN_ID", ""),
            task=Task.from_env(),
            log_format=_env("BQX_LOG_FORMAT", ""),
            log_level=_env("BQX_LOG_LEVEL", d.log_level).upper(),
            failpoint_after_claim=_env("BQX_FAILPOINT_AFTER_CLAIM", ""),
            failpoint_after_launch=_env("BQX_FAILPOINT_AFTER_LAUNCH", ""),
            run_api_home=_env("BQX_RUN_API_HOME", ""),
            local_jobs=_env("BQX_LOCAL_JOBS", ""),
            eventarc_routes=_env("BQX_EVENTARC_ROUTES", ""),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        check_merge_method(self.merge_method)
        if self.extract_concurrency < 1 or self.extract_retries < 1:
            raise ConfigError("BQX_EXTRACT_CONCURRENCY and BQX_EXTRACT_RETRIES must be >= 1")
        if self.max_active_extracts < 1 or self.keep_versions < 1:
            raise ConfigError("BQX_MAX_ACTIVE_EXTRACTS and BQX_KEEP_VERSIONS must be >= 1")
