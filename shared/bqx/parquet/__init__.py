"""Parquet at the byte level: one Thrift compact-protocol codec and walker, footers, column chunks, the key column,
the file conventions checkpoints and training files share.

Public: `conventions` (the writer options, types and row groups both files use), `chunks` (column chunks copied and
their metadata rewritten), `thrift` (the compact-protocol codec and walker), `footer` (a file's tail: where its
footer is), `keys` (the key column in microseconds, checked sorted and unique: every reader of checkpoints uses it),
`tails` (a checkpoint's footer kept as the extract writes it, and the footer index the compose merge reads instead).
"""

__all__ = ["chunks", "conventions", "footer", "keys", "tails", "thrift"]
