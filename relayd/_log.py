"""Logging: one line per event on stderr, human-readable or JSON, with structured fields.

Call sites pass structured data as ``extra={"fields": {...}}`` (or use :func:`audit`); the
formatter appends them as ``key=value`` (text) or as JSON members. The id of the connection or
request being served travels in a context variable, so every line logged while serving it
carries it without threading it through every call.

Tokens and secrets are never passed to a logger; a test greps the logs to keep it so.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

AUDIT_LOGGER = "relayd.audit"

conn_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("relayd_conn_id", default=None)

# Fields every line of this process carries (``worker``, in a worker of ``serve --workers``).
_process_fields: dict[str, Any] = {}

_audit_log = logging.getLogger(AUDIT_LOGGER)


def audit(event: str, **fields: Any) -> None:
    """Record a security-relevant event: who (client, actor), from where (source), what."""
    _audit_log.info(event, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def _stamp_connection() -> None:
    """Records take the connection id when they are made, not when (or where) they are
    formatted: a handler may format later, in another context."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "relayd_conn", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.relayd_conn = conn_id.get()
        return record

    factory.relayd_conn = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_stamp_connection()


def tag_process(**fields: Any) -> None:
    """Add ``fields`` to every line this process logs from now on (``worker=2``)."""
    _process_fields.update(fields)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(_process_fields)
    cid = getattr(record, "relayd_conn", None)
    if cid is not None:
        fields["conn"] = cid
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        fields.update(extra)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str, fmt: str) -> None:
    """Send relayd's logs (and hypercorn's errors) to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    quiet_libraries()


# Libraries whose debug lines would carry what relayd never logs: websockets (the dedicated
# listener's protocol) logs every frame and the handshake's request target (?token=...),
# message text included; trio-websocket (the tests' client) does the same. coredis (the Redis
# engine) logs a traceback at INFO for every connection Redis closes, which relayd reports
# itself, once, as "store unavailable".
QUIET_LOGGERS = ("websockets", "trio-websocket", "coredis")


def quiet_libraries() -> None:
    """Keep the libraries in ``QUIET_LOGGERS`` at WARNING, whatever relayd's own level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
