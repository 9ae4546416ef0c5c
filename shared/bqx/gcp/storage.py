"""GCS operations with the semantics bqx relies on: create-if-absent, JSON markers, listings."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as gexc

from bqx.config import Settings
from bqx.errors import TransientError
from bqx.gcp.clients import TRANSIENT_ERRORS, storage_client

TRANSIENT = TRANSIENT_ERRORS


def bucket(settings: Settings, name: str):  # type: ignore[no-untyped-def]
    return storage_client(settings).bucket(name)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


def create_json(settings: Settings, bucket_name: str, name: str, obj: Any) -> int | None:
    """Create `name` only if absent. Returns its generation, or None if it already existed (412)."""
    blob = bucket(settings, bucket_name).blob(name)
    try:
        blob.upload_from_string(dumps(obj), content_type="application/json", if_generation_match=0)
    except gexc.PreconditionFailed:
        return None
    return int(blob.generation)


def replace_json(settings: Settings, bucket_name: str, name: str, obj: Any, generation: int) -> int | None:
    """Overwrite `name` only if it is still at `generation`. Returns the new generation or None on 412."""
    blob = bucket(settings, bucket_name).blob(name)
    try:
        blob.upload_from_string(dumps(obj), content_type="application/json", if_generation_match=generation)
    except gexc.PreconditionFailed:
        return None
    return int(blob.generation)


def delete_if_generation(settings: Settings, bucket_name: str, name: str, generation: int) -> bool:
    try:
        bucket(settings, bucket_name).blob(name).delete(if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        return False
    return True


def write_json(settings: Settings, bucket_name: str, name: str, obj: Any) -> None:
    bucket(settings, bucket_name).blob(name).upload_from_string(dumps(obj), content_type="application/json")


def read_json(settings: Settings, bucket_name: str, name: str) -> tuple[Any, int] | None:
    """(content, generation) or None when absent."""
    blob = bucket(settings, bucket_name).get_blob(name)
    if blob is None:
        return None
    try:
        raw = blob.download_as_bytes(if_generation_match=blob.generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        raise TransientError(f"{name} changed while being read") from None
    return json.loads(raw), int(blob.generation)


def list_names(settings: Settings, bucket_name: str, prefix: str) -> dict[str, int]:
    """name -> size of every object under prefix (listing is strongly consistent)."""
    return {name: size for name, (size, _) in list_versions(settings, bucket_name, prefix).items()}


def list_versions(settings: Settings, bucket_name: str, prefix: str) -> dict[str, tuple[int, int]]:
    """name -> (size, generation) of every object under prefix."""
    return {b.name: (int(b.size or 0), int(b.generation))
            for b in storage_client(settings).list_blobs(bucket_name, prefix=prefix)}


def list_objects(settings: Settings, bucket_name: str, prefix: str) -> dict[str, tuple[int, float]]:
    """name -> (size, creation time as epoch seconds) of every object under prefix."""
    out = {}
    for b in storage_client(settings).list_blobs(bucket_name, prefix=prefix):
        created = b.time_created.timestamp() if b.time_created else 0.0
        out[b.name] = (int(b.size or 0), created)
    return out


def server_age(settings: Settings, bucket_name: str, name: str) -> tuple[dict[str, Any], int, float] | None:
    """(content, generation, seconds since that generation was written) of a small JSON object, or None when absent.
    The age is the server's: its `Date` header less the generation's `timeCreated`, both GCS's clock, so no local
    clock (which may be skewed) takes part. `Date` has whole seconds, so the age is low by under a second: a lease
    judged on it is never cut short."""
    from email.utils import parsedate_to_datetime
    from urllib.parse import quote

    client = storage_client(settings)
    url = client._connection.build_api_url(path=f"/b/{bucket_name}/o/{quote(name, safe='')}")
    response = client._http.request("GET", url, timeout=60)
    if response.status_code == 404:
        return None
    if response.status_code >= 500 or response.status_code == 429:
        raise TransientError(f"reading {name}: HTTP {response.status_code}")
    response.raise_for_status()
    meta = response.json()
    created = datetime.fromisoformat(meta["timeCreated"].replace("Z", "+00:00"))
    now = parsedate_to_datetime(response.headers["Date"])
    if now.tzinfo is None:  # "-0000": UTC, as HTTP dates always are
        now = now.replace(tzinfo=UTC)
    found = read_json(settings, bucket_name, name)
    if found is None or found[1] != int(meta["generation"]):
        raise TransientError(f"{name} changed while being read")
    return found[0], found[1], max(0.0, (now - created).total_seconds())


def exists(settings: Settings, bucket_name: str, name: str) -> bool:
    return bucket(settings, bucket_name).blob(name).exists()


def blob(settings: Settings, bucket_name: str, name: str, generation: int | None = None):  # type: ignore[no-untyped-def]
    """A handle on the object (that generation, if given); no request is made."""
    return bucket(settings, bucket_name).blob(name, generation=generation)


def known_blob(settings: Settings, bucket_name: str, name: str, generation: int, size: int, crc32c: str,
               metadata: dict[str, str]):  # type: ignore[no-untyped-def]
    """A handle on one generation whose resource is already known (an event's): filled as the client fills a blob
    from a listing, so nothing needs reading and a later patch sends only what is changed afterwards."""
    found = blob(settings, bucket_name, name, generation)
    found._set_properties({"name": name, "bucket": bucket_name, "generation": str(generation), "size": str(size),
                           "crc32c": crc32c, "metadata": metadata})
    return found


def get_blob(settings: Settings, bucket_name: str, name: str, generation: int | None = None):  # type: ignore[no-untyped-def]
    """The object's resource (that generation, if given; else the live one), or None when absent. One request."""
    return bucket(settings, bucket_name).get_blob(name, generation=generation)


def list_blobs(settings: Settings, bucket_name: str, prefix: str):  # type: ignore[no-untyped-def]
    """Every object under prefix, with its resource (size, generation, crc32c, metadata): one listing."""
    return storage_client(settings).list_blobs(bucket_name, prefix=prefix)


def read_bytes(settings: Settings, bucket_name: str, name: str) -> bytes | None:
    """The object's content in one request, or None when absent."""
    try:
        return bucket(settings, bucket_name).blob(name).download_as_bytes()
    except gexc.NotFound:
        return None


def copy_generation(settings: Settings, bucket_name: str, name: str, generation: int, dst: str) -> bool:
    """Copy that generation of `name` to `dst` in the same bucket. False when that generation is gone."""
    b = bucket(settings, bucket_name)
    try:
        b.copy_blob(b.blob(name, generation=generation), b, dst, source_generation=generation)
    except gexc.NotFound:
        return False
    return True


def patch_metadata(found: Any, metadata: dict[str, str], generation: int) -> bool:
    """Set custom metadata on `found` (a blob from get_blob, list_blobs or known_blob) if it is still at
    `generation`. False when it was replaced or deleted meanwhile."""
    found.metadata = metadata
    try:
        found.patch(if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        return False
    return True


class ObjectSink:
    """A write-only file that becomes one object: in a single request while it is at most `small` bytes (one
    request instead of a resumable session's two or more; a create-once precondition is honoured), as a resumable
    upload in `chunk`-byte pieces once it grows past that. Leaving its `with` on an exception uploads nothing: a
    resumable session, if one was opened, is cancelled, so no partial object ever appears."""

    def __init__(self, blob: Any, small: int, chunk: int, content_type: str,
                 if_generation_match: int | None = None) -> None:
        self.blob, self.small, self.chunk, self.content_type = blob, small, chunk, content_type
        self.if_generation_match = if_generation_match
        self.buffer = bytearray()
        self.writer: Any = None
        self.position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.position += len(view)
        if self.writer is not None:
            self.writer.write(view)
        else:
            self.buffer += view
            if len(self.buffer) > self.small:
                self.writer = self.blob.open("wb", chunk_size=self.chunk, ignore_flush=True,
                                             content_type=self.content_type,
                                             if_generation_match=self.if_generation_match)
                self.writer.write(self.buffer)
                self.buffer = bytearray()
        return len(view)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.close()
        else:
            self.blob.upload_from_string(bytes(self.buffer), content_type=self.content_type,
                                         if_generation_match=self.if_generation_match)

    def __enter__(self) -> ObjectSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self.closed = True
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)  # the client cancels the resumable session
