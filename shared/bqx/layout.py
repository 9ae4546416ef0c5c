"""The only code that builds or parses GCS object names. Parsing rejects anything outside the layout.

Staging bucket:
    requests/<pair>.json                          a request to extract <pair> (written by users)
    runs/<pair>/latest.json                       pointer to the pair's newest run
    runs/<pair>/<run_id>/manifest.json            expected tables and schemas, written before any checkpoint
    runs/<pair>/<run_id>/<stage>.claim            create-once marker guarding a job launch (extract, merge)
    runs/<pair>/<run_id>/<stage>.started          create-once: the one execution that does the stage's work
    runs/<pair>/<run_id>/error.json               a terminal failure of the run, for people and `bqx status`
    runs/<pair>/<run_id>/done.json                the run's summary, once published (its end, for run events)
    queue/requests/<pair>/<run_id>.json           a request waiting for an extract slot (bqx.schedule)
    queue/slots/<n>.json                          one of the max_active_extracts slots, held by a run's extract
    runs/<pair>/<run_id>/extract/task-<i>-attempt-<a>.json   per-table timings of one extract task attempt
    runs/<pair>/<run_id>/footers/task-<i>-attempt-<a>.footers   the footers of the checkpoints that attempt wrote
    runs/<pair>/<run_id>/compose/...              the compose merge's footer, parts and composed file (deleted after)
    checkpoints/<pair>/<run_id>/<table>.parquet   one table's rows, sorted by interval_time
    quarantine/<pair>/<run_id>/<table>.parquet    a checkpoint set aside because it was bad
    runs/<pair>/<run_id>/bigquery/stage-<i>-<key>/part-*.parquet   the bigquery merge method's exports (scratch)
Output bucket:
    training_<pair>.parquet, training_<pair>.summary.json, training_<pair>.schema.json,
    tmp/<run_id>/training_<pair>.parquet,
    versions/<pair>/<run_id>/training_<pair>.{parquet,summary.json,schema.json}   each published run, kept
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bqx.errors import OutsideLayout, TerminalError
from bqx.pairs import PAIRS, validate_pair

TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")
RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
STAGES = ("extract", "merge")

CHECKPOINTS = "checkpoints/"
REQUESTS = "requests/"


def _pair(pair: str) -> str:
    return validate_pair(pair)


def _run(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise OutsideLayout(f"not a run id: {run_id!r}")
    return run_id


def _table(table: str) -> str:
    if not TABLE_RE.match(table):
        raise OutsideLayout(f"not a table name: {table!r}")
    return table


def request(pair: str) -> str:
    return f"{REQUESTS}{_pair(pair)}.json"


def runs_prefix(pair: str) -> str:
    return f"runs/{_pair(pair)}/"


def latest(pair: str) -> str:
    return f"{runs_prefix(pair)}latest.json"


def run_prefix(pair: str, run_id: str) -> str:
    return f"{runs_prefix(pair)}{_run(run_id)}/"


def manifest(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}manifest.json"


def parse_manifest(pair: str, name: str) -> str | None:
    """The run id when `name` is a manifest of `pair` exactly as manifest() builds it, else None."""
    prefix = runs_prefix(pair)
    if not name.startswith(prefix):
        return None
    run_id = name[len(prefix):].split("/", 1)[0]
    try:
        return run_id if manifest(pair, run_id) == name else None
    except TerminalError:  # not a run directory bqx wrote
        return None


def claim(pair: str, run_id: str, stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return f"{run_prefix(pair, run_id)}{stage}.claim"


def started(pair: str, run_id: str, stage: str) -> str:
    """The execution that claimed the run's `stage` as it started (bqx.job.claim_start): the one that does the work."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return f"{run_prefix(pair, run_id)}{stage}.started"


def run_done(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}done.json"


_RUN_END = re.compile(r"^runs/([a-z]{6})/([a-z0-9][a-z0-9-]{0,62})/(done|error)\.json$")


def parse_run_end(name: str) -> tuple[str, str, str] | None:
    """(pair, run_id, 'done' | 'failed') when `name` is a run's done.json or error.json, else None."""
    m = _RUN_END.match(name)
    if not m or m.group(1) not in PAIRS:
        return None
    return m.group(1), m.group(2), "done" if m.group(3) == "done" else "failed"


QUEUE_REQUESTS = "queue/requests/"
QUEUE_SLOTS = "queue/slots/"


def queued(pair: str, run_id: str) -> str:
    return f"{QUEUE_REQUESTS}{_pair(pair)}/{_run(run_id)}.json"


def queued_prefix(pair: str | None = None) -> str:
    return QUEUE_REQUESTS if pair is None else f"{QUEUE_REQUESTS}{_pair(pair)}/"


_QUEUED = re.compile(r"^queue/requests/([a-z]{6})/([a-z0-9][a-z0-9-]{0,62})\.json$")


def parse_queued(name: str) -> tuple[str, str] | None:
    m = _QUEUED.match(name)
    return (m.group(1), m.group(2)) if m and m.group(1) in PAIRS else None


def slot(index: int) -> str:
    return f"{QUEUE_SLOTS}{int(index):04d}.json"


def parse_slot(name: str) -> int | None:
    m = re.match(r"^queue/slots/(\d{4})\.json$", name)
    return int(m.group(1)) if m else None


def merge_progress(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}merge-progress.json"


def compose_prefix(pair: str, run_id: str) -> str:
    """Everything the compose merge creates for a run (bqx.merge.compose): deleted once it is published."""
    return f"{run_prefix(pair, run_id)}compose/"


# The compose merge's pieces end in this suffix, the one an IAM condition can name (deploy/iam.tf: only the merge
# account may create them; conditions can test a name's start and end, not a folder in its middle).
COMPOSE_PIECE = ".compose"


def compose_footer(pair: str, run_id: str) -> str:
    return f"{compose_prefix(pair, run_id)}footer{COMPOSE_PIECE}"


def compose_part(pair: str, run_id: str, level: int, index: int) -> str:
    return f"{compose_prefix(pair, run_id)}part-{int(level)}-{int(index):04d}{COMPOSE_PIECE}"


def compose_output(pair: str, run_id: str) -> str:
    return f"{compose_prefix(pair, run_id)}training_{_pair(pair)}.parquet"


def run_error(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}error.json"


def extract_report(pair: str, run_id: str, task_index: int, attempt: int) -> str:
    return f"{run_prefix(pair, run_id)}extract/task-{int(task_index):04d}-attempt-{int(attempt):02d}.json"


def extract_reports_prefix(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}extract/"


_EXTRACT_REPORT = re.compile(r"^runs/([a-z]{6})/([a-z0-9][a-z0-9-]{0,62})/extract/task-(\d{4})-attempt-(\d{2})\.json$")


def parse_extract_report(name: str) -> tuple[str, str] | None:
    """(pair, run_id) when `name` is an extract task's report exactly as extract_report builds it, else None."""
    m = _EXTRACT_REPORT.match(name)
    if not m:
        return None
    try:
        if extract_report(m.group(1), m.group(2), int(m.group(3)), int(m.group(4))) != name:
            return None
    except TerminalError:  # an unknown pair or a run id outside the layout
        return None
    return m.group(1), m.group(2)


def extract_footers(pair: str, run_id: str, task_index: int, attempt: int) -> str:
    """The footer index of one extract task attempt (bqx.footer_index): what the compose merge need not read."""
    return f"{run_prefix(pair, run_id)}footers/task-{int(task_index):04d}-attempt-{int(attempt):02d}.footers"


def extract_footers_prefix(pair: str, run_id: str) -> str:
    return f"{run_prefix(pair, run_id)}footers/"


def checkpoints_prefix(pair: str, run_id: str) -> str:
    return f"{CHECKPOINTS}{_pair(pair)}/{_run(run_id)}/"


def checkpoint(pair: str, run_id: str, table: str) -> str:
    return f"{checkpoints_prefix(pair, run_id)}{_table(table)}.parquet"


def quarantine(pair: str, run_id: str, table: str) -> str:
    return f"quarantine/{_pair(pair)}/{_run(run_id)}/{_table(table)}.parquet"


def output(pair: str) -> str:
    return f"training_{_pair(pair)}.parquet"


def summary(pair: str) -> str:
    return f"training_{_pair(pair)}.summary.json"


def schema(pair: str) -> str:
    return f"training_{_pair(pair)}.schema.json"


def versions_prefix(pair: str) -> str:
    return f"versions/{_pair(pair)}/"


def version(pair: str, run_id: str, kind: str = "parquet") -> str:
    """A published run's kept copy: kind parquet, summary.json or schema.json."""
    if kind not in ("parquet", "summary.json", "schema.json"):
        raise ValueError(f"unknown version object {kind!r}")
    return f"{versions_prefix(pair)}{_run(run_id)}/training_{_pair(pair)}.{kind}"


def output_temp(pair: str, run_id: str) -> str:
    return f"tmp/{_run(run_id)}/training_{_pair(pair)}.parquet"


def bigquery_exports(pair: str, run_id: str) -> str:
    """Prefix of the bigquery merge method's stage exports (deleted after a successful stitch)."""
    return f"{run_prefix(pair, run_id)}bigquery/"


def bigquery_stage_exports(pair: str, run_id: str, stage: int, key: str) -> str:
    """Prefix of one stage's export files; `key` is the digest of the stage's SQL."""
    return f"{bigquery_exports(pair, run_id)}stage-{stage:03d}-{key}/"


def _bigquery_id(run_id: str) -> str:
    return _run(run_id).replace("-", "_")  # BigQuery table and job ids allow no '-'


def bigquery_temp_table(pair: str, run_id: str, table: str) -> str:
    """The temp table (in the temp dataset) the bigquery merge method loads one checkpoint into."""
    return f"bqx_{_pair(pair)}_{_bigquery_id(run_id)}_{_table(table)}"


def bigquery_job_id(pair: str, run_id: str, step: str, config_key: str, attempt: int) -> str:
    """A bigquery merge job's deterministic id: a retried merge reattaches to the job instead of paying twice."""
    return f"bqx_{_pair(pair)}_{_bigquery_id(run_id)}_{step}_{config_key}_a{attempt}"


@dataclass(frozen=True)
class CheckpointName:
    pair: str
    run_id: str
    table: str


_CHECKPOINT_RE = re.compile(r"^checkpoints/([a-z]{6})/([a-z0-9][a-z0-9-]{0,62})/([a-z][a-z0-9_]{0,127})\.parquet$")
_REQUEST_RE = re.compile(r"^requests/([^/]{1,64})\.json$")


def parse_checkpoint(name: str) -> CheckpointName:
    m = _CHECKPOINT_RE.match(name)
    if not m or m.group(1) not in PAIRS:
        raise OutsideLayout(f"not a checkpoint object: {name!r}")
    return CheckpointName(*m.groups())


def parse_request(name: str) -> str:
    """requests/<pair>.json -> pair (validated)."""
    m = _REQUEST_RE.match(name)
    if not m:
        raise OutsideLayout(f"not a request object: {name!r} (expected requests/<pair>.json)")
    return validate_pair(m.group(1))


def prefix_of(pair: str, table: str) -> str:
    """Column prefix of a table in the merged file: the table's name less the pair (its second token), so
    `cov_eurusd_eurgbp_w45` -> `cov_eurgbp_w45`. Unique, since the pair's table names are."""
    parts = table.split("_")
    if len(parts) > 1 and parts[1] == pair:
        del parts[1]
    return "_".join(parts)
