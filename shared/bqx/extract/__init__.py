"""The extract stage: the warehouse's tables (sources), the run manifest, and one checkpoint per table.

Public: `job` (the extract job's body, for jobs/extract/main.py), `run` (build_manifest, run, the task's report),
`sources` (open_source: BigQuery or the DuckDB warehouse). Nothing is imported here: the modules load pyarrow.
"""

__all__ = ["job", "run", "sources"]
