"""Arrow's allocator, tuned to the merge's memory budget.

Arrow allocates through mimalloc, which by default hands freed pages back to the OS ~10 ms after they are freed. The
merge allocates and frees column buffers all the time, so every reuse of a page was a fresh page fault: about 40% more
CPU (system time) than the same work with pages kept. So:

- a budget of at least RETAIN_FROM keeps freed pages for PURGE_DELAY_MS, and a MemoryGovernor gives them back as soon
  as the process grows past its share of the budget: fast, and still bounded by the budget;
- a smaller budget returns pages at once (purge delay 0): there is no room to keep any.

mimalloc reads these settings once, when pyarrow loads, so `configure` must run before anything imports pyarrow
(the `bqx merge` command and the merge job call it first). Variables already set in the environment win.
"""

from __future__ import annotations

import os
import sys

RETAIN_FROM = 512 << 20
PURGE_DELAY_MS = 1000
GOVERNOR_SHARE = 0.75  # the governor releases free pages past this share of the budget


def settings_for(budget: int) -> dict[str, str]:
    return {
        "MIMALLOC_PURGE_DELAY": str(PURGE_DELAY_MS if budget >= RETAIN_FROM else 0),
        "MIMALLOC_ARENA_EAGER_COMMIT": "0",  # commit arena memory as it is touched, not 1 GiB up front
    }


def configure(budget: int) -> bool:
    """Set mimalloc's options for `budget` unless pyarrow is already loaded. Returns whether they can take effect."""
    for k, v in settings_for(budget).items():
        os.environ.setdefault(k, v)
    return "pyarrow" not in sys.modules


class MemoryGovernor:
    """Keeps the process's resident memory within `limit` bytes of what it was when created: past it, mimalloc gives
    its free pages back to the OS (a forced collect of the calling thread's heap and of the shared arenas). Below
    it, freed pages stay for reuse. Reading the RSS costs a few microseconds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.rss()
        self.releases = 0

    def rss(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:  # not Linux: nothing to govern by
            return 0

    def check(self) -> None:
        if self.rss() - self.baseline > self.limit:
            import pyarrow as pa

            pa.default_memory_pool().release_unused()
            self.releases += 1
