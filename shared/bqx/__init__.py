"""bqx: a currency pair's feature warehouse in, one training Parquet file out (docs/ARCHITECTURE.md).

The stages, one package each: `bqx.extract`, `bqx.completion`, `bqx.merge`, with `bqx.trigger` before them; their
toolkits `bqx.parquet` (Parquet at the byte level) and `bqx.gcp` (Google Cloud); `bqx.local`, the local stack
(the CLI, tests and scripts only). Each package's `__init__` says which of its modules are public.

Public modules beside them: `config` (Settings, every setting), `layout` (every object name), `catalog` (tables,
the run manifest), `runs` (a run's state and bookkeeping from the buckets), `events`, `errors`, `ids`, `logs`,
`pairs`, `pricing`, `report`, `job` and `serving` (how a job task and a function event run), `sweeper` (runs
whose job died without a word), `cli` (`bqx`).

Importing bqx imports nothing else: each module loads what it needs (pyarrow only where a caller needs it).
"""
