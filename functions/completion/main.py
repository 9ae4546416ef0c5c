"""Cloud Function `completion`: when a run's manifest is fully checkpointed, start its merge job once."""

import functions_framework

from bqx import handlers


@functions_framework.cloud_event
def completion(cloud_event):  # type: ignore[no-untyped-def]
    handlers.serve("completion", handlers.completion, cloud_event)
