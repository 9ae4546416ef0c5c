"""Cloud Function `trigger`: a request object or Pub/Sub message starts the pair's extract job once."""

import functions_framework

from bqx import serving
from bqx.trigger import handle


@functions_framework.cloud_event
def trigger(cloud_event):  # type: ignore[no-untyped-def]
    serving.serve("trigger", handle, cloud_event)
