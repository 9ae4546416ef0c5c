"""The merged file's bytes do not depend on which worker finishes first, and a merge that fails part-way leaves
no checkpoint open."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bqx import layout
from bqx.errors import DuplicateKeys
from bqx.local.warehouse import Shape, feature_arrow, table_specs, targets_arrow
from bqx.merge.plan import MergeInput, local_inputs
from bqx.merge.stream import merge


def _inputs(directory: Path) -> tuple[MergeInput, list[MergeInput]]:
    shape = Shape(rows=1500, seed=3, table_scale=0.05, column_scale=0.5)
    pq.write_table(targets_arrow("eurusd", shape), directory / "targets_eurusd.parquet")
    for spec in table_specs("eurusd", shape):
        pq.write_table(feature_arrow("eurusd", spec, shape), directory / f"{spec.name}.parquet")
    t, features = local_inputs(directory)
    return t, [MergeInput(f.table, layout.prefix_of("eurusd", f.table), f.open) for f in features]


def _open_fds() -> set[tuple[str, str]]:
    """(fd, what it points at) for each open descriptor. Compared as sets, so a descriptor that something else in
    the process (a pooled connection of an earlier test) closes meanwhile does not hide or fake a leak."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass  # closed while listing (the listing's own descriptor among them)
    return out


def test_same_inputs_give_the_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    t, features = _inputs(tmp_path)
    digests = set()
    fds = _open_fds()
    for workers, budget in ((1, 64 << 20), (2, 64 << 20), (2, 8 << 20), (2, 64 << 20)):
        out = io.BytesIO()
        stats = merge(t, features, out, memory_budget=budget, workers=workers)
        assert stats.bytes == len(out.getvalue())
        digests.add((budget, hashlib.sha256(out.getvalue()).hexdigest()))
        # A real file too: copied tables then go through copy_file_range and wait for their turn unread.
        with open(tmp_path / "out.bin", "wb") as sink:
            stats = merge(t, features, sink, memory_budget=budget, workers=workers)
        assert 0 < stats.copied_tables < len(features)  # both paths, interleaved
        assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digests_of(digests, budget)
    # the budget may change row-group sizes (and so the bytes); the number of workers may not
    assert len(digests) == len({b for b, _ in digests})
    assert _open_fds() - fds == set()  # every checkpoint a copied range held open was closed


def digests_of(digests: set[tuple[int, str]], budget: int) -> str:
    return next(d for b, d in digests if b == budget)


def test_a_failing_table_reports_itself_and_leaves_nothing_open(tmp_path: Path) -> None:
    t, features = _inputs(tmp_path)
    copyable = [f for f in features if pq.ParquetFile(f.open()).metadata.num_rows == 1500]
    assert len(copyable) > 4
    victim = next(f for f in features if f not in copyable and features.index(f) > features.index(copyable[3]))
    table = pq.read_table(victim.open())
    pq.write_table(pa.concat_tables([table.slice(0, 10), table.slice(9)]), victim.open())  # one key twice
    fds = _open_fds()
    for _ in range(3):
        with open(tmp_path / "out.bin", "wb") as sink, pytest.raises(DuplicateKeys) as err:
            merge(t, features, sink, memory_budget=64 << 20, workers=2)
        assert err.value.table == victim.table
    assert _open_fds() - fds == set()


class _FullDisk(io.RawIOBase):
    """A sink that fails once `room` bytes have been written, like a full disk."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def,override]
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(28, "No space left on device")
        self.room -= n
        return n


def test_a_failing_sink_fails_the_merge_promptly_with_its_own_error(tmp_path: Path) -> None:
    t, features = _inputs(tmp_path)
    fds = _open_fds()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            merge(t, features, _FullDisk(200_000), memory_budget=64 << 20, workers=2)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the merge hung after its sink failed"
    assert len(outcome) == 1 and isinstance(outcome[0], OSError) and outcome[0].errno == 28, outcome
    assert _open_fds() == fds
