"""Shared fixtures: one local stack per test session (real emulators on free loopback ports), env restored
after every test, and helpers to build CloudEvents the way Eventarc and Pub/Sub push deliver them."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from bqx import serving
from bqx.config import Settings
from bqx.local.runapi import RunApi, make_handler
from bqx.local.stack import Stack, client_env, use_free_ports
from bqx.local.warehouse import Shape, Warehouse

REPO = Path(__file__).resolve().parents[1]
SMALL = Shape(rows=300, seed=11, table_scale=0.03, column_scale=0.5)


@pytest.fixture(autouse=True)
def _restore_env() -> Iterator[None]:
    saved = dict(os.environ)
    serving.settings.cache_clear()
    yield
    os.environ.clear()
    os.environ.update(saved)
    serving.settings.cache_clear()


@dataclass
class LocalStack:
    settings: Settings
    stack: Stack
    env: dict[str, str]

    def apply_env(self) -> None:
        os.environ.update(self.env)
        serving.settings.cache_clear()


@contextlib.contextmanager
def started_stack(home: Path) -> Iterator[LocalStack]:
    """A whole embedded stack, as `bqx stack up` starts it, on free ports, with its state under `home`; the
    environment is restored when it stops."""
    saved = dict(os.environ)
    os.environ.update({"BQX_LOCAL": "1", "BQX_HOME": str(home), "BQX_CLAIM_LEASE_SECONDS": "5"})
    use_free_ports()
    settings = Settings.from_env()
    env = {**client_env(settings), "BQX_CLAIM_LEASE_SECONDS": "5"}
    os.environ.update(env)
    Warehouse(Path(settings.warehouse), settings.dataset).generate("eurusd", SMALL)
    stack = Stack(settings)
    try:
        stack.up(progress=lambda m: None)
        yield LocalStack(settings, stack, env)
    finally:
        stack.down()
        os.environ.clear()
        os.environ.update(saved)
        serving.settings.cache_clear()


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The session's stack, shared by the tests that use it."""
    with started_stack(tmp_path_factory.mktemp("bqx-home")) as stack:
        yield stack


@pytest.fixture
def stack_env(local_stack: LocalStack) -> LocalStack:
    local_stack.apply_env()
    return local_stack


def _own_bucket(variable: str, prefix: str) -> Settings:
    """Point `variable` at a new bucket of this test's own and create it; the settings that follow."""
    import uuid

    from bqx.gcp.clients import storage_client

    os.environ[variable] = name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    serving.settings.cache_clear()
    settings = Settings.from_env()
    storage_client(settings).create_bucket(name)
    return settings


@pytest.fixture
def isolated(stack_env: LocalStack) -> Settings:
    """Settings with a staging bucket of this test's own, which the session stack's functions do not watch."""
    return _own_bucket("BQX_STAGING_BUCKET", "t")


@pytest.fixture
def isolated_output(isolated: Settings) -> Settings:
    """`isolated`, plus an output bucket of the test's own (summaries of other tests' runs must not count)."""
    return _own_bucket("BQX_OUTPUT_BUCKET", "o")


@pytest.fixture
def run_api(tmp_path: Path) -> Iterator[RunApi]:
    """A separate local Cloud Run API whose jobs do nothing, for tests that count launches."""
    api = RunApi(tmp_path / "run-api", {"bqx-ml-extract": ["true"], "bqx-ml-merge": ["true"]}, dict(os.environ))
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    os.environ["BQX_RUN_API_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    serving.settings.cache_clear()
    from bqx.gcp import clients

    clients.jobs_client.cache_clear()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        clients.jobs_client.cache_clear()


def storage_event(bucket: str, name: str, generation: int | str, event_id: str = "e1") -> CloudEvent:
    """What Eventarc delivers for an object finalize."""
    return CloudEvent(
        {"type": "google.cloud.storage.object.v1.finalized",
         "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
         "id": event_id, "specversion": "1.0", "subject": f"objects/{name}"},
        {"bucket": bucket, "name": name, "generation": str(generation)},
    )


def pubsub_event(data: bytes | str, attributes: dict[str, str] | None = None, message_id: str = "m1") -> CloudEvent:
    """What a Pub/Sub push (or Eventarc Pub/Sub trigger) delivers."""
    raw = data.encode() if isinstance(data, str) else data
    return CloudEvent(
        {"type": "google.cloud.pubsub.topic.v1.messagePublished",
         "source": "//pubsub.googleapis.com/projects/p/topics/t", "id": message_id, "specversion": "1.0"},
        {"message": {"data": base64.b64encode(raw).decode(), "attributes": attributes or {}, "messageId": message_id},
         "subscription": "projects/p/subscriptions/s"},
    )


def gcs_notification(bucket: str, name: str, generation: int | str, message_id: str = "n1") -> CloudEvent:
    """A GCS notification (as fake-gcs-server and real GCS publish it) wrapped in a Pub/Sub push."""
    return pubsub_event(
        json.dumps({"bucket": bucket, "name": name, "generation": str(generation)}),
        {"bucketId": bucket, "objectId": name, "objectGeneration": str(generation), "eventType": "OBJECT_FINALIZE",
         "payloadFormat": "JSON_API_V1"},
        message_id,
    )
