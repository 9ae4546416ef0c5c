"""Cloud Function `trigger`: a request object or Pub/Sub message starts the pair's extract job once."""

import functions_framework

from bqx import handlers


@functions_framework.cloud_event
def trigger(cloud_event):  # type: ignore[no-untyped-def]
    handlers.serve("trigger", handlers.trigger, cloud_event)
