"""A deliberately minimal WebSocket client over a plain socket.

It is a third, independent implementation next to websockets and websocket-client, and the
only one that lets a test misbehave on purpose: send invalid UTF-8, or never answer a close.
"""

import base64
import os
import socket
import struct

# The XOR of the mask, in C; framing and everything else is this file's own.
from websockets.speedups import apply_mask

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def connect(port: int, path: str = "/", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    send_handshake(sock, port, path)
    read_handshake(sock)
    return sock


def handshake_request(port: int, path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def send_handshake(sock: socket.socket, port: int, path: str = "/") -> None:
    sock.sendall(handshake_request(port, path))


def read_handshake(sock: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during handshake: {head!r}")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError(f"handshake refused: {status!r}")


def frame(
    opcode: int, payload: bytes, fin: bool = True, *, rsv: int = 0, masked: bool = True
) -> bytes:
    """A client frame as bytes, so a test can put several in one write (or break the
    rules on purpose: ``rsv`` bits, ``masked=False``)."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + apply_mask(payload, mask)


def send_frame(sock: socket.socket, opcode: int, payload: bytes, fin: bool = True) -> None:
    sock.sendall(frame(opcode, payload, fin))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by server")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    opcode, _, payload = read_frame_fin(sock)
    return opcode, payload


def read_frame_fin(sock: socket.socket) -> tuple[int, bool, bytes]:
    """The next frame: opcode, FIN bit, payload (server frames are never masked)."""
    first, second = _read_exact(sock, 2)
    assert not second & 0x80, "the server masked a frame"
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", _read_exact(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", _read_exact(sock, 8))
    return first & 0x0F, bool(first & 0x80), _read_exact(sock, n)


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Skip data and control frames until the close frame; return its code and reason
    (1005 for a close frame without a code)."""
    while True:
        opcode, payload = read_frame(sock)
        if opcode == OP_CLOSE:
            if not payload:
                return 1005, ""
            (code,) = struct.unpack("!H", payload[:2])
            return code, payload[2:].decode()


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def until_eof(sock: socket.socket) -> bytes:
    """Everything the server still sends, up to its closing the TCP connection (the
    socket's timeout fails the test if it never does)."""
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    return rest
