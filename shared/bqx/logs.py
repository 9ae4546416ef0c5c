"""Structured logs: one JSON object per line (what Cloud Logging parses from stdout), human text on a tty."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bqx.config import Settings

_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}
_FIELDS = ("pair", "run_id", "table", "event_id", "stage", "seconds", "component")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (what a Cloud Run job's memory limit is measured against)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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


def setup(component: str, settings: Settings | None = None, stream: Any = None) -> None:
    """Install the formatter on the root logger once per component and settings: JSON unless writing to a terminal
    (settings.log_format 'json' forces it), at settings.log_level. Without settings (not read yet, or unreadable):
    the same by the stream alone, at INFO."""
    stream = stream or sys.stdout
    log_format, level = (settings.log_format, settings.log_level) if settings is not None else ("", "INFO")
    root = logging.getLogger()
    key = (component, log_format, level)
    if getattr(root, "_bqx_setup", None) == key:
        return
    handler = logging.StreamHandler(stream)
    as_text = stream.isatty() and log_format != "json"
    handler.setFormatter(TextFormatter() if as_text else JsonFormatter())
    root.handlers = [handler]
    root.setLevel(level.upper())
    root._bqx_setup = key  # type: ignore[attr-defined]
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
