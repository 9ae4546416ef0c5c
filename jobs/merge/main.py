"""Cloud Run job entrypoint (the container runs this file; the local stack runs it as a process)."""

import sys

from bqx import allocator
from bqx.config import Settings

# Before anything imports pyarrow: Arrow's allocator keeps or returns freed pages by the memory budget.
try:
    allocator.configure(Settings.from_env().memory_budget)
except Exception:  # noqa: BLE001 - a bad setting is reported by main() below, with its exit code
    allocator.configure(Settings().memory_budget)

from bqx.jobs.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
