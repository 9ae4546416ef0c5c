"""Google clients, created lazily, once per process. Local mode passes anonymous credentials and the
project explicitly so nothing ever asks the metadata server for credentials."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from google.api_core import exceptions as gexc

from bqx.config import Settings
from bqx.errors import ConfigError

# Provider errors worth another try (redelivery, task retry), in one list; everything else is terminal or a bug.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.GatewayTimeout,
    gexc.BadGateway,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    ConnectionError,
    TimeoutError,
)
# BigQuery job error reasons worth another try (https://cloud.google.com/bigquery/docs/error-messages): a failed
# job's HTTP status says less than its reason (a rate limit comes back as 403).
TRANSIENT_REASONS = frozenset({"backendError", "internalError", "rateLimitExceeded", "jobRateLimitExceeded",
                               "jobBackendError", "jobInternalError", "quotaExceeded", "tableUnavailable"})


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: one of TRANSIENT_ERRORS, any 5xx, or a BigQuery transient reason.
    The one classifier of provider errors: everything else is terminal (or a bug)."""
    if isinstance(exc, (*TRANSIENT_ERRORS, gexc.ServerError)):
        return True
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code >= 500:  # an API error of a status google-api-core has no class for
        return True
    reasons = {e.get("reason") for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)}
    return bool(reasons & TRANSIENT_REASONS)

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud import bigquery, bigquery_storage_v1, run_v2, storage


def _credentials(settings: Settings):  # type: ignore[no-untyped-def]
    if settings.local:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    return None


@functools.cache
def storage_client(settings: Settings) -> storage.Client:
    """One client per process, shared by every thread: its connection pool is sized to the most threads bqx runs
    at once (the merge's background plan, the extract's tables, a function's request threads), so connections
    are reused instead of being discarded with "Connection pool is full" warnings."""
    import requests.adapters
    from google.cloud import storage

    client = storage.Client(project=settings.project, credentials=_credentials(settings))
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=HTTP_POOL_SIZE)
    for scheme in ("http://", "https://"):
        client._http.mount(scheme, adapter)
    return client


HTTP_POOL_SIZE = 32


@functools.cache
def jobs_client(settings: Settings) -> run_v2.JobsClient:
    from google.cloud import run_v2

    options = {"api_endpoint": settings.run_api_endpoint} if settings.run_api_endpoint else None
    transport = "rest" if settings.run_api_endpoint else None
    return run_v2.JobsClient(client_options=options, transport=transport, credentials=_credentials(settings))


@functools.cache
def executions_client(settings: Settings) -> run_v2.ExecutionsClient:
    """Cloud Run executions (get_execution: the sweeper asks how a run's job ended)."""
    from google.cloud import run_v2

    options = {"api_endpoint": settings.run_api_endpoint} if settings.run_api_endpoint else None
    transport = "rest" if settings.run_api_endpoint else None
    return run_v2.ExecutionsClient(client_options=options, transport=transport, credentials=_credentials(settings))


@functools.cache
def publisher_client(settings: Settings):  # type: ignore[no-untyped-def]
    """Pub/Sub publisher (the emulator through PUBSUB_EMULATOR_HOST in local mode)."""
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient(credentials=_credentials(settings))


def publish(settings: Settings, topic: str, data: bytes, timeout: float = 60.0, **attributes: str) -> str:
    """Publish one message to `topic` (a name in settings.project); returns its message id."""
    client = publisher_client(settings)
    future = client.publish(client.topic_path(settings.project, topic), data, **attributes)
    return str(future.result(timeout=timeout))


@functools.cache
def bigquery_client(settings: Settings) -> bigquery.Client:
    from google.cloud import bigquery

    options = {"api_endpoint": settings.bigquery_api_endpoint} if settings.bigquery_api_endpoint else None
    return bigquery.Client(project=settings.project, credentials=_credentials(settings), client_options=options,
                           location=settings.bigquery_location or None)


@functools.cache
def bigquery_read_client(settings: Settings, credentials: Credentials | None = None
                         ) -> bigquery_storage_v1.BigQueryReadClient:
    """The BigQuery Storage Read API client (gRPC), with the BigQuery client's credentials when given. A local
    endpoint override (settings.local) is a plain-gRPC stand-in, reached over an insecure loopback channel."""
    try:
        from google.cloud import bigquery_storage_v1
    except ImportError:
        raise ConfigError("the BigQuery source needs google-cloud-bigquery-storage (the Storage Read API), which "
                          "is not installed; see requirements/jobs.txt") from None

    endpoint = settings.bigquery_storage_endpoint
    if endpoint and settings.local:
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

        transport = BigQueryReadGrpcTransport(host=endpoint, channel=grpc.insecure_channel(endpoint))
        return bigquery_storage_v1.BigQueryReadClient(transport=transport)
    options = {"api_endpoint": endpoint} if endpoint else None
    return bigquery_storage_v1.BigQueryReadClient(credentials=credentials or _credentials(settings),
                                                  client_options=options)
