"""The library's loggers: structlog's call style (``log.info("event", key=value)``) on
the standard library's ``logging``, with no structlog configuration at all.

Every event becomes one ``logging.LogRecord`` on a logger named ``wsechod...``: its
message is the event's name and each field is an attribute of the record (``extra``), as
``structlog.stdlib.render_to_log_kwargs`` would make it; its caller (``pathname``,
``lineno``, ``funcName``) is the wsechod code that logged it. So the program that runs
wsechod decides where its events go: the ``wsechod`` command installs its own handler
(``wsechod.process.logs``, which turns records back into the same event dicts for its
JSON and console lines), and a program that embeds the server configures
``logging.getLogger("wsechod")`` like any other library's logger. Neither reads nor
changes ``structlog.configure``.
"""

import logging
from typing import Any

# Attributes every LogRecord has (and the two that Formatter.format adds): a field of the
# same name cannot be an ``extra`` (logging raises KeyError), so it gets a "_" suffix.
RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__
) | {"message", "asctime"}
# Keywords of logging's own calls, passed as such rather than as fields.
PASSED_TO_LOGGING = frozenset({"exc_info", "stack_info"})


class Logger:
    """``debug``/``info``/``warning``/``error``/``exception(event, **fields)`` on
    ``logging.getLogger(name)``; below the logger's level, nothing is built."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    @property
    def name(self) -> str:
        return self._logger.name

    def debug(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        if self._logger.isEnabledFor(logging.ERROR):
            fields.setdefault("exc_info", True)
            self._log(logging.ERROR, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        exc_info = fields.pop("exc_info", None)
        stack_info = bool(fields.pop("stack_info", False))
        if not RECORD_ATTRIBUTES.isdisjoint(fields):
            # Fields named at run time (counters) could clash: renamed, never a crash.
            for key in RECORD_ATTRIBUTES.intersection(fields):
                fields[key + "_"] = fields.pop(key)
        # stacklevel 3: the caller of debug()/info()/... (past this and that method).
        self._logger.log(
            level, event, exc_info=exc_info, stack_info=stack_info, extra=fields, stacklevel=3
        )


def get_logger(name: str) -> Logger:
    """The logger for ``name`` (``wsechod`` or below it)."""
    return Logger(name)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a wsechod event carried, from its record (for hosts and tests)."""
    return {k: v for k, v in record.__dict__.items() if k not in RECORD_ATTRIBUTES}
