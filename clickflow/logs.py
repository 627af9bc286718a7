"""Logging: readable lines by default, or JSON in Cloud Logging's format on request."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]


def describe(exc: BaseException) -> str:
    """An exception's text for a log line, an error or a dead letter's reason; its type's name if
    it has none, as a client's timeout (``TimeoutError()``) has none."""
    return str(exc) or type(exc).__name__


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per line with ``severity``, which Cloud Logging reads as the level."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(CloudLoggingFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
