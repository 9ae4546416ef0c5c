"""The BigQuery Storage Read API (gRPC service google.cloud.bigquery.storage.v1.BigQueryRead), served in-process on
127.0.0.1 over an insecure port, for google-cloud-bigquery-storage pointed at it.

- CreateReadSession: `projects/p/datasets/d/tables/t` is resolved through `tables` (a callable returning an Arrow
  table or None); the session carries the table's Arrow schema in BigQuery's Arrow types and
  min(max_stream_count, `streams`) streams, each a contiguous slice of the rows (none for an empty table).
- ReadRows: server streaming from the request's offset, `batch_rows` rows a response, each an Arrow IPC record batch
  (LZ4_FRAME/ZSTD buffer compression when the session asked for it) with its row_count; the first response of every
  call carries the schema, as BigQuery's does.
- A broken stream: with `break_after` > 0 the first ReadRows call of every stream aborts with UNAVAILABLE once it has
  sent that many rows (rounded up to whole responses) and rows remain; the client must resume at its offset.

`FakeBigQueryWithResultTables` makes the REST fake (fakes.bigquery_api) name an anonymous destination table in each
query job, as BigQuery does, so that google-cloud-bigquery reads query results through this server.

Every call is recorded (`calls`: (method, request)) so tests can assert what the client asked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyarrow as pa
from google.cloud.bigquery_storage_v1 import types

from fakes.bigquery_api import FakeBigQuery, _bq_type

SERVICE = "google.cloud.bigquery.storage.v1.BigQueryRead"
ANON_DATASET = "_anon"
_TABLE_PATH = re.compile(r"^projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)$")
_ARROW_TYPES = {"FLOAT": pa.float64(), "INTEGER": pa.int64(), "TIMESTAMP": pa.timestamp("us", tz="UTC"),
                "DATETIME": pa.timestamp("us"), "BOOLEAN": pa.bool_(), "STRING": pa.string(),
                "NUMERIC": pa.decimal128(38, 9)}
_CODECS = {types.ArrowSerializationOptions.CompressionCodec.LZ4_FRAME: "lz4",
           types.ArrowSerializationOptions.CompressionCodec.ZSTD: "zstd"}


def bigquery_arrow(table: pa.Table) -> pa.Table:
    """`table` in the Arrow types the Storage Read API gives each BigQuery type."""
    schema = pa.schema([pa.field(f.name, _ARROW_TYPES[_bq_type(f.type)]) for f in table.schema])
    return table.cast(schema)


class FakeBigQueryWithResultTables(FakeBigQuery):
    """The REST fake, whose query jobs name their result table `<project>._anon.anon_<job>` in
    configuration.query.destinationTable (the request bodies it records stay as sent)."""

    def insert_job(self, body: dict[str, Any]) -> dict[str, Any]:
        job = super().insert_job(body)
        job_id = job["jobReference"]["jobId"]
        with self.lock:
            if job_id in self.results:
                config = job["configuration"]
                dest = {"projectId": self.project, "datasetId": ANON_DATASET, "tableId": f"anon_{job_id}"}
                job = {**job, "configuration": {**config, "query": {**config["query"], "destinationTable": dest}}}
                self.jobs[job_id] = job
        return job

    def result_table(self, project: str, dataset: str, table: str) -> pa.Table | None:
        if project != self.project or dataset != ANON_DATASET or not table.startswith("anon_"):
            return None
        with self.lock:
            return self.results.get(table.removeprefix("anon_"))


@dataclass
class _Stream:
    rows: pa.Table
    compression: str | None
    calls: int = 0


@dataclass
class FakeBigQueryRead:
    tables: Callable[[str, str, str], pa.Table | None]
    streams: int = 1  # streams a session gets when the client asks for any number (max_stream_count 0)
    batch_rows: int = 50
    break_after: int = 0
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._sessions = 0

    def _record(self, method: str, request: Any) -> None:
        with self.lock:
            self.calls.append((method, request))

    def requests(self, method: str) -> list[Any]:
        with self.lock:
            return [r for m, r in self.calls if m == method]

    def create_read_session(self, request: types.CreateReadSessionRequest,
                            context: grpc.ServicerContext) -> types.ReadSession:
        self._record("CreateReadSession", request)
        asked = request.read_session
        m = _TABLE_PATH.match(asked.table)
        if not m:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a table path: {asked.table!r}")
        if asked.data_format != types.DataFormat.ARROW:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the fake serves ARROW only")
        table = self.tables(*m.groups())
        if table is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Not found: Table {asked.table}")
        table = bigquery_arrow(table)
        if asked.read_options.selected_fields:
            table = table.select(list(asked.read_options.selected_fields))
        n = min(self.streams, request.max_stream_count or self.streams)
        per = -(-table.num_rows // n)
        compression = _CODECS.get(asked.read_options.arrow_serialization_options.buffer_compression)
        with self.lock:
            self._sessions += 1
            name = f"projects/{m.group(1)}/locations/us/sessions/s{self._sessions}"
            streams = []
            for i, start in enumerate(range(0, table.num_rows, per)):
                streams.append(types.ReadStream(name=f"{name}/streams/{i}"))
                self._streams[streams[-1].name] = _Stream(table.slice(start, per), compression)
        return types.ReadSession(
            name=name, data_format=types.DataFormat.ARROW, table=asked.table, read_options=asked.read_options,
            arrow_schema=types.ArrowSchema(serialized_schema=table.schema.serialize().to_pybytes()),
            streams=streams, estimated_row_count=table.num_rows)

    def read_rows(self, request: types.ReadRowsRequest,
                  context: grpc.ServicerContext) -> Iterator[types.ReadRowsResponse]:
        self._record("ReadRows", request)
        with self.lock:
            stream = self._streams.get(request.read_stream)
            if stream is not None:
                stream.calls += 1
        if stream is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Not found: stream {request.read_stream}")
        rows = stream.rows
        if request.offset > rows.num_rows:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} > {rows.num_rows} rows")
        break_at = self.break_after if stream.calls == 1 else 0
        schema = types.ArrowSchema(serialized_schema=rows.schema.serialize().to_pybytes())
        sent = 0
        for start in range(request.offset, rows.num_rows, self.batch_rows):
            if break_at and sent >= break_at:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the fake broke the stream after {sent} rows")
            batch = rows.slice(start, self.batch_rows).combine_chunks()
            count = batch.num_rows
            response = types.ReadRowsResponse(
                arrow_record_batch=types.ArrowRecordBatch(serialized_record_batch=_ipc(batch, stream.compression),
                                                          row_count=count),
                row_count=count)
            if sent == 0:
                response.arrow_schema = schema
            sent += count
            yield response


def _ipc(table: pa.Table, compression: str | None) -> bytes:
    """One encapsulated IPC record batch message, as ReadRowsResponse.arrow_record_batch carries it."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table, max_chunksize=table.num_rows or None)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    reader.read_next_message()  # the schema
    return reader.read_next_message().serialize().to_pybytes()


class FakeBigQueryReadServer:
    """`with FakeBigQueryReadServer(fake) as server:` serves `fake` on a free loopback port (server.endpoint)."""

    def __init__(self, fake: FakeBigQueryRead) -> None:
        self.fake = fake
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-bqread"))
        handlers = {
            "CreateReadSession": grpc.unary_unary_rpc_method_handler(
                fake.create_read_session, request_deserializer=types.CreateReadSessionRequest.deserialize,
                response_serializer=types.ReadSession.serialize),
            "ReadRows": grpc.unary_stream_rpc_method_handler(
                fake.read_rows, request_deserializer=types.ReadRowsRequest.deserialize,
                response_serializer=types.ReadRowsResponse.serialize),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeBigQueryReadServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None).wait(5)
