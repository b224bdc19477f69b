"""Hostile HTTP before the upgrade: each malformed request gets 400 with a one-line body
saying what is wrong (never a silent close, never a traceback), while a normal client is
served meanwhile."""

import asyncio
import re
import socket
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from tests.conftest import Daemon

UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)

HOSTILE = {
    "no version": (b"GET /\r\n\r\n", "invalid HTTP request line"),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: x\r\n" + UPGRADE + b"\r\n", "unsupported protocol"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "unsupported protocol"),
    "lower-case version": (b"GET / http/1.1\r\nHost: x\r\n\r\n", "unsupported protocol"),
    "NUL in a header": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n" + UPGRADE + b"\r\n",
        "invalid HTTP header value: a\\x00b",
    ),
    "bare CR in a header": (
        b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n" + UPGRADE + b"\r\n",
        "invalid HTTP header value",
    ),
    "bare LF in a header": (
        b"GET / HTTP/1.1\r\nHost: x\n" + UPGRADE + b"\r\n",
        "a line ends with a bare LF",
    ),
    "bare LF everywhere": (
        b"GET / HTTP/1.1\nHost: x\n" + UPGRADE.replace(b"\r\n", b"\n") + b"\n",
        "a line ends with a bare LF",
    ),
    "missing Host": (b"GET / HTTP/1.1\r\n" + UPGRADE + b"\r\n", "missing Host header"),
    "two Hosts": (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + UPGRADE + b"\r\n",
        "more than one Host header",
    ),
    "folded header": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n" + UPGRADE + b"\r\n",
        "invalid HTTP header line",
    ),
    "space before the colon": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "invalid HTTP header name"),
    "header without a colon": (b"GET / HTTP/1.1\r\nHost: x\r\nXYZ\r\n\r\n", "invalid HTTP header"),
    "binary": (bytes(range(1, 9)) + b"\r\n\r\n", "invalid HTTP request line"),
    "NUL in the target of an upgrade": (
        b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n",
        "control character in the request target: /a\\x00b",
    ),
    "NUL in /healthz": (b"GET /healthz\x00 HTTP/1.1\r\nHost: x\r\n\r\n", "control character"),
    "DEL in the target": (
        b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n",
        "control character in the request target: /a\\x7fb",
    ),
    "HTTP/1.0 upgrade": (
        b"GET / HTTP/1.0\r\nHost: x\r\n" + UPGRADE + b"\r\n",
        "a WebSocket upgrade needs HTTP/1.1, not HTTP/1.0",
    ),
    "a request line alone, no empty line": (b"GET /\r\n", "invalid HTTP request line: GET /"),
    "TLS to the plain port": (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        "a TLS handshake on a port without TLS",
    ),
    "a byte that is not ASCII in the target": (
        b"GET /a\xffb HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n",
        "a byte that is not ASCII in the request head (0xff)",
    ),
    "PROXY header, untrusted": (
        b"PROXY TCP4 198.51.100.1 192.0.2.1 1000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "PROXY protocol header where the HTTP request should be",
    ),
}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One server for every case: what one hostile request does must not touch the next."""
    started = Daemon("--log-level", "debug").ready()
    yield started
    started.kill()


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_gets_400_with_one_line_and_others_are_served(
    daemon: Daemon, case: str
) -> None:
    request, says = HOSTILE[case]
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as hostile:
        hostile.sendall(request)

        async def normal_client() -> None:
            async with connect(daemon.url) as ws:
                await ws.send("served meanwhile")
                assert await ws.recv() == "served meanwhile"

        asyncio.run(normal_client())
        answer = read_answer(hostile)  # up to the server's close: not left hanging
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"\r\nConnection: close" in head
    text = body.decode()
    assert text.startswith("bad request: ") and says in text, text
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), text  # printable: quoted safely
    assert "Traceback" not in daemon.log
    refusals = [e for e in daemon.events if e.get("event") == "handshake refused"]
    assert refusals and all(e["level"] == "debug" for e in refusals)


def test_a_long_request_line_is_quoted_short(daemon: Daemon) -> None:
    request = b"GET /" + b"a" * 5000 + b" HTTP/9.9\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(request)
        answer = read_answer(sock)
    body = answer.partition(b"\r\n\r\n")[2]
    assert answer.startswith(b"HTTP/1.1 400 ") and len(body) < 300, answer[:400]


def test_no_warning_for_any_of_them(daemon: Daemon) -> None:
    """Malformed requests are the client's doing: debug lines, never warnings."""
    for request, _ in HOSTILE.values():
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(request)
            assert read_answer(sock).startswith(b"HTTP/1.1 400 ")
    loud = [e for e in daemon.events if e.get("level") in ("warning", "error")]
    assert loud == []


def test_http_1_0_health_checks_are_answered(daemon: Daemon) -> None:
    """HTTP/1.0 is fine for plain requests (curl -0, old probes): only upgrades need 1.1."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8190 + b"\r\n" + UPGRADE + b"\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(130))
            + UPGRADE
            + b"\r\n",
            431,
        ),
    ],
)
def test_limits_of_the_head_get_their_status(
    daemon: Daemon, request_head: bytes, status: int
) -> None:
    """A request line beyond 8 KiB is 414 (RFC 9110 15.5.15); a header line beyond it, or
    more than 128 headers, 431 (RFC 6585 5): each with its one-line reason."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(request_head)
        answer = read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) < 300, body


@pytest.mark.parametrize(
    ("was", "now"),
    [
        (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: " + b"9" * 8000),
        (b"Upgrade: websocket", b"Upgrade: websocket, webso\x85ket"),
    ],
)
def test_upgrade_refusals_quote_the_clients_values_on_one_short_line(
    daemon: Daemon, was: bytes, now: bytes
) -> None:
    """The client's header values in a refused upgrade's reason are quoted as elsewhere:
    cut at 200 characters, and controls escaped (0x85 is NEL once read as ISO-8859-1: a
    line break to Python's splitlines, and to some clients)."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\n" + UPGRADE.replace(was, now) + b"\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(request)
        answer = read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    text = body.decode("latin-1")
    assert len(text.splitlines()) == 1 and text.endswith("\n") and len(text) < 300, text
