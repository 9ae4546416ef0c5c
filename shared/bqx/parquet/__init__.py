"""Parquet at the byte level: one Thrift compact-protocol codec, footers, column chunks, the file conventions
checkpoints and training files share."""
