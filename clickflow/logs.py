"""Logging: readable lines by default, or JSON in Cloud Logging's format on request."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]


def describe(exc: BaseException) -> str:
    """An exception's text for a log line, an error or a dead letter's reason; its type's name if
    it has none, as a client's timeout (``TimeoutError()``) has none."""
    return str(exc) or type(exc).__name__


class Throttle:
    """Lines of one cause at most every ``every`` seconds, for what anyone who reaches a port can
    cause (a request without a token, one aiohttp cannot parse) or what comes with every write (a
    visit stored already): a line each let them fill the log, and Cloud Logging's bill. What is
    left out is counted, and the next line says so."""

    __slots__ = ("every", "left_out", "next_line")

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.next_line: dict[str, float] = {}
        self.left_out: dict[str, int] = {}

    def count(self, cause: str, n: int = 1) -> int | None:
        """``n`` more of ``cause``: None while its next line waits; else how many since the last
        line, these included, for the line to say."""
        now = time.monotonic()
        if now < self.next_line.get(cause, 0.0):
            self.left_out[cause] = self.left_out.get(cause, 0) + n
            return None
        self.next_line[cause] = now + self.every
        return self.left_out.pop(cause, 0) + n

    def allow(self, cause: str) -> str | None:
        """One more line of ``cause``: None if it is to be left out; else what to add to it
        (" (and 3 more since the last line)", or nothing)."""
        since_last = self.count(cause)
        if since_last is None:
            return None
        return f" (and {since_last - 1} more since the last line)" if since_last > 1 else ""

    def unsaid(self, cause: str) -> int:
        """What was left out since ``cause``'s last line, for a last line at the end."""
        return self.left_out.pop(cause, 0)


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
