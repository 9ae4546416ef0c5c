"""Cloud Run job entrypoint (the container runs this file; the local stack runs it as a process)."""

import os
import sys

# Before anything imports pyarrow: Arrow's allocator then returns freed pages at once (peak RSS follows the budget).
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")

from bqx.jobs.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
