"""Echo behaviour against the real daemon, with three independent client implementations."""

import asyncio
import http.client
import os
import socket
from collections.abc import Callable

import pytest
import websocket  # websocket-client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from tests import rawws
from tests.conftest import Daemon

MAX_SIZE = 64 * 1024
SIZES = [1, 2, 125, 126, 127, 65535, MAX_SIZE]


def make_payloads() -> list[str | bytes]:
    out: list[str | bytes] = []
    for n in SIZES:
        out.append(os.urandom(n))
        out.append(("é" * n)[: n // 2] + "x" * (n - 2 * (n // 2)))  # n UTF-8 bytes
    return out


PAYLOADS = make_payloads()


def payloads() -> list[str | bytes]:
    return PAYLOADS


@pytest.fixture
def daemon(start: Callable[..., Daemon]) -> Daemon:
    return start("--max-size", str(MAX_SIZE))


def test_websockets_client_echoes_text_and_binary_in_order(daemon: Daemon) -> None:
    async def main() -> list[str | bytes]:
        async with connect(daemon.url + "/any/path?q=1", max_size=None) as ws:
            for message in payloads():  # pipelined: order must hold
                await ws.send(message)
            return [await ws.recv() for _ in payloads()]

    assert asyncio.run(main()) == payloads()


def test_echo_is_exact_for_every_size(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon.url, max_size=None) as ws:
            for message in payloads():
                await ws.send(message)
                assert await ws.recv() == message

    asyncio.run(main())


def test_websocket_client_library_echoes_text_and_binary(daemon: Daemon) -> None:
    ws = websocket.create_connection(daemon.url, timeout=10)
    try:
        for message in payloads():
            if isinstance(message, bytes):
                ws.send_binary(message)
                opcode, data = ws.recv_data()
                assert opcode == websocket.ABNF.OPCODE_BINARY
                assert data == message
            else:
                ws.send(message)
                opcode, data = ws.recv_data()
                assert opcode == websocket.ABNF.OPCODE_TEXT
                assert data.decode() == message
    finally:
        ws.close()


def test_fragments_are_echoed_as_they_arrive(daemon: Daemon) -> None:
    sock = rawws.connect(daemon.port)
    with sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"hello ", fin=False)
        # Streamed: the first fragment comes back before the second is even sent.
        assert rawws.read_frame_fin(sock) == (rawws.OP_TEXT, False, b"hello ")
        rawws.send_frame(sock, rawws.OP_PING, b"between")  # control frames may interleave
        assert rawws.read_frame_fin(sock) == (rawws.OP_PONG, True, b"between")
        rawws.send_frame(sock, rawws.OP_CONT, b"world")
        assert rawws.read_frame_fin(sock) == (rawws.OP_CONT, True, b"world")


def test_oversized_message_closes_1009(daemon: Daemon) -> None:
    async def main() -> int | None:
        async with connect(daemon.url, max_size=None) as ws:
            await ws.send(b"x" * MAX_SIZE)
            assert len(await ws.recv()) == MAX_SIZE
            await ws.send(b"x" * (MAX_SIZE + 1))
            with pytest.raises(ConnectionClosedError) as info:
                await ws.recv()
            assert info.value.rcvd is not None
            return info.value.rcvd.code

    assert asyncio.run(main()) == 1009


def test_invalid_utf8_closes_1007(daemon: Daemon) -> None:
    sock = rawws.connect(daemon.port)
    with sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"ok")
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"ok")
        rawws.send_frame(sock, rawws.OP_TEXT, b"\xff\xfe broken")
        code, _ = rawws.read_close(sock)
    assert code == 1007
    # An ordinary client error is not a server fault: no traceback in the log.
    assert "Traceback" not in daemon.log


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def test_healthz_is_200_while_serving(daemon: Daemon) -> None:
    assert http_get(daemon.port, "/healthz")[:2] == (200, "ok\n")


def test_plain_http_gets_426_with_one_line_body(daemon: Daemon) -> None:
    status, body, headers = http_get(daemon.port, "/")
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    assert body.endswith("\n")
    assert body.count("\n") == 1
    status, _, headers = http_get(daemon.port, "/", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert "Traceback" not in daemon.log


def test_head_is_answered_wherever_get_is(daemon: Daemon) -> None:
    """HTTP requires HEAD wherever GET works: same status and headers, no body."""
    for path, status in (("/healthz", 200), ("/", 426)):
        got, body, headers = http_get(daemon.port, path, method="HEAD")
        _, get_body, _ = http_get(daemon.port, path)
        assert (got, body) == (status, "")
        assert headers["Content-Length"] == str(len(get_body.encode()))


def test_max_connections_refuses_with_503(start: Callable[..., Daemon]) -> None:
    daemon = start("--max-connections", "2")

    async def main() -> None:
        async with connect(daemon.url) as a, connect(daemon.url) as b:
            await a.send("a")
            await b.send("b")
            assert (await a.recv(), await b.recv()) == ("a", "b")
            with pytest.raises(InvalidStatus) as info:
                async with connect(daemon.url):
                    pass
            assert info.value.response.status_code == 503
        # Once one leaves, there is room again.
        async with connect(daemon.url) as c:
            await c.send("c")
            assert await c.recv() == "c"

    asyncio.run(main())
    assert "max_connections" in daemon.log


def test_vanishing_client_leaves_no_traceback(start: Callable[..., Daemon]) -> None:
    daemon = start("--log-level", "debug")
    sock = rawws.connect(daemon.port)
    rawws.send_frame(sock, rawws.OP_BINARY, b"abc")
    assert rawws.read_frame(sock) == (rawws.OP_BINARY, b"abc")
    sock.close()  # no close frame: the client just disappears
    closed = daemon.wait_for("connection closed")
    assert (closed["code_received"], closed["received"], closed["sent"]) == (None, 1, 1)
    assert "Traceback" not in daemon.log
    mine = [e for e in daemon.events if not e["event"].startswith("open files limit")]
    assert all(e["level"] in ("debug", "info") for e in mine)


def test_repeated_upgrade_header_is_answered_without_a_traceback(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        status = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 4"), status
    assert http_get(daemon.port, "/healthz")[0] == 200
    assert "Traceback" not in daemon.log
    assert not [e for e in daemon.events if e["level"] == "error"]
