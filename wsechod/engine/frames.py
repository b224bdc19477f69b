"""RFC 6455 frame constants and the server's side of framing (section 5).

Outgoing frames are never masked (5.1), so a frame is a header and the payload as it is;
headers for the common small sizes are built once at import, so framing a short message
costs one concatenation.
"""

import struct

try:  # websockets' C version when its extension is built...
    from websockets.speedups import apply_mask
except ImportError:  # ...else its pure-Python one, as websockets itself does (PyPy, no wheel)
    from websockets.utils import apply_mask

__all__ = ["apply_mask"]  # and the constants and functions below

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

FIN, RSV1 = 0x80, 0x40
MAX_CONTROL_PAYLOAD = 125  # 5.5: control frames carry at most 125 bytes

# Close codes (7.4.1) that a peer may send, besides 3000-4999 (registered and private).
PEER_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)
GOING_AWAY, PROTOCOL_ERROR, INVALID_DATA = 1001, 1002, 1007
POLICY_VIOLATION, MESSAGE_TOO_BIG, INTERNAL_ERROR = 1008, 1009, 1011
NO_STATUS = 1005  # what a close frame without a payload means; never sent on the wire

_SMALL = 126
# _HEADERS[first_byte][length] for lengths below 126: the whole header, ready to use.
_HEADERS: dict[int, list[bytes]] = {}


def _first_byte(opcode: int, fin: bool, rsv1: bool) -> int:
    return (FIN if fin else 0) | (RSV1 if rsv1 else 0) | opcode


for _opcode in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
    for _fin in (True, False):
        for _rsv1 in (True, False):
            _b0 = _first_byte(_opcode, _fin, _rsv1)
            _HEADERS[_b0] = [bytes((_b0, n)) for n in range(_SMALL)]


def header(opcode: int, length: int, fin: bool = True, rsv1: bool = False) -> bytes:
    """The header of an unmasked frame of ``length`` bytes."""
    b0 = _first_byte(opcode, fin, rsv1)
    if length < _SMALL:
        return _HEADERS[b0][length]
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


def valid_peer_code(code: int) -> bool:
    """Whether a peer may put ``code`` in a close frame (7.4): 1005, 1006 and 1015 are
    for reporting only, 1016-2999 are reserved, below 1000 is unused."""
    return code in PEER_CLOSE_CODES or 3000 <= code <= 4999
