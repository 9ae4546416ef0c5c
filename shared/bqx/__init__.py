"""bqx: a currency pair's feature warehouse in, one training Parquet file out (docs/ARCHITECTURE.md).

The stages, one package each: `bqx.extract`, `bqx.completion`, `bqx.merge`, with `bqx.trigger` before them; their
toolkits `bqx.parquet` (Parquet at the byte level) and `bqx.gcp` (Google Cloud); `bqx.local`, the local stack
(the CLI, tests and scripts only). Each package's `__init__` says which of its modules are public.

Public modules beside them: `config` (Settings, every setting), `layout` (every object name), `catalog` (tables,
the run manifest), `runs` (a run's state and bookkeeping from the buckets), `events`, `errors`, `ids`, `logs`,
`pairs`, `pricing`, `report`, `job` and `serving` (how a job task and a function event run), `sweeper` (runs
whose job died without a word), `schedule` (the extract queue), `notify` (run events), `versions` (schemas,
drift, kept runs), `api` (the Python API), `cli` (`bqx`).

Importing bqx imports nothing else: each module loads what it needs (pyarrow only where a caller needs it). The
Python API (bqx.api) is re-exported lazily: `bqx.run`, `bqx.submit`, `bqx.status`, `bqx.history`, `bqx.read`,
`bqx.diff`, `bqx.restore`, `bqx.download` load it on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "submit", "status", "history", "read", "diff", "restore", "download"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bqx import api

        return getattr(api, name)
    raise AttributeError(f"module 'bqx' has no attribute {name!r}")
