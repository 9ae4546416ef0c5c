"""Cloud Run job entrypoint (the container runs this file; the local stack runs it as a process)."""

import sys
from pathlib import Path

# The image runs `python -I` (PYTHON* variables, e.g. in an execution's env overrides, cannot load code), so the
# library's folder goes on the path here instead of through PYTHONPATH: /app/shared in the image, shared/ here.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from bqx.extract.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
