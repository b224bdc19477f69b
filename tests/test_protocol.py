"""RFC 6455, section by section, over raw sockets: a client library would hide the frames.

Every violation gets its close code after every complete message before it has been
answered; fragments stream; control frames interleave in stream order.
"""

import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests import rawws
from tests.conftest import Daemon, RssPeak, peer_port
from tests.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, frame


@pytest.fixture
def daemon(start: Callable[..., Daemon]) -> Daemon:
    return start("--max-size", "65536", "--log-level", "debug")


def close_of(sock: socket.socket) -> int:
    """The code of the server's close frame; the server then closes TCP."""
    code, _ = rawws.read_close(sock)
    rawws.until_eof(sock)
    return code


# (what the client sends after one good message, the close code it must get)
VIOLATIONS = {
    "unmasked frame": (frame(OP_TEXT, b"x", masked=False), 1002),
    "reserved opcode 3": (frame(0x3, b"x"), 1002),
    "reserved control opcode 0xB": (frame(0xB, b""), 1002),
    "rsv1 without extension": (frame(OP_TEXT, b"x", rsv=0x40), 1002),
    "rsv2": (frame(OP_BINARY, b"x", rsv=0x20), 1002),
    "fragmented ping": (frame(OP_PING, b"x", fin=False), 1002),
    "ping over 125 bytes": (frame(OP_PING, bytes(126)), 1002),
    "continuation without a message": (frame(OP_CONT, b"x"), 1002),
    "new message inside a fragmented one": (
        frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"),
        1002,
    ),
    "close code 1005": (frame(OP_CLOSE, rawws.close_payload(1005)), 1002),
    "close code 999": (frame(OP_CLOSE, rawws.close_payload(999)), 1002),
    "close code 2000": (frame(OP_CLOSE, rawws.close_payload(2000)), 1002),
    "one-byte close": (frame(OP_CLOSE, b"\x03"), 1002),
    "close reason not UTF-8": (frame(OP_CLOSE, rawws.close_payload(1000, b"\xff")), 1007),
    "text not UTF-8": (frame(OP_TEXT, b"caf\xc3"), 1007),
    "surrogate in UTF-8": (frame(OP_TEXT, b"\xed\xa0\x80"), 1007),
    "message over max_size": (frame(OP_BINARY, bytes(65537)), 1009),
    "fragments over max_size": (
        frame(OP_BINARY, bytes(40000), fin=False) + frame(OP_CONT, bytes(40000)),
        1009,
    ),
    "16-bit length for 5 bytes": (struct.pack("!BBH", 0x82, 0xFE, 5) + bytes(9), 1002),
    "64-bit length for 5 bytes": (struct.pack("!BBQ", 0x82, 0xFF, 5) + bytes(9), 1002),
    "64-bit length with the top bit set": (
        struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + os.urandom(4),
        1002,
    ),
}


@pytest.mark.parametrize("case", VIOLATIONS, ids=list(VIOLATIONS))
def test_violation_after_a_message_in_the_same_write_gets_its_close_code_after_the_echo(
    daemon: Daemon, case: str
) -> None:
    bad, code = VIOLATIONS[case]
    with rawws.connect(daemon.port) as sock:
        # One write: a complete message, then the violation. The message is answered
        # first; nothing after the violation is.
        sock.sendall(frame(OP_TEXT, b"before") + bad + frame(OP_TEXT, b"after"))
        assert rawws.read_frame(sock) == (OP_TEXT, b"before")
        assert close_of(sock) == code
    assert "Traceback" not in daemon.log


def test_oversized_frame_is_refused_at_its_header(daemon: Daemon) -> None:
    """1009 comes as soon as the header announces too much, not after the payload."""
    with rawws.connect(daemon.port) as sock:
        sock.sendall(struct.pack("!BBQ", 0x82, 0xFF, 2**40) + os.urandom(4))
        assert close_of(sock) == 1009


def test_close_between_fragments_is_a_normal_close(daemon: Daemon) -> None:
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, OP_TEXT, b"unfinished", fin=False)
        assert rawws.read_frame_fin(sock) == (OP_TEXT, False, b"unfinished")
        rawws.send_frame(sock, OP_CLOSE, rawws.close_payload(1000, b"bye"))
        assert close_of(sock) == 1000
    closed = daemon.wait_for("connection closed")
    assert (closed["code_received"], closed["code_sent"]) == (1000, 1000)


def test_close_without_code_is_answered_without_code(daemon: Daemon) -> None:
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, OP_CLOSE, b"")
        assert rawws.read_frame(sock) == (OP_CLOSE, b"")
        assert rawws.until_eof(sock) == b""


def test_invalid_utf8_in_first_fragment_fails_before_the_second(daemon: Daemon) -> None:
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, OP_TEXT, b"ok \xff", fin=False)
        assert close_of(sock) == 1007  # the second fragment was never sent


def test_utf8_split_across_fragments_is_valid(daemon: Daemon) -> None:
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, OP_TEXT, b"caf\xc3", fin=False)
        assert rawws.read_frame_fin(sock) == (OP_TEXT, False, b"caf\xc3")
        rawws.send_frame(sock, OP_CONT, b"\xa9!")
        assert rawws.read_frame_fin(sock) == (OP_CONT, True, b"\xa9!")


def test_invalid_utf8_at_the_start_of_a_big_frame_fails_before_its_end(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--max-size", str(4 * 2**20))
    with rawws.connect(daemon.port) as sock:
        whole = frame(OP_TEXT, b"\xff" + bytes(4 * 2**20 - 1))
        sock.sendall(whole[: 512 * 1024])  # an eighth of the frame; the rest never comes
        assert close_of(sock) == 1007


@pytest.mark.parametrize(
    ("size", "bad_at", "chunk"),
    [(1000, 5, 10), (2**20, 10_000, 4096), (70_000, 65_000, 4096)],
    ids=["small frame in 10-byte reads", "1 MiB frame in 4 KiB reads", "16-bit length"],
)
def test_invalid_utf8_in_a_frame_still_arriving_fails_at_the_read_that_brings_it(
    start: Callable[..., Daemon], size: int, bad_at: int, chunk: int
) -> None:
    """RFC 6455 8.1: fail at once, whatever the frame's size. The client sends up to the
    chunk that holds the bad byte and no more: the 1007 must come without the rest."""
    daemon = start("--max-size", str(2**21))
    payload = bytearray(b"a" * size)
    payload[bad_at] = 0xFF
    whole = frame(OP_TEXT, bytes(payload))
    header = len(whole) - size
    upto = header + bad_at + 1
    with rawws.connect(daemon.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for offset in range(0, upto, chunk):
            sock.sendall(whole[offset : min(offset + chunk, upto)])
        assert close_of(sock) == 1007


def test_a_ping_between_text_fragments_is_not_checked_as_text(daemon: Daemon) -> None:
    """A control frame still arriving inside a text message carries bytes, not text."""
    with rawws.connect(daemon.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rawws.send_frame(sock, OP_TEXT, b"abc", fin=False)
        assert rawws.read_frame_fin(sock) == (OP_TEXT, False, b"abc")
        ping = frame(OP_PING, b"\xff\xfe\xfd")
        sock.sendall(ping[:7])  # the header, the mask and one byte of the payload
        sock.sendall(ping[7:])
        assert rawws.read_frame(sock) == (OP_PONG, b"\xff\xfe\xfd")
        rawws.send_frame(sock, OP_CONT, b"d")
        assert rawws.read_frame_fin(sock) == (OP_CONT, True, b"d")


def test_ping_pong_and_messages_are_answered_in_stream_order(daemon: Daemon) -> None:
    with rawws.connect(daemon.port) as sock:
        sock.sendall(
            frame(OP_TEXT, b"one")
            + frame(OP_PING, b"p1")
            + frame(OP_BINARY, b"two", fin=False)
            + frame(OP_PING, b"p2")
            + frame(OP_CONT, b"three")
            + frame(OP_PONG, b"unsolicited")  # ignored, as 5.5.3 allows
            + frame(OP_CLOSE, rawws.close_payload(1000))
        )
        got = [rawws.read_frame_fin(sock) for _ in range(6)]
        assert rawws.until_eof(sock) == b""
    assert got == [
        (OP_TEXT, True, b"one"),
        (OP_PONG, True, b"p1"),
        (OP_BINARY, False, b"two"),
        (OP_PONG, True, b"p2"),
        (OP_CONT, True, b"three"),
        (OP_CLOSE, True, rawws.close_payload(1000)),
    ]


def test_bytes_sent_before_the_101_are_the_first_frames(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        rawws.send_handshake(sock, daemon.port)
        sock.sendall(frame(OP_TEXT, b"eager"))  # before reading the 101
        rawws.read_handshake(sock)
        assert rawws.read_frame(sock) == (OP_TEXT, b"eager")


@pytest.mark.timeout(120)
def test_4_mib_in_65536_fragments_is_echoed_whole_in_bounded_memory(
    start: Callable[..., Daemon],
) -> None:
    """No cap on the number of fragments: a message costs one frame of memory."""
    daemon = start("--max-size", str(16 * 2**20))
    fragments = 65536
    payload = os.urandom(64 * fragments)
    frames = b"".join(
        frame(OP_CONT if i else OP_BINARY, payload[i * 64 : (i + 1) * 64], fin=i == fragments - 1)
        for i in range(fragments)
    )
    rss = RssPeak(daemon.proc.pid)
    with rawws.connect(daemon.port, timeout=60) as sock:
        writer = threading.Thread(target=sock.sendall, args=(frames,))
        writer.start()
        echoed: list[bytes] = []
        while True:
            opcode, fin, data = rawws.read_frame_fin(sock)
            assert opcode == (OP_CONT if echoed else OP_BINARY)
            echoed.append(data)
            if fin:
                break
        writer.join()
    growth = rss.stop()
    print(f"65536 fragments: {len(echoed)} frames echoed, server RSS grew {growth:.1f} MiB")
    assert len(echoed) == fragments
    assert b"".join(echoed) == payload
    assert growth < 8


class Hostile(threading.Thread):
    """A client that sends ``chunk`` over and over and never reads a byte."""

    def __init__(self, port: int, chunk: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = rawws.connect(port)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.chunk = chunk
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.sock.sendall(self.chunk)
        except OSError:  # the server closed it: what the test waits for
            pass

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def of_port(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: peer_port(event) == port


# The bound per connection (docs/security.md, Limits): write_limit + max_size + one read (256 KiB).
def bound_mib(clients: int, write_limit: int = 2**15, max_size: int = 2**20) -> float:
    return clients * (write_limit + max_size + 256 * 1024) / 2**20


@pytest.mark.timeout(60)
def test_ping_flood_that_never_reads_is_bounded_and_dropped_by_the_keepalive(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--ping-interval", "1", "--ping-timeout", "1", "--log-level", "debug")
    rss = RssPeak(daemon.proc.pid)
    pings = frame(OP_PING, bytes(125)) * 512
    flood = Hostile(daemon.port, pings)
    try:
        # ping_interval + ping_timeout, and as long again to take the close frame; not
        # close_timeout (10 s): it does not read, so it is cut.
        closed = daemon.wait_for("connection closed", timeout=8)
    finally:
        growth = rss.stop()
        flood.close()
    print(f"ping flood: server RSS grew {growth:.1f} MiB before the keepalive dropped it")
    assert closed["code_sent"] == 1011
    assert growth < bound_mib(1) + 4  # + the allocator's slack


@pytest.mark.timeout(60)
def test_clients_sending_1_mib_that_never_read_are_bounded_and_dropped(
    start: Callable[..., Daemon],
) -> None:
    clients = 10
    daemon = start("--ping-interval", "1", "--ping-timeout", "1", "--log-level", "debug")
    rss = RssPeak(daemon.proc.pid)
    message = frame(OP_BINARY, os.urandom(2**20 - 16))
    floods = [Hostile(daemon.port, message) for _ in range(clients)]
    try:
        for flood in floods:  # each connection's close is logged with its client's port
            daemon.wait_for("connection closed", 30, of_port(flood.sock.getsockname()[1]))
    finally:
        growth = rss.stop()
        for flood in floods:
            flood.close()
    closes = [e for e in daemon.events if e["event"] == "connection closed"]
    print(f"{clients} non-readers of 1 MiB messages: server RSS grew {growth:.1f} MiB")
    assert [e["code_sent"] for e in closes] == [1011] * clients
    assert growth < bound_mib(clients) + 4


def test_unsupported_version_is_refused_with_the_version_we_speak(daemon: Daemon) -> None:
    """4.4: the refusal names the version the server understands."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        request = rawws.handshake_request(daemon.port)
        sock.sendall(request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"))
        head = rawws.until_eof(sock).split(b"\r\n\r\n", 1)[0].decode()
    status, *headers = head.split("\r\n")
    assert status.startswith("HTTP/1.1 4"), status
    assert "Sec-WebSocket-Version: 13" in headers


# wsechod with websockets' C extension hidden, as where it was built without it (no wheel
# for the platform, PyPy): the engine then masks with websockets' pure-Python apply_mask.
WITHOUT_SPEEDUPS = (
    sys.executable,
    "-c",
    "import sys; sys.modules['websockets.speedups'] = None\n"
    "from wsechod.engine import frames\n"
    "from websockets.utils import apply_mask\n"
    "assert frames.apply_mask is apply_mask, 'not the pure-Python apply_mask'\n"
    "from wsechod.process.cli import main\n"
    "sys.exit(main(sys.argv[2:]))",
)


def test_without_websockets_speedups_the_engine_masks_in_pure_python(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--max-size", str(2**21), prefix=WITHOUT_SPEEDUPS)
    with rawws.connect(daemon.port) as sock:
        for size in (0, 5, 125, 4097, 70_000, 2**20):  # inline, small, view, 16/64-bit lengths
            payload = os.urandom(size)
            rawws.send_frame(sock, OP_BINARY, payload)
            assert rawws.read_frame(sock) == (OP_BINARY, payload)
        text = b"a" * 10_000 + b"\xff" + b"a" * 100_000
        whole = frame(OP_TEXT, text)
        sock.sendall(whole[: len(whole) - len(text) + 10_001])  # through the bad byte only
        assert close_of(sock) == 1007
