"""Cloud Function `completion`: when a run's manifest is fully checkpointed, start its merge job once."""

import functions_framework

from bqx import serving
from bqx.completion.handler import handle


@functions_framework.cloud_event
def completion(cloud_event):  # type: ignore[no-untyped-def]
    serving.serve("completion", handle, cloud_event)
