"""RFC 6455 frame constants and the server's side of framing (section 5).

Outgoing frames are never masked (5.1), so a frame is a header and the payload as it is;
headers for the common small sizes are built once at import, so framing a short message
costs one concatenation.
"""

import struct
from enum import IntEnum
from typing import NamedTuple

try:  # websockets' C version when its extension is built...
    from websockets.speedups import apply_mask
except ImportError:  # ...else its pure-Python one, as websockets itself does (PyPy, no wheel)
    from websockets.utils import apply_mask

__all__ = ["apply_mask"]  # and the types, constants and functions below


class Opcode(IntEnum):
    """A frame's opcode (5.2)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """The close codes this server sends or names (7.4.1; 1012-1014 from IANA's registry).
    A peer may also send 3000-4999, which have no name here."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # what a close frame without a payload means; never sent
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class Failure(NamedTuple):
    """Why a connection fails (7.1.7): the close code it gets and the reason sent with it."""

    code: CloseCode
    reason: str


# Plain ints for the frame parser, where an enum's comparison costs several times an int's
# (measured by bench.hotpath); everywhere else the enums above.
OP_CONT, OP_TEXT, OP_BINARY = int(Opcode.CONT), int(Opcode.TEXT), int(Opcode.BINARY)
OP_CLOSE, OP_PING, OP_PONG = int(Opcode.CLOSE), int(Opcode.PING), int(Opcode.PONG)

FIN, RSV1 = 0x80, 0x40
MAX_CONTROL_PAYLOAD = 125  # 5.5: control frames carry at most 125 bytes

# Close codes (7.4.1) that a peer may send, besides 3000-4999 (registered and private).
PEER_CLOSE_CODES = frozenset(code for code in CloseCode if code is not CloseCode.NO_STATUS_RCVD)

# The ways a frame breaks the protocol, as its header or payload shows them.
NON_MINIMAL_LENGTH = Failure(CloseCode.PROTOCOL_ERROR, "non-minimal length")  # 5.2
INVALID_LENGTH = Failure(CloseCode.PROTOCOL_ERROR, "invalid length")
UNMASKED = Failure(CloseCode.PROTOCOL_ERROR, "incorrect masking")  # 5.1
INVALID_CONTROL = Failure(CloseCode.PROTOCOL_ERROR, "invalid control frame")
CONTROL_TOO_LONG = Failure(CloseCode.PROTOCOL_ERROR, "control frame too long")  # 5.5
RESERVED_OPCODE = Failure(CloseCode.PROTOCOL_ERROR, "reserved opcode")
RESERVED_BITS = Failure(CloseCode.PROTOCOL_ERROR, "reserved bits set")
UNEXPECTED_CONTINUATION = Failure(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
EXPECTED_CONTINUATION = Failure(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
TOO_BIG = Failure(CloseCode.MESSAGE_TOO_BIG, "message too big")
INVALID_UTF8 = Failure(CloseCode.INVALID_DATA, "invalid UTF-8")  # 8.1
CLOSE_TOO_SHORT = Failure(CloseCode.PROTOCOL_ERROR, "close frame too short")
INVALID_CLOSE_REASON = Failure(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason")

_SMALL = 126
# HEADERS[first_byte][length] for lengths below 126: the whole header, ready to use.
HEADERS: dict[int, list[bytes]] = {}


def _first_byte(opcode: int, fin: bool, rsv1: bool) -> int:
    return (FIN if fin else 0) | (RSV1 if rsv1 else 0) | opcode


for _opcode in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
    for _fin in (True, False):
        for _rsv1 in (True, False):
            _b0 = _first_byte(_opcode, _fin, _rsv1)
            HEADERS[_b0] = [bytes((_b0, n)) for n in range(_SMALL)]


def header(opcode: int, length: int, fin: bool = True, rsv1: bool = False) -> bytes:
    """The header of an unmasked frame of ``length`` bytes."""
    b0 = _first_byte(opcode, fin, rsv1)
    if length < _SMALL:
        return HEADERS[b0][length]
    if length < 0x10000:
        return struct.pack("!BBH", b0, 126, length)
    return struct.pack("!BBQ", b0, 127, length)


def frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """A whole unmasked frame: what the server writes."""
    return header(opcode, len(payload), fin, rsv1) + payload


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The body of a close frame; ``None`` sends none (the peer then sees 1005)."""
    if code is None:
        return b""
    # At most 123 bytes of reason, cut at a character boundary: 5.5.1 wants valid UTF-8.
    text = reason.encode()[: MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore")
    return code.to_bytes(2, "big") + text.encode()


def valid_utf8(payload: bytes) -> bool:
    """Whether a whole text message is valid UTF-8."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


def valid_peer_code(code: int) -> bool:
    """Whether a peer may put ``code`` in a close frame (7.4): 1005, 1006 and 1015 are
    for reporting only, 1016-2999 are reserved, below 1000 is unused."""
    return code in PEER_CLOSE_CODES or 3000 <= code <= 4999
