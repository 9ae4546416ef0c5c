"""CloudEvents in, small dataclasses out.

Storage events arrive two ways: Eventarc's `google.cloud.storage.object.v1.finalized` (object resource as data),
or a GCS notification wrapped in a Pub/Sub message (`...pubsub.topic.v1.messagePublished`, attributes
bucketId/objectId/objectGeneration/eventType). Other Pub/Sub messages are requests.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from bqx.errors import BadEvent

FINALIZED = "google.cloud.storage.object.v1.finalized"
PUBSUB = "google.cloud.pubsub.topic.v1.messagePublished"


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    name: str
    generation: str
    kind: str  # "finalize", "delete", ...
    event_id: str
    # The object resource as the event carries it (Eventarc's data, a GCS notification's JSON payload): what an
    # event for this generation says without another request. None where the event does not say.
    size: int | None = None
    crc32c: str | None = None
    metadata: dict[str, str] | None = None

    @property
    def key(self) -> str:
        """Events about the same object version share this key, however often they are delivered."""
        return f"{self.bucket}/{self.name}#{self.generation}"


@dataclass(frozen=True)
class Message:
    data: bytes
    attributes: dict[str, str]
    message_id: str
    event_id: str


def _get(event: Any, key: str) -> Any:
    try:
        return event[key]
    except (KeyError, TypeError):
        return None


def parse(event: Any) -> ObjectEvent | Message:
    """Raise BadEvent (terminal) when the event lacks what we need."""
    ce_type = _get(event, "type")
    event_id = str(_get(event, "id") or "")
    data = getattr(event, "data", None)
    if ce_type == FINALIZED:
        if not isinstance(data, dict):
            raise BadEvent("storage event without an object resource")
        return _object(data.get("bucket"), data.get("name"), data.get("generation"), "finalize", event_id, data)
    if ce_type == PUBSUB:
        if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
            raise BadEvent("Pub/Sub event without a message")
        msg = data["message"]
        attrs = msg.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise BadEvent("Pub/Sub message attributes are not a map")
        raw = msg.get("data") or ""
        try:
            body = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            raise BadEvent("Pub/Sub message data is not valid base64") from None
        if "eventType" in attrs:
            kind = {"OBJECT_FINALIZE": "finalize", "OBJECT_DELETE": "delete"}.get(attrs["eventType"], "other")
            return _object(attrs.get("bucketId"), attrs.get("objectId"), attrs.get("objectGeneration"), kind,
                           event_id, _resource(body) if attrs.get("payloadFormat") == "JSON_API_V1" else None)
        message_id = str(msg.get("messageId") or msg.get("message_id") or event_id)
        return Message(body, {str(k): str(v) for k, v in attrs.items()}, message_id, event_id)
    raise BadEvent(f"unsupported event type {ce_type!r}")


def _object(bucket: Any, name: Any, generation: Any, kind: str, event_id: str,
            resource: dict[str, Any] | None = None) -> ObjectEvent:
    if not isinstance(bucket, str) or not bucket or not isinstance(name, str) or not name:
        raise BadEvent("storage event without bucket and object name")
    if generation is None or not str(generation).isdigit():
        raise BadEvent(f"storage event for {name!r} without a valid generation")
    size, crc32c, metadata = None, None, None
    if resource and resource.get("name") == name and str(resource.get("generation")) == str(generation):
        raw_size, raw_crc, raw_md = resource.get("size"), resource.get("crc32c"), resource.get("metadata")
        size = int(raw_size) if isinstance(raw_size, str | int) and str(raw_size).isdigit() else None
        crc32c = raw_crc if isinstance(raw_crc, str) and raw_crc else None
        if isinstance(raw_md, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in raw_md.items()):
            metadata = dict(raw_md)
        elif raw_md is None:
            metadata = {}
    return ObjectEvent(bucket, name, str(generation), kind, event_id, size, crc32c, metadata)


def _resource(body: bytes) -> dict[str, Any] | None:
    """A notification's JSON_API_V1 payload: the object resource; None if it is not one."""
    import json

    try:
        found = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return found if isinstance(found, dict) else None
