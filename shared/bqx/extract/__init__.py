"""The extract stage: the warehouse's tables (sources), the run manifest, and one checkpoint per table."""
