"""Cloud Run job entrypoint (the container runs this file; the local stack runs it as a process)."""

import sys

from bqx.jobs.extract import main

if __name__ == "__main__":
    sys.exit(main())
