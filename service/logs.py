"""Structured (JSON lines) logging for the server: one object per record with time, level,
logger, message and the call's request id, so log pipelines can index and join them.

Only what the code passes goes out: the message, the exception *type* (never its text or
traceback locals, which may quote request contents) and whitelisted ``extra`` fields
(:data:`FIELDS`: request id, method, status code, duration, batch size...). Nothing in
the service logs patient data; this formatter keeps it that way for fields it does not
know by dropping them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from service.interceptors.call import current_call

#: ``extra`` keys a record may carry into the JSON object.
FIELDS = ("request_id", "method", "code", "duration_ms", "batch_size", "index_version", "port")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if "request_id" not in out:
            call = current_call()
            if call is not None:
                out["request_id"] = call.request_id
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__
        return json.dumps(out, separators=(",", ":"), default=str)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(
    fmt: str = "text",
    level: str | int = "INFO",
    stream: TextIO | None = None,
    *,
    replace: bool = False,
) -> None:
    """Set up the root logger: ``fmt`` "json" (structured) or "text"; idempotent.
    ``replace`` also removes handlers others installed (the server process's own log)."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    )
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        if replace or getattr(h, "_cohortsim", False):
            root.removeHandler(h)
    handler._cohortsim = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())


__all__ = ["FIELDS", "JsonFormatter", "configure"]
