"""What every local HTTP stand-in (the IAM gate, the Run API, test fakes) shares: keep-alive, no Nagle, quiet."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any


class KeepAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, replies sent at once, no access log (each server keeps its own record)."""

    protocol_version = "HTTP/1.1"
    # A keep-alive reply goes out as two writes (headers, body): with Nagle on, the second waits for the client's
    # delayed ACK, 40 ms a request (668 footer reads through the IAM gate took 29 s on one thread, 1.2 s without).
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args: Any) -> None:
        pass
