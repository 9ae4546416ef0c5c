"""A run's state, read from the buckets alone (works the same against the cloud and the local stack)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bqx import ids, layout
from bqx.catalog import Manifest, TableEntry, family_of
from bqx.config import Settings
from bqx.errors import AlreadyRunning, TerminalError, TransientError
from bqx.gcp import claims, storage


@dataclass
class RunState:
    pair: str
    run_id: str | None
    state: str  # none | queued | requested | extracting | handoff | merging | publishing | done | failed
    expected: int = 0
    present: int = 0
    families: dict[str, list[int]] = field(default_factory=dict)  # family -> [present, expected]
    error: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    merge_execution: str | None = None
    extract_execution: str | None = None
    requested_at: float | None = None
    bytes: int = 0
    validated: int = 0  # checkpoints the completion function has checked
    merge_progress: dict[str, Any] | None = None  # the merge job's: phase, tables_written, tables
    first_checkpoint_at: float | None = None
    last_checkpoint_at: float | None = None
    tables_per_second: float | None = None
    eta_seconds: float | None = None
    queued_ahead: int | None = None  # queued: requests (of any pair) that start before this one
    storage_wait: float = 0.0  # set by `follow`: seconds its status poll has been waiting for storage to answer


    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def submit(settings: Settings, pair: str, force: bool = False, accept_drift: bool = False) -> str:
    """Drop requests/<pair>.json in the staging bucket; returns the run id the trigger will use."""
    blob = storage.bucket(settings, settings.staging_bucket).blob(layout.request(pair))
    body = {"pair": pair, "requested_by": "bqx", **({"force": True} if force else {}),
            **({"accept_drift": True} if accept_drift else {})}
    blob.upload_from_string(storage.dumps(body), content_type="application/json")
    return ids.run_id_for_object(settings.staging_bucket, blob.name, blob.generation)


def submit_pairs(settings: Settings, pairs: list[str], force: bool = False, accept_drift: bool = False,
                 origin: str = "bqx") -> dict[str, str]:
    """Request several pairs in one message on the requests topic, as the Cloud Scheduler job does; pair -> the
    run id the trigger gives it (one per message and pair). They start as extract slots free (bqx.schedule)."""
    from bqx.gcp.clients import publish

    body = {"pairs": list(pairs), "origin": origin, "requested_by": "bqx", **({"force": True} if force else {}),
            **({"accept_drift": True} if accept_drift else {})}
    message_id = publish(settings, settings.request_topic, storage.dumps(body))
    return {pair: ids.run_id_for_pair_message(message_id, pair) for pair in pairs}


def latest_run(settings: Settings, pair: str) -> str | None:
    found = storage.read_json(settings, settings.staging_bucket, layout.latest(pair))
    return None if found is None else str(found[0].get("run_id"))


def active_run(s: Settings, pair: str, latest: dict[str, Any]) -> dict[str, Any] | None:
    """The extract claim of the pair's latest run while that run is active, else None. Active: requested less
    than BQX_ACTIVE_RUN_MAX_SECONDS ago, its extract launched (or being launched within the claim lease), no
    error.json, and no summary of that run in the output bucket."""
    run_id = latest.get("run_id")
    if not isinstance(run_id, str) or time.time() - float(latest.get("requested_at") or 0) > s.active_run_max_seconds:
        return None
    try:
        claim_name = layout.claim(pair, run_id, "extract")
    except TerminalError:
        return None  # a pointer we did not write: not a run to wait for
    found = storage.read_json(s, s.staging_bucket, claim_name)
    if found is None:
        return None  # never launched: its launch failed and gave the claim back
    claim = found[0]
    if not claim.get("execution") and time.time() - float(claim.get("claimed_at") or 0) > s.claim_lease_seconds:
        return None  # its launcher died before launching
    if storage.exists(s, s.staging_bucket, layout.run_error(pair, run_id)):
        return None
    summary = storage.read_json(s, s.output_bucket, layout.summary(pair))
    if summary is not None and summary[0].get("run_id") == run_id:
        return None
    return claim


def active_run_id(settings: Settings, pair: str) -> str | None:
    """The pair's latest run id while it is active (the same rule the trigger applies), else None."""
    found = storage.read_json(settings, settings.staging_bucket, layout.latest(pair))
    if found is None:
        return None
    return str(found[0]["run_id"]) if active_run(settings, pair, found[0]) is not None else None


def register(s: Settings, pair: str, run_id: str, launch: Callable[[], str], origin: dict[str, Any],
             force: bool = False, accept_drift: bool = False) -> claims.Outcome:
    """Make run `run_id` the pair's latest run and launch its extract, once: what the trigger does for a request
    (`launch` starts the extract job) and what an extract started by hand does for itself (`launch` returns its own
    execution). While the pair's latest run is another, active one, raises AlreadyRunning unless `force`. The
    latest.json pointer is swapped with a generation precondition, so of two runs racing for an idle pair only one
    starts; the other's claim is given back and it raises TransientError (decide again). The claim
    `runs/<pair>/<run>/extract.claim` records the execution (docs/EXACTLY-ONCE.md)."""
    found = storage.read_json(s, s.staging_bucket, layout.latest(pair))
    latest, latest_gen = found if found is not None else ({}, 0)
    if latest.get("run_id") not in (None, run_id) and not force:
        busy = active_run(s, pair, latest)
        if busy is not None:
            raise AlreadyRunning(pair, str(latest["run_id"]), busy.get("execution"))

    def start() -> str:
        pointer = {"pair": pair, "run_id": run_id, "requested_at": time.time(), "force": force, **origin}
        if storage.replace_json(s, s.staging_bucket, layout.latest(pair), pointer, latest_gen) is None:
            raise TransientError(f"another run of {pair} was started meanwhile; deciding again")
        return launch()

    # the run's options live in its extract claim: written once, read by its merge (bqx.merge.publish)
    options = {"accept_drift": True} if accept_drift else {}
    return claims.launch_once(s, layout.claim(pair, run_id, "extract"), start,
                              {"pair": pair, "run_id": run_id, **options})


def run_ids(s: Settings, pair: str) -> list[str]:
    """The pair's runs that have a manifest, newest first (by when the manifest was written)."""
    found = []
    for name, (_, created) in storage.list_objects(s, s.staging_bucket, layout.runs_prefix(pair)).items():
        run_id = layout.parse_manifest(pair, name)
        if run_id is not None:
            found.append((created, run_id))
    return [run_id for _, run_id in sorted(found, reverse=True)]


def load_manifest(s: Settings, pair: str, run_id: str) -> Manifest | None:
    """The run's manifest, or None. A manifest is written once (create-if-absent, before any checkpoint) and never
    changed, so a process keeps the few it last read: the completion function sees one run's manifest (17k
    columns, ~1 MB of JSON) on each of its 668 events, and parsing it each time was most of an event's CPU."""
    key = (s.staging_bucket, pair, run_id)
    cached = _manifests.get(key)
    if cached is not None:
        return cached
    with _manifests_lock:  # one thread parses; the others, woken by the same run's first events, wait for it
        cached = _manifests.get(key)
        if cached is not None:
            return cached
        found = storage.read_json(s, s.staging_bucket, layout.manifest(pair, run_id))
        if found is None:
            return None
        manifest = _manifests[key] = Manifest.from_json(found[0])
        while len(_manifests) > _MANIFESTS_KEPT:
            _manifests.pop(next(iter(_manifests)))
    return manifest


_MANIFESTS_KEPT = 8
_manifests: dict[tuple[str, str, str], Manifest] = {}
_manifests_lock = threading.Lock()


def newest_complete(s: Settings, pair: str) -> Manifest | None:
    """The manifest of the pair's newest run whose every checkpoint is present and validated (the completion
    function's test, bqx.completion.validate.complete), or None."""
    from bqx.completion import validate  # pyarrow: only the callers that look at checkpoints pay for it

    for run_id in run_ids(s, pair):
        manifest = load_manifest(s, pair, run_id)
        if manifest is None:
            continue
        try:
            done = validate.complete(s, manifest)[0]
        except TerminalError:  # a checkpoint was just rejected (set aside and recorded): not complete
            continue
        if done:
            return manifest
    return None


def published(s: Settings, pair: str) -> tuple[dict[str, Any], Manifest] | None:
    """The pair's last published run: its summary (training_<pair>.summary.json) and its manifest, or None."""
    found = storage.read_json(s, s.output_bucket, layout.summary(pair))
    run_id = found[0].get("run_id") if found else None
    if not isinstance(run_id, str):
        return None
    try:
        manifest = load_manifest(s, pair, run_id)
    except TerminalError:  # a summary naming a run id outside the layout, or a malformed manifest
        return None
    return None if manifest is None else (found[0], manifest)  # type: ignore[index]


def unchanged(previous: Manifest, current: Manifest) -> dict[str, TableEntry]:
    """table -> its entry in `previous`, for each of `current`'s tables that holds the same data there: same source
    and row limit, and the same role, columns and (non-empty) fingerprint. Such a table's checkpoint can be reused."""
    if previous.source != current.source or previous.row_limit != current.row_limit:
        return {}
    before = {t.name: t for t in previous.tables}
    out = {}
    for t in current.tables:
        p = before.get(t.name)
        if p is not None and t.fingerprint and (p.fingerprint, p.role, p.columns) == (t.fingerprint, t.role, t.columns):
            out[t.name] = p
    return out


def up_to_date(s: Settings, pair: str, source: Any) -> dict[str, Any] | None:
    """The summary of the pair's last published run when a new run would publish the same training file: every
    table the source has now is unchanged since that run (`unchanged`), no table came or went, and the training file
    is still there. None otherwise. `source`: a bqx.extract.sources.Source (one discovery: two queries)."""
    found = published(s, pair)
    if found is None:
        return None
    summary, previous = found
    from bqx.extract.run import build_manifest  # pyarrow: the trigger imports this module, and never calls this

    current = build_manifest(pair, previous.run_id, source.discover(pair), source.name, s.row_limit)
    same = unchanged(previous, current)
    if len(same) != len(current.tables) or len(same) != len(previous.tables):
        return None
    try:
        return summary if published_output(s, pair) is not None else None
    except TransientError:  # another run is publishing right now: not up to date
        return None


def published_output(s: Settings, pair: str) -> tuple[dict[str, Any], Any] | None:
    """The pair's published training file with its summary, as one unit: (summary, the file's blob at the generation
    the summary names: download it, or gs://<bucket>/training_<pair>.parquet#<generation>). None before any publish.
    TransientError while a publish is between its two writes (the file is not the generation the summary names):
    read again. The summary is the commit point (bqx.merge.publish.publish; docs/EXACTLY-ONCE.md)."""
    found = storage.read_json(s, s.output_bucket, layout.summary(pair))
    if found is None:
        return None
    summary = found[0]
    pinned = summary.get("output_generation")
    blob = storage.bucket(s, s.output_bucket).get_blob(layout.output(pair), generation=pinned)
    if blob is None:
        if pinned is None:
            return None
        raise TransientError(f"training file of {pair} is being replaced (generation {pinned}, named by its "
                             "summary, is gone); read the summary again")
    return summary, blob


def queued_state(s: Settings, pair: str, run_id: str | None) -> RunState | None:
    """The pair's request waiting for an extract slot (bqx.schedule): `run_id`, or its newest; None if none waits."""
    from bqx import schedule

    mine = [q for q in schedule.waiting(s, pair) if run_id is None or q.run_id == run_id]
    if not mine:
        return None
    newest = mine[-1]
    ahead = sum(1 for q in schedule.waiting(s) if (q.queued_at, q.name) < (newest.queued_at, newest.name))
    return RunState(pair, newest.run_id, "queued", requested_at=newest.queued_at, queued_ahead=ahead)


STATE_READS = 3  # tries of a status read that meets an object replaced while it was read


def state(settings: Settings, pair: str, run_id: str | None = None) -> RunState:
    """Where the pair's run (its newest, or `run_id`) stands, from the buckets. The run's objects change while
    they are read (a claim taken over is deleted and created again): a read that meets that is done again."""
    for attempt in range(STATE_READS):
        try:
            return _state(settings, pair, run_id)
        except TransientError:
            if attempt == STATE_READS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _state(settings: Settings, pair: str, run_id: str | None = None) -> RunState:
    s = settings
    queued = queued_state(s, pair, run_id)
    if queued is not None and not storage.exists(s, s.staging_bucket, layout.claim(pair, queued.run_id, "extract")):
        return queued
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
            # the execution that started the stage's work (bqx.job.claim_start), else the one launched for it
            started = storage.read_json(s, s.staging_bucket, layout.started(pair, run_id, stage))
            setattr(rs, f"{stage}_execution", (started[0] if started else c[0]).get("execution"))
    manifest = load_manifest(s, pair, run_id)  # parsed once per process: `bqx run` asks every half second
    if manifest is not None:
        from bqx.completion.validate import (
            is_marked,  # pyarrow: the CLI has it; the trigger, which imports this module, not
        )

        expected, present = manifest.expected_objects(), {}
        for b in storage.list_blobs(s, s.staging_bucket, layout.checkpoints_prefix(pair, run_id)):
            if b.name in expected:
                present[b.name] = (int(b.size or 0), b.time_created.timestamp() if b.time_created else 0.0)
                rs.validated += is_marked(b)
        rs.expected, rs.present = len(manifest.tables), len(present)
        rs.bytes = sum(size for size, _ in present.values())
        if present:
            times = sorted(t for _, t in present.values())
            rs.first_checkpoint_at, rs.last_checkpoint_at = times[0], times[-1]
            start = manifest.created_at or times[0]
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
            rs.state = "handoff"  # every checkpoint in; validating and waiting for the merge to be started
    elif rs.extract_execution:
        rs.state = "extracting"
    if rs.merge_execution and rs.state in ("handoff", "extracting"):
        rs.state = "merging"  # only once a merge execution exists
        progress = storage.read_json(s, s.staging_bucket, layout.merge_progress(pair, run_id))
        if progress:
            rs.merge_progress = progress[0]
            if progress[0].get("phase") == "publishing":
                rs.state = "publishing"
    if rs.summary:
        rs.state = "done"
    elif err:
        rs.error, rs.state = err[0], "failed"
    return rs


def follow(settings: Settings, pair: str, run_id: str, timeout: float, on_update=None, poll: float = 0.5):  # type: ignore[no-untyped-def]
    """Poll until the run is done or failed; returns the final RunState. `on_update` hears of the last state at
    least once a second, also while a poll is still waiting for storage (fake-gcs-server answers nothing while it
    composes or copies a large object), so a follower's clock keeps moving."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Pending
    from dataclasses import replace

    deadline = time.time() + timeout
    last = None
    pool = ThreadPoolExecutor(1, thread_name_prefix="follow")
    try:
        while True:
            polling = pool.submit(state, settings, pair, run_id)
            asked = time.time()
            while True:
                try:
                    rs = polling.result(timeout=1.0)
                    break
                except Pending:
                    if on_update and last is not None:
                        on_update(replace(last, storage_wait=time.time() - asked))
                    if time.time() > deadline + 60:
                        raise TerminalError(f"{pair}: run {run_id}: storage did not answer for 60 s after the "
                                            f"{timeout:.0f}s timeout; see `bqx status {pair}`") from None
            last = rs
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
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def record_failure(s: Settings, pair: str, run_id: str, stage: str, error: str, error_type: str, retry: str,
                   table: str | None = None, **extra: Any) -> bool:
    """Record why the run cannot go on in runs/<pair>/<run>/error.json, where `bqx status` and `bqx run` show it
    with the command to retry: the one writer of that record (the functions, the completion's validation, the jobs).

    The first failure recorded wins (create-once); True if this one was recorded. The record answers "why did this
    run stop", and the first failure is that cause (what follows it is often its consequence). It is also what
    bqx.completion.validate.blocking_error decides on: a validation error about a table since re-extracted and
    validated no longer blocks the merge, so a later record must never replace an earlier one (it could turn an
    error that blocks for good, an unexpected table or a refused merge, into one that no longer blocks). And with
    many writers at once (668 completion events, the job's tasks) create-once keeps the record from changing under
    `bqx status` while they race."""
    body = {"pair": pair, "run_id": run_id, "stage": stage, "error": error, "error_type": error_type,
            "table": table, "at": time.time(), "retry": retry, **extra}
    return storage.create_json(s, s.staging_bucket, layout.run_error(pair, run_id), body) is not None
