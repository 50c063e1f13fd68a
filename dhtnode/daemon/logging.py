"""Logging through structlog: stable event names with key=value fields.

Logs go to stderr, so that command output on stdout stays clean (``--json`` pipes). JSON lines
when the format is "json", or "auto" and stderr is not a terminal (systemd, docker); a
readable console rendering otherwise. Library loggers (asyncio, aioquic) go through the same
renderer; aioquic only from WARNING up.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


@dataclass(frozen=True)
class _Pending:
    """A configuration asked for with ``lazy=True`` and not applied yet."""

    level: str
    numeric: int
    fmt: str
    stream: TextIO


#: Set by ``configure_logging(lazy=True)`` until the first event at or above its level.
_pending: _Pending | None = None


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, lazy: bool = False
) -> None:
    """Send the package's events (and the standard ``logging`` records, aioquic's from
    WARNING up) through structlog to ``stream`` (default stderr).

    ``lazy``: import and configure structlog only when the first event at or above ``level``
    arrives. A short-lived command that logs nothing at its level (``dhtnode ping`` at the
    default "warning") then never imports structlog: about 20 ms of its start-up (median of
    21 fresh interpreters, with asyncio and logging imported either way). Only for
    programs whose every log call goes through this module (structlog used directly before
    that first event would run unconfigured)."""
    global _pending
    stream = stream or sys.stderr
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    numeric = getattr(logging, level.upper())
    if lazy:
        _pending = _Pending(level, numeric, fmt, stream)
        root = logging.getLogger()
        root.handlers[:] = [_FirstRecordHandler()]
        root.setLevel(numeric)
        logging.getLogger("aioquic").setLevel(max(numeric, logging.WARNING))
        return
    _pending = None
    _configure(numeric, fmt, stream)


def _apply_pending() -> None:
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        _configure(pending.numeric, pending.fmt, pending.stream)


class _FirstRecordHandler(logging.Handler):
    """The root handler while a lazy configuration waits: the first record it gets applies
    it, then goes to the real handler."""

    def emit(self, record: logging.LogRecord) -> None:
        _apply_pending()
        for handler in logging.getLogger().handlers:
            if handler is not self and record.levelno >= handler.level:
                handler.handle(record)


def _configure(numeric: int, fmt: str, stream: TextIO) -> None:
    import structlog

    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aioquic").setLevel(max(numeric, logging.WARNING))


class _Logger:
    """What every module of the package logs through. Once the application configured
    structlog (``dhtnode`` commands call :func:`configure_logging`), events go there; in a
    program that merely imports ``dhtnode`` they go to the standard ``logging`` logger of the
    same name, so the library prints nothing on its own (Python's last-resort handler shows
    warnings and errors on stderr until the program configures ``logging``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def _log(self, level: int, event: str, kw: dict[str, Any], exc_info: bool = False) -> None:
        if _pending is not None:
            if level < _pending.numeric:
                return  # below the level asked for: structlog would drop it too
            _apply_pending()
        # A program that never imported structlog cannot have configured it.
        structlog = sys.modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            method = logging.getLevelName(level).lower()
            bound = structlog.get_logger(self._name)
            if exc_info:
                bound.exception(event, **kw)
            else:
                getattr(bound, method)(event, **kw)
            return
        std = logging.getLogger(self._name)
        if std.isEnabledFor(level):
            fields = " ".join(f"{k}={v!r}" for k, v in kw.items())
            std.log(level, "%s %s", event, fields, exc_info=exc_info)

    def debug(self, event: str, **kw: Any) -> None:
        self._log(logging.DEBUG, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log(logging.INFO, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log(logging.WARNING, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log(logging.ERROR, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._log(logging.ERROR, event, kw, exc_info=True)


def get_logger(name: str) -> Any:
    """The package's logger for ``name`` (see :class:`_Logger`)."""
    return _Logger(name)
