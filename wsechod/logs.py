"""Logging: structlog events rendered for people (console) or machines (JSON lines).

Everything goes through one stdlib handler, so our events and those of websockets and
asyncio share a format and a destination, and later only one place has to change to write
to a file or reopen it on SIGHUP.
"""

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from wsechod.settings import Settings

log = structlog.stdlib.get_logger("wsechod")


def configure(settings: Settings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    level = getattr(logging, settings.log_level.upper())
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"

    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "json":
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every connection at INFO and every frame at DEBUG; our own
    # per-connection events say the same in our format, so only its problems get through.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))
