"""The engine: WebSocket connections on uvloop with one ``asyncio.Protocol`` each and no
Task per connection or message; applications see only ``interface``."""

from wsechod.engine.frames import OP_BINARY, OP_TEXT, CloseCode, Opcode, frame
from wsechod.engine.interface import (
    Admission,
    Admitted,
    Application,
    Connection,
    Family,
    Figures,
    Identity,
    Listener,
    Prepared,
    ReadBody,
    Reply,
    Request,
)
from wsechod.engine.options import Options
from wsechod.engine.server import Engine

__all__ = [
    "Admission",
    "Admitted",
    "Application",
    "CloseCode",
    "Connection",
    "Engine",
    "Family",
    "Figures",
    "Identity",
    "Listener",
    "Opcode",
    "Options",
    "Prepared",
    "ReadBody",
    "Reply",
    "Request",
    "frame",
    "prepare",
]


def prepare(payload: bytes, text: bool) -> Prepared:
    """Frame a message once, for writing the same bytes to many connections."""
    return Prepared(payload, text, frame(OP_TEXT if text else OP_BINARY, payload))
