"""Logging: structlog events rendered for people (console) or machines (JSON lines).

Everything goes through one stdlib handler, so our events and those of websockets and
asyncio share a format and a destination. Logging starts on stderr, so start-up errors
reach the terminal; ``use_destination`` then moves it to the log file or syslog once the
process runs as the user that will have to reopen the file on SIGHUP.
"""

import logging
import logging.handlers
import os
import stat
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from wsechod.settings import Settings

log = structlog.stdlib.get_logger("wsechod")

SYSLOG = "syslog"
# Structured tracebacks without local variables: they could hold what a client sent.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


class LogError(Exception):
    """The log destination cannot be opened; the message is one line for the operator."""


def configure(settings: Settings, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr), in the format and at the level the settings ask for."""
    stream = stream or sys.stderr
    level = getattr(logging, settings.log_level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _install(logging.StreamHandler(stream), settings, stream.isatty())
    root = logging.getLogger()
    root.setLevel(level)
    # websockets logs every connection at INFO and every frame at DEBUG; our own
    # per-connection events say the same in our format, so only its problems get through.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))


def use_destination(settings: Settings) -> None:
    """Switch from stderr to the log file, or to syslog (also a daemon's default)."""
    target = settings.log_file or (SYSLOG if settings.daemon else "")
    handler: logging.Handler
    if not target:
        return
    if target == SYSLOG:
        # The handler would quietly drop every line if nothing listens there.
        where = settings.syslog_socket
        try:
            if not stat.S_ISSOCK(os.stat(where).st_mode):
                raise LogError(f"cannot log to syslog at {where}: not a socket")
        except OSError as exc:
            raise LogError(f"cannot log to syslog at {where}: {exc.strerror}") from None
        try:
            handler = logging.handlers.SysLogHandler(
                settings.syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
        except OSError as exc:
            raise LogError(f"cannot log to syslog at {where}: {exc.strerror}") from None
        handler.ident = "wsechod: "
    else:
        try:
            handler = logging.FileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise LogError(f"cannot open log file {target}: {exc.strerror}") from None
    _install(handler, settings, tty=False)


def reopen() -> bool:
    """Reopen the log file at its path (after logrotate moved it); False if there is none."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                stream = open(handler.baseFilename, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                # Keep writing where we were rather than lose the log (or the daemon).
                log.warning("cannot reopen log file", path=handler.baseFilename, error=exc.strerror)
                return True
            old = handler.setStream(stream)
            if old is not None:
                old.close()
            return True
    return False


def _shared() -> list[Processor]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _install(handler: logging.Handler, settings: Settings, tty: bool) -> None:
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if tty else "json"
    render: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        render += [_TRACEBACKS, structlog.processors.JSONRenderer()]
    else:
        render.append(structlog.dev.ConsoleRenderer(colors=tty))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_shared(), processors=render)
    )
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
