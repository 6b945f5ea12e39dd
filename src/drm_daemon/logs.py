"""Structured logging for the daemons: one configuration, and a guard against leaking secrets.

Each program's ``__main__`` calls :func:`configure_logging` once. On a terminal, logs are
human-readable console lines; otherwise (systemd, a pipe, a file) they are one JSON object
per line, with tracebacks as structured dicts, which journald and log shippers take as is.

Two processors run before rendering, whatever the format:

* :func:`redact_secrets` replaces the value of any key that names a secret (tokens, keys,
  license secrets, model or tensor bytes) and any binary value longer than a digest, so a
  careless ``log.info("x", payload=chunk)`` can never put model bytes in a log (I7);
* :func:`escape_control_characters` escapes control characters in strings, so text from a
  peer (a model name, an error message) cannot forge extra log lines or terminal escapes.

The sans-IO core never logs; the trio layer and the daemons do, with event names that are
stable snake_case facts (``grant_pushed``, ``quota_exhausted``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

__all__ = [
    "LOG_LEVELS",
    "SECRET_KEYS",
    "configure_logging",
    "escape_control_characters",
    "redact_secrets",
    "set_log_level",
]

#: The levels a daemon's ``--log-level`` takes. ``debug`` adds per-request and per-report
#: events (ids, counts and timings only: the redaction below applies at every level).
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

#: Keys whose values are never logged, whatever they hold.
SECRET_KEYS: Final = frozenset(
    {
        "token",
        "admin_token",
        "authorization",
        "secret",
        "license_secret",
        "private_key",
        "key",
        "password",
        "model_bytes",
        "payload",
        "data",
        "tensor",
        "tensors",
        "chunk",
    }
)

#: Longest binary value logged as is (a SHA-512 digest); anything longer is bulk data.
MAX_LOGGED_BINARY: Final = 64

_CONTROL: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def redact_secrets(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: drop secret values and bulk binaries, keeping their size."""
    for key, value in event.items():
        if key in SECRET_KEYS and not isinstance(value, (bool, int, float)) and value is not None:
            event[key] = _describe(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            size = memoryview(value).nbytes
            event[key] = value.hex() if size <= MAX_LOGGED_BINARY else _describe(value)
    return event


def _describe(value: object) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<redacted: {memoryview(value).nbytes} bytes>"
    return "<redacted>"


def escape_control_characters(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: escape control characters in string values and the event."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            event[key] = value.translate(_CONTROL)
    return event


def configure_logging(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog for a daemon or command line; call once, from ``__main__``.

    Args:
        json: JSON lines when true, console lines when false; by default JSON unless
            ``stream`` is a terminal.
        level: the lowest level logged (``debug``, ``info``, ``warning``, ``error``).
        stream: where logs go; standard error by default.
    """
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        escape_control_characters,
    ]
    if json:
        processors.append(_TRACEBACKS)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=_filtering(level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )


#: Tracebacks as dicts, *without* frame locals. structlog's ``dict_tracebacks`` shows
#: them (the first 80 characters of each), and they are rendered after
#: :func:`redact_secrets` has run, so an exception logged in a frame holding a license,
#: a token or a key would print it. File, line and function are kept.
_TRACEBACKS: Final = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def set_log_level(level: str) -> None:
    """Change the lowest level logged, keeping the rest of :func:`configure_logging`'s
    setup; call it before anything has logged (loggers are cached on first use)."""
    structlog.configure(wrapper_class=_filtering(level))


def _filtering(level: str) -> Any:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()])
