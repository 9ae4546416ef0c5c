"""Cloud Run job entrypoint (the container runs this file; the local stack runs it as a process)."""

import sys
from pathlib import Path

# The image runs `python -I` (PYTHON* variables, e.g. in an execution's env overrides, cannot load code), so the
# library's folder goes on the path here instead of through PYTHONPATH: /app/shared in the image, shared/ here.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from bqx.config import Settings  # noqa: E402
from bqx.errors import ConfigError  # noqa: E402
from bqx.merge import allocator  # noqa: E402

# Before anything imports pyarrow: Arrow's allocator keeps or returns freed pages by the memory budget. The settings
# are read once, here, and handed to main(); a bad one is reported by main(), which reads them again, and exits 2.
try:
    settings = Settings.from_env()
except ConfigError:
    settings = None
allocator.configure((settings or Settings()).memory_budget)

from bqx.merge.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(settings=settings))
