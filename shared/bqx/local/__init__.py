"""The local stack standing in for Google Cloud (imported by the CLI, tests, scripts and benchmarks only; the job
image leaves this folder out).

Public: `stack` (Stack: start, stop, status; client_env), `warehouse` (the synthetic DuckDB warehouse), `runapi`
(the local Cloud Run Admin API). Private, run by the stack: `eventarc` (the event relay), `gate` and `iam` (the IAM
gate and the policy it reads), `terraform` (reading deploy/*.tf), `artifacts` (packaging as deploy does).
"""

__all__ = ["runapi", "stack", "warehouse"]
