"""Google clients, created lazily, once per process. Local mode passes anonymous credentials and the
project explicitly so nothing ever asks the metadata server for credentials."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from bqx.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery, run_v2, storage


def _credentials(settings: Settings):  # type: ignore[no-untyped-def]
    if settings.local:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    return None


@functools.cache
def storage_client(settings: Settings) -> storage.Client:
    from google.cloud import storage

    return storage.Client(project=settings.project, credentials=_credentials(settings))


@functools.cache
def jobs_client(settings: Settings) -> run_v2.JobsClient:
    from google.cloud import run_v2

    options = {"api_endpoint": settings.run_api_endpoint} if settings.run_api_endpoint else None
    transport = "rest" if settings.run_api_endpoint else None
    return run_v2.JobsClient(client_options=options, transport=transport, credentials=_credentials(settings))


@functools.cache
def executions_client(settings: Settings) -> run_v2.ExecutionsClient:
    from google.cloud import run_v2

    options = {"api_endpoint": settings.run_api_endpoint} if settings.run_api_endpoint else None
    transport = "rest" if settings.run_api_endpoint else None
    return run_v2.ExecutionsClient(client_options=options, transport=transport, credentials=_credentials(settings))


@functools.cache
def bigquery_client(settings: Settings) -> bigquery.Client:
    from google.cloud import bigquery

    return bigquery.Client(project=settings.project, credentials=_credentials(settings))
