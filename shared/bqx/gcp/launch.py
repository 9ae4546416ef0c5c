"""The one place that starts Cloud Run jobs (Admin API `run_job` with overrides)."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from bqx.config import Settings
from bqx.errors import LaunchFailed, LaunchRefused
from bqx.gcp.clients import TRANSIENT_ERRORS, is_transient, jobs_client


def job_path(settings: Settings, job: str) -> str:
    return f"projects/{settings.project}/locations/{settings.region}/jobs/{job}"


def run_job(
    settings: Settings, job: str, args: list[str], env: dict[str, str], task_count: int | None = None
) -> str:
    """Start `job` and return the execution's full resource name."""
    from google.cloud import run_v2

    overrides = run_v2.RunJobRequest.Overrides(
        container_overrides=[
            run_v2.RunJobRequest.Overrides.ContainerOverride(
                args=args, env=[run_v2.EnvVar(name=k, value=v) for k, v in sorted(env.items())]
            )
        ],
        task_count=task_count,
    )
    request = run_v2.RunJobRequest(name=job_path(settings, job), overrides=overrides)
    try:
        operation = jobs_client(settings).run_job(request=request, timeout=30)
        # The operation's metadata is the Execution; waiting for the result would wait for the whole job.
        metadata = operation.metadata
        name = getattr(metadata, "name", "") if metadata is not None else ""
        if not name:
            name = operation.operation.name
        return str(name)
    except (*TRANSIENT_ERRORS, gexc.GoogleAPICallError) as exc:
        if is_transient(exc):
            raise LaunchFailed(f"could not start {job}: {exc}") from exc
        raise LaunchRefused(f"Cloud Run refused to start {job}: {exc}") from exc
