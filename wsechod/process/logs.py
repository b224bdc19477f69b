"""Logging: structlog events rendered for people (console) or machines (JSON lines).

Everything goes through one stdlib handler, so our events and those of websockets and
asyncio share a format and a destination. Our events reach it as plain ``logging``
records (``wsechod.log``: the event is the message, the fields are attributes), which its
formatter turns back into event dicts; structlog's global configuration is never touched.

Logging starts on stderr, so start-up errors reach the terminal; ``use_destination`` then
moves it to the log file or syslog once the process runs as the user that will have to
reopen the file on SIGHUP.

When stderr is systemd's journal stream, each line starts with its syslog priority
(``<4>`` for a warning), which journald strips and stores, so ``journalctl -p warning``
finds our warnings among the JSON lines.
"""

import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor

from wsechod.log import get_logger
from wsechod.process import paths
from wsechod.settings import Settings

log = get_logger("wsechod")

SYSLOG = "syslog"
# Structured tracebacks without local variables: they could hold what a client sent.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


# syslog priorities (sd-daemon(3), RFC 5424) of the logging levels, most severe first.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


class LogError(Exception):
    """The log destination cannot be opened; the message is one line for the operator."""


class _JournalHandler(logging.StreamHandler[TextIO]):
    """stderr to journald: each line prefixed with its priority, as sd-daemon(3) says."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{super().format(record)}"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    return next((p for level, p in _PRIORITIES if levelno >= level), _DEBUG_PRIORITY)


def on_journal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to the journal: systemd sets
    ``$JOURNAL_STREAM`` to its device and inode (systemd.exec(5)); a process that merely
    inherited the variable, with stderr elsewhere, does not match."""
    wanted = os.environ.get("JOURNAL_STREAM")
    if not wanted:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file
        return False
    return wanted == f"{st.st_dev}:{st.st_ino}"


def configure(settings: Settings, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr), in the format and at the level the settings ask for."""
    stream = stream or sys.stderr
    handler = _JournalHandler(stream) if on_journal(stream) else logging.StreamHandler(stream)
    _install(handler, settings, stream.isatty())
    set_level(settings.log_level)


def set_level(name: str) -> None:
    """At start, and when a reload changes ``log_level``."""
    level = getattr(logging, name.upper())
    logging.getLogger().setLevel(level)
    # websockets logs every connection at INFO and every frame at DEBUG; our own
    # per-connection events say the same in our format, so only its problems get through.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))


def _target(settings: Settings) -> str:
    return settings.log_file or (SYSLOG if settings.daemon else "")


def log_path(settings: Settings) -> Path | None:
    """The log file, if logging goes to one."""
    target = _target(settings)
    return Path(target) if target and target != SYSLOG else None


def syslog_problem(settings: Settings) -> str | None:
    """Why logging to syslog would fail (nothing listens at the socket), or None. The
    handler itself would quietly drop every line, so this is checked first."""
    if _target(settings) != SYSLOG:
        return None
    where = settings.syslog_socket
    try:
        problem = None if stat.S_ISSOCK(os.stat(where).st_mode) else "not a socket"
    except OSError as exc:
        problem = exc.strerror
    if problem is None:
        return None
    # A daemon's default destination: containers have no syslog, say what to do instead.
    hint = ""
    if not settings.log_file:
        hint = " (a daemon without --log-file logs to syslog: give --log-file PATH)"
    return f"cannot log to syslog at {where}: {problem}{hint}"


def prepare(settings: Settings, owner: tuple[int, int] | None) -> None:
    """Create the log file's directory if missing, as root before dropping to ``owner``,
    who then owns it (as for the pidfile's), so a fresh machine needs no mkdir."""
    path = log_path(settings)
    if path is None:
        return
    try:
        paths.make_directory(path.parent, owner)
    except OSError as exc:
        raise LogError(f"cannot create log directory {path.parent}: {exc.strerror}") from None


def use_destination(settings: Settings) -> None:
    """Switch from stderr to the log file, or to syslog (also a daemon's default)."""
    target = _target(settings)
    handler: logging.Handler
    if not target:
        return
    if target == SYSLOG:
        where = settings.syslog_socket
        problem = syslog_problem(settings)
        if problem is not None:
            raise LogError(problem)
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


# Fields every line of this process carries: a worker's index (see tag).
_TAGS: dict[str, object] = {}


def tag(**fields: object) -> None:
    """Add ``fields`` to every line this process logs from now on (a worker: its index,
    so that the lines of several workers in one log can be told apart)."""
    _TAGS.update(fields)


def _add_tags(_: object, __: str, event: EventDict) -> EventDict:
    for key, value in _TAGS.items():
        event.setdefault(key, value)
    return event


def _event_last(_: object, __: str, event_dict: EventDict) -> EventDict:
    """The event's name after its fields, where structlog's own loggers put it: the JSON
    lines keep the order they always had. (``message`` and ``asctime``, which another
    handler's formatter may have added to the record, are no fields.)"""
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    event_dict["event"] = event_dict.pop("event")
    return event_dict


def _shared() -> list[Processor]:
    """Records to event dicts: wsechod's events (``wsechod.log``) carry their fields as
    record attributes; those of websockets and asyncio have none."""
    return [
        structlog.stdlib.ExtraAdder(),
        _event_last,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_tags,
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
