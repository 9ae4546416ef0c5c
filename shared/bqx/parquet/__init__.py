"""Parquet at the byte level: one Thrift compact-protocol codec, footers, column chunks, the file conventions
checkpoints and training files share.

Public: `conventions` (the writer options, types and row groups both files use), `chunks` (column chunks copied and
their metadata rewritten), `thrift` (the compact-protocol codec).
"""

__all__ = ["chunks", "conventions", "thrift"]
