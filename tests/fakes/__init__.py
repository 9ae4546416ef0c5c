"""Local stand-ins for Google APIs that have no official emulator: a BigQuery REST server on 127.0.0.1, and a
fake-gcs-server process for the tests that need one. Nothing here ever contacts a Google endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bqx.local.stack import free_port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def fake_gcs_server(workdir: Path) -> Iterator[str]:
    """A fake-gcs-server (in-memory backend) on a free loopback port; yields its http:// endpoint."""
    from bqx.local.stack import fake_gcs_binary

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "fake-gcs.log", "ab")
    proc = subprocess.Popen(
        [str(fake_gcs_binary()), "-host", "127.0.0.1", "-port", str(port), "-scheme", "http", "-backend", "memory",
         "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(workdir),
    )
    try:
        deadline = time.monotonic() + 30
        while not _port_open(port):  # polling a port to come up, not sleeping to synchronise work
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not start: {(workdir / 'fake-gcs.log').read_text()[-500:]}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def gcs_env(endpoint: str) -> dict[str, str]:
    """What google-cloud-storage (and bqx in local mode) needs to reach the fake and nothing else."""
    return {"STORAGE_EMULATOR_HOST": endpoint, "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9"}


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def local_settings(home: Path, gcs_endpoint: str, **overrides: object):  # type: ignore[no-untyped-def]
    """Settings for the local fakes: a home and GCS port of their own (clients are cached per Settings)."""
    from bqx.config import Ports, Settings

    port = int(gcs_endpoint.rsplit(":", 1)[1])
    base = {"project": "bqx-test", "staging_bucket": "bqx-test-staging", "output_bucket": "bqx-test-output",
            "local": True, "home": home, "ports": Ports(gcs=port), "storage_emulator_host": gcs_endpoint}
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


def create_buckets(settings, *names: str) -> None:  # type: ignore[no-untyped-def]
    from google.api_core.exceptions import Conflict

    from bqx.gcp.clients import storage_client

    for name in names:
        try:
            storage_client(settings).create_bucket(name)
        except Conflict:
            pass


@contextmanager
def merge_world(root: Path, shape, pair: str = "eurusd", run_id: str = "rplan", **settings_overrides):  # type: ignore[no-untyped-def]
    """fake-gcs with one extracted run (checkpoints + manifest from a generated DuckDB warehouse) and the
    reference output of bqx.merge.stream.merge over those checkpoints. Yields a dict."""
    import io

    import pyarrow.parquet as pq

    from bqx.catalog import Manifest
    from bqx.extract import run as extract
    from bqx.extract.sources import DuckDBSource
    from bqx.gcp import storage
    from bqx.local.warehouse import Warehouse
    from bqx.merge.plan import gcs_inputs
    from bqx.merge.stream import merge

    warehouse = root / "warehouse.duckdb"
    with fake_gcs_server(root / "gcs") as endpoint:
        apply_env(gcs_env(endpoint))
        settings = local_settings(root, endpoint, warehouse=str(warehouse), **settings_overrides)
        Warehouse(warehouse, settings.dataset).generate(pair, shape)
        create_buckets(settings, settings.staging_bucket, settings.output_bucket)
        extract.run(settings, pair, run_id, source=DuckDBSource(str(warehouse), settings.dataset))
        manifest = Manifest.from_json(storage.read_json(settings, settings.staging_bucket,
                                                        f"runs/{pair}/{run_id}/manifest.json")[0])
        validate_all(settings, manifest)
        sink = io.BytesIO()
        targets, features = gcs_inputs(settings, manifest)
        merge(targets, features, sink, memory_budget=settings.memory_budget, workers=1)
        reference = pq.read_table(io.BytesIO(sink.getvalue()))
        yield {"settings": settings, "manifest": manifest, "reference": reference, "endpoint": endpoint,
               "reference_file": pq.ParquetFile(io.BytesIO(sink.getvalue()))}


def validate_all(settings, manifest) -> None:  # type: ignore[no-untyped-def]
    """What the completion function does for each checkpoint's event (publishing merges only validated ones)."""
    from bqx.completion import validate
    from bqx.gcp import storage

    for entry in manifest.tables:
        blob = storage.bucket(settings, settings.staging_bucket).get_blob(entry.checkpoint)
        assert validate.arrival(settings, manifest, entry.checkpoint, int(blob.generation))
