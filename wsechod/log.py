"""The library's loggers: structlog's call style (``log.info("event", key=value)``) on top
of the standard library's ``logging``, with no global structlog configuration.

Every event becomes one ``logging.LogRecord`` on a logger named ``wsechod...``: the
message is the event's name and each field is an attribute of the record (``extra``). So
the program that runs wsechod decides where its events go: the ``wsechod`` command
installs its own handler (``wsechod.process.logs``, which turns records back into the
same event dicts for its JSON and console lines), and a program that embeds the server
configures ``logging.getLogger("wsechod")`` like any other library's logger. Neither
reads nor changes ``structlog.configure``.
"""

import logging
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

# Attributes every LogRecord has (and the two that Formatter.format adds): a field of the
# same name cannot be an ``extra`` (logging raises KeyError), so it is renamed instead.
RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__
) | {"message", "asctime"}
PASSED_TO_LOGGING = frozenset(structlog.stdlib.LOG_KWARG_NAMES)  # exc_info, stack_info, ...


def _keep_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A field named like a LogRecord attribute would crash the call: it gets a ``_``
    suffix (the code's own calls are checked for this by ``tests/test_embedded.py``; this
    is for fields named at run time, such as counters)."""
    clashes = RECORD_ATTRIBUTES.intersection(event_dict).difference(PASSED_TO_LOGGING)
    for key in clashes:
        event_dict[key + "_"] = event_dict.pop(key)
    return event_dict


_PROCESSORS = (
    structlog.stdlib.filter_by_level,  # below the level: no dict is rendered at all
    _keep_fields,
    structlog.stdlib.render_to_log_kwargs,  # message = event, fields -> extra
)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing to ``logging.getLogger(name)``; its processors are its
    own, so neither the host's structlog configuration nor its absence changes it."""
    return structlog.stdlib.BoundLogger(logging.getLogger(name), list(_PROCESSORS), {})


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a wsechod event carried, from its record (for hosts and tests)."""
    return {k: v for k, v in record.__dict__.items() if k not in RECORD_ATTRIBUTES}
