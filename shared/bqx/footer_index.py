"""The extract's footer indexes in GCS: each task attempt saves the footers of the checkpoints it wrote or copied
(layout.extract_footers), and the compose merge takes them instead of one tail read per checkpoint.

An index is a cache, never the truth: the merge uses an entry only for a checkpoint whose listed size and crc32c
are the entry's (bqx.parquet.tails), and reads every other footer from the object. So an index that is missing (a
task killed before saving it), partial (tables an earlier attempt wrote) or stale (a checkpoint replaced since)
costs requests, never a wrong file. Saving one is best effort for the same reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from bqx import layout
from bqx.config import Settings
from bqx.gcp import storage
from bqx.logs import Log
from bqx.parquet.tails import FooterIndex, KeptFooter, KeptFooters, parse_index

log = Log("bqx.footer_index")
READ_THREADS = 8


def save(s: Settings, pair: str, run_id: str, task_index: int, index: FooterIndex) -> None:
    """Save this task attempt's index (nothing when it kept no footer); a failure is logged, not raised."""
    if not len(index):
        return
    try:
        blob = storage.bucket(s, s.staging_bucket).blob(layout.extract_footers(pair, run_id, task_index,
                                                                               s.task.attempt))
        blob.upload_from_string(index.encode(), content_type="application/octet-stream")
    except Exception as exc:  # noqa: BLE001 - the merge reads the footers itself instead
        log.warning(f"could not save the footer index: {exc}", pair=pair, run_id=run_id)


def load(s: Settings, pair: str, run_id: str) -> tuple[KeptFooters, int]:
    """Every footer the run's extract tasks kept, and the bytes read to get them. An index that cannot be read or
    parsed is skipped, and so is every index when they cannot be listed (each footer is then read instead)."""
    try:
        names = sorted(storage.list_names(s, s.staging_bucket, layout.extract_footers_prefix(pair, run_id)))
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be listed is a cache not used
        log.warning(f"footer indexes not used: {exc}", pair=pair, run_id=run_id)
        return KeptFooters(), 0

    def one(name: str) -> tuple[dict[str, KeptFooter], int]:
        try:
            raw = storage.read_bytes(s, s.staging_bucket, name)
            return (parse_index(raw), len(raw)) if raw is not None else ({}, 0)
        except Exception as exc:  # noqa: BLE001 - its footers are read from the checkpoints instead
            log.warning(f"footer index {name} not used: {exc}", pair=pair, run_id=run_id)
            return {}, 0

    kept = KeptFooters()
    read = 0
    with ThreadPoolExecutor(max(1, min(READ_THREADS, len(names)))) as pool:
        for footers, n in pool.map(one, names):
            kept.update(footers)
            read += n
    return kept, read
