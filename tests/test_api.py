"""The Python API (bqx.api, re-exported lazily by `import bqx`) through the session's local stack, and the README's
notebook example, executed as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_bqx_is_cheap_and_lists_the_api():
    heavy = "('bqx.', 'pyarrow', 'google.cloud.', 'google.api_core')"
    code = (f"import sys, bqx; loaded = sorted(m for m in sys.modules if m.startswith({heavy})); "
            "assert not loaded, loaded; assert callable(bqx.run) and 'bqx.api' in sys.modules; print(bqx.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "read" in out and "history" in out


def test_run_read_status_history_against_the_local_stack(stack_env):
    import pyarrow as pa

    import bqx

    summary = bqx.run("eurusd", force=True)
    assert summary["pair"] == "eurusd" and summary["rows"] > 0
    table = bqx.read("eurusd", columns=["interval_time", "target_bqx45_h15"])
    assert isinstance(table, pa.Table) and table.num_rows == summary["rows"] and table.num_columns == 2
    assert bqx.read("eurusd").num_columns == summary["columns"]
    assert bqx.status("eurusd").state == "done"
    kept = bqx.history("eurusd")
    assert kept[0].run_id == summary["run_id"] and kept[0].current and kept[0].crc32c == summary["crc32c"]
    again = bqx.run("eurusd")  # nothing changed: the published summary, no new run
    assert again["run_id"] == summary["run_id"]


def test_readme_notebook_example_runs(stack_env):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running daily"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    assert len(code.strip().splitlines()) == 5
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["table"].num_rows == namespace["summary"]["rows"]  # type: ignore[attr-defined,index]
