"""Structured logs: one JSON object per line (what Cloud Logging parses from stdout), human text on a tty."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}
_FIELDS = ("pair", "run_id", "table", "event_id", "stage", "seconds", "component")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _LEVELS.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        extra = getattr(record, "fields", None) or {}
        entry.update({k: v for k, v in extra.items() if v is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, "fields", None) or {}
        ctx = " ".join(f"{k}={extra[k]}" for k in _FIELDS if extra.get(k) is not None)
        line = f"{record.levelname.lower():7s} {record.getMessage()}" + (f"  [{ctx}]" if ctx else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(component: str, stream: Any = None) -> None:
    """Install the formatter on the root logger once; JSON unless writing to a terminal."""
    stream = stream or sys.stdout
    root = logging.getLogger()
    if getattr(root, "_bqx_component", None) == component:
        return
    handler = logging.StreamHandler(stream)
    as_text = stream.isatty() and os.environ.get("BQX_LOG_FORMAT") != "json"
    handler.setFormatter(TextFormatter() if as_text else JsonFormatter())
    root.handlers = [handler]
    root.setLevel(os.environ.get("BQX_LOG_LEVEL", "INFO").upper())
    root._bqx_component = component  # type: ignore[attr-defined]
    for noisy in ("urllib3", "google", "werkzeug", "gunicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Log:
    """A logger bound to context fields (pair, run id, ...)."""

    def __init__(self, name: str, **fields: Any) -> None:
        self._logger = logging.getLogger(name)
        self.fields = fields

    def bind(self, **fields: Any) -> Log:
        return Log(self._logger.name, **{**self.fields, **fields})

    def _log(self, level: int, message: str, exc_info: bool = False, **fields: Any) -> None:
        self._logger.log(level, message, exc_info=exc_info, extra={"fields": {**self.fields, **fields}})

    def debug(self, message: str, **fields: Any) -> None:
        self._log(logging.DEBUG, message, **fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log(logging.INFO, message, **fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._log(logging.WARNING, message, **fields)

    def error(self, message: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, message, exc_info=exc_info, **fields)
