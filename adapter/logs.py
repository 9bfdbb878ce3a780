"""Log lines in text or JSON, carrying who they are about: request id, container, network.

The context travels in ``contextvars``, so a field set where a piece of work begins (the proxy
names the request, the network hook names the container and the network) reaches every line
logged on its behalf, in the modules below it too, without being passed along. A line may also
name its fields itself: ``log.info(..., extra=fields(container=..., network=...))``; those win.

    text   2026-12-03 20:15:02,114 INFO    powerplane.network.endpoints: sandbox 3f2a… holds
           10.0.6.2 [request=4c1d-17 container=3f2a9b0c1d2e network=blue]
    json   {"time": "2026-12-03T20:15:02.114Z", "level": "info", "logger": "…",
            "message": "…", "request": "4c1d-17", "container": "3f2a9b0c1d2e", "network": "blue"}

Nothing happens at import time: ``configure`` installs the handler once, when a command starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TextIO

# The context fields, in the order lines show them. ``container`` is a 12-character short id,
# as `docker ps` prints it.
FIELDS = ("request", "container", "network", "hook")
SHORT_ID = 12

# Module level, as contextvars must be; the default is an empty read-only mapping.
_context: ContextVar[Mapping[str, str]] = ContextVar("powerplane_log_context",
                                                     default=MappingProxyType({}))


def fields(**values: str | None) -> dict[str, str]:
    """``extra=`` for one log line: its context fields (ids shortened, empty ones left out)."""
    return {key: _shorten(key, value) for key, value in values.items() if value}


@contextlib.contextmanager
def context(**values: str | None) -> Iterator[None]:
    """Every line logged inside the block (and in tasks it starts) carries these fields."""
    token = _context.set({**_context.get(), **fields(**values)})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**values: str | None) -> None:
    """Add fields to the current context until it ends: for a task that is one piece of work
    (a hooked request), where a ``with`` block would have to wrap the whole task."""
    _context.set({**_context.get(), **fields(**values)})


def current() -> Mapping[str, str]:
    """The fields of the current context (tests, and the formatters)."""
    return _context.get()


def _shorten(key: str, value: str) -> str:
    return value[:SHORT_ID] if key == "container" else value


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The context fields of ``record``: the context's, overridden by the line's own."""
    found = dict(getattr(record, "powerplane_context", None) or {})
    for key in FIELDS:
        value = record.__dict__.get(key)
        if value:
            found[key] = str(value)
    return {key: found[key] for key in FIELDS if key in found}


class _ContextFilter(logging.Filter):
    """Takes the context at the moment of the call: a handler may format the line later."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.powerplane_context = _context.get()
        return True


class TextFormatter(logging.Formatter):
    """The familiar line, its context fields appended in brackets."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        found = record_fields(record)
        if not found:
            return line
        tail = " ".join(f"{key}={value}" for key, value in found.items())
        # After the message's first line: a traceback stays below, readable.
        first, sep, rest = line.partition("\n")
        return f"{first} [{tail}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, context fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=False)


def configure(level: str = "info", log_format: str = "text",
              stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to ``stream`` (stderr) in ``log_format``; return the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
