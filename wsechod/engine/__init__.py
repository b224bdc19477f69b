"""The engine: WebSocket connections on uvloop with one ``asyncio.Protocol`` each and no
Task per connection or message; applications see only ``interface``."""

from wsechod.engine.frames import OP_BINARY, OP_TEXT, frame
from wsechod.engine.interface import (
    Application,
    Connection,
    Family,
    Figures,
    Listener,
    Prepared,
    Reply,
    Request,
)
from wsechod.engine.server import Engine, Options

__all__ = [
    "Application",
    "Connection",
    "Engine",
    "Family",
    "Figures",
    "Listener",
    "Options",
    "Prepared",
    "Reply",
    "Request",
    "frame",
    "prepare",
]


def prepare(payload: bytes, text: bool) -> Prepared:
    """Frame a message once, for writing the same bytes to many connections."""
    return Prepared(payload, text, frame(OP_TEXT if text else OP_BINARY, payload))
