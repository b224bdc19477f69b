"""The test peer's controls (echo mode, ``--controls``): each control through a raw socket
where a client library would hide the frames, or websockets' client where it shows what a
client sees; bad controls get 400 naming them; without ``--controls`` the query string is
ignored."""

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests import rawws
from tests.conftest import Daemon, rss_kib
from tests.test_echo import http_get
from wsechod.apps.peer import VIOLATIONS


@pytest.fixture
def peer(start: Callable[..., Daemon]) -> Daemon:
    return start("--controls", "--close-timeout", "1")


def upgrade(port: int, path: str, *extra: str) -> tuple[int, dict[str, str], str]:
    """An upgrade request's answer when it is not a 101: status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
        for line in extra:
            name, _, value = line.partition(": ")
            headers[name] = value
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_without_controls_the_query_string_is_ignored(start: Callable[..., Daemon]) -> None:
    daemon = start()

    async def main() -> str:
        async with connect(f"{daemon.url}/?close=4000&delay=oops&status=503") as ws:
            await ws.send("plain")
            return str(await ws.recv())

    assert asyncio.run(main()) == "plain"


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("close=999", "control close='999': out of range"),
        ("close=1005", "control close='1005': not a code an endpoint may send"),
        ("close=1000&reason=" + "%C3%A9" * 62, "control reason="),
        ("reason=x", "control reason='x': goes with close="),
        ("after=2", "control after='2': goes with close= or violate="),
        ("close=4000&drop=1", "control drop='1': one ending at a time"),
        ("delay=60001", "control delay='60001': out of range: 0 to 60000"),
        ("delay=1.5", "control delay='1.5': expected a whole number"),
        ("delay=1&delay=2", "control delay='2': given twice"),
        ("ping=0.05", "control ping='0.05': out of range: 0.1 to 60"),
        ("throttle=100", "control throttle='100': out of range"),
        ("status=200", "control status='200': out of range: 300 to 599"),
        ("status=599", "control status='599': not a registered HTTP status"),
        ("status=302&location=javascript:x", "control location="),
        ("status=302&location=http://a%20b/", "control location='http://a b/'"),
        ("fragment=1", "control fragment='1': out of range: 16 to 1048576"),
        ("send=1000001", "control send='1000001': out of range: 1 to 1000000"),
        ("status=401&www_authenticate=a%0d%0ab", "control www_authenticate="),
        ("violate=everything", "control violate='everything': expected one of utf8"),
        ("drop=1&how=slow", "control how='slow': expected rst or fin"),
        ("send=10&size=2000000", "control size='2000000': out of range"),
        ("send=100000&size=1000", "control send='100000': send x size over"),
        ("send=1&rate=20000", "control rate='20000': out of range"),
        ("send=1&type=json", "control type='json': expected text or binary"),
        ("no_pong=0", "control no_pong='0': expected 1"),
        ("compress=2", "control compress='2': expected 0 or 1"),
        ("subprotocol=a%20b", "control subprotocol='a b': expected a token"),
        ("subprotocol=chat", "control subprotocol='chat': not offered"),
    ],
)
def test_a_bad_control_is_a_400_naming_it(peer: Daemon, query: str, why: str) -> None:
    status, _, body = upgrade(peer.port, f"/?{query}")
    assert (status, body.startswith(f"bad request: {why}")) == (400, True), body
    assert len(body.splitlines()) == 1


def test_status_refuses_the_handshake_with_its_headers(peer: Daemon) -> None:
    status, headers, body = upgrade(peer.port, "/?status=503&retry_after=7&cache=busted")
    assert (status, headers["Retry-After"]) == (503, "7")
    assert body == "503 Service Unavailable: as the status control asked\n"
    status, headers, _ = upgrade(peer.port, "/?status=307&location=wss://other.example/x")
    assert (status, headers["Location"]) == (307, "wss://other.example/x")
    status, headers, _ = upgrade(peer.port, '/?status=401&www_authenticate=Bearer%20realm="t"')
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="t"')
    status, headers, _ = upgrade(peer.port, "/?status=401")  # what a 401 requires
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="wsechod"')
    status, _, body = upgrade(peer.port, "/?status=304")
    assert (status, body) == (304, "")


def test_accept_delay_and_delay_hold_the_answers_back_in_order(peer: Daemon) -> None:
    async def main() -> tuple[float, float, list[str]]:
        began = time.monotonic()
        async with connect(f"{peer.url}/?accept_delay=300&delay=200") as ws:
            opened = time.monotonic()
            for word in ("one", "two", "three"):
                await ws.send(word)
            sent = time.monotonic()
            got = [str(await ws.recv()) for _ in range(3)]
            return opened - began, time.monotonic() - sent, got

    accepted, echoed, got = asyncio.run(main())
    assert accepted >= 0.3 and echoed >= 0.2 - 0.01
    assert got == ["one", "two", "three"]


def test_subprotocol_selects_what_the_client_offered(peer: Daemon) -> None:
    async def main() -> str | None:
        offers = [Subprotocol("soap"), Subprotocol("chat")]
        async with connect(f"{peer.url}/?subprotocol=chat", subprotocols=offers) as ws:
            return ws.subprotocol

    assert asyncio.run(main()) == "chat"


def test_fragment_cuts_each_echo_into_continuation_frames(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?fragment=16") as sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"0123456789" * 4)
        got = [rawws.read_frame_fin(sock) for _ in range(3)]
    assert got == [
        (rawws.OP_TEXT, False, b"0123456789012345"),
        (rawws.OP_CONT, False, b"6789012345678901"),
        (rawws.OP_CONT, True, b"23456789"),
    ]


def test_close_after_n_messages_with_a_code_and_reason(peer: Daemon) -> None:
    async def main() -> tuple[list[str], int, str]:
        async with connect(f"{peer.url}/?close=4000&reason=bye&after=2") as ws:
            await ws.send("a")
            await ws.send("b")
            got = [str(await ws.recv()) for _ in range(2)]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            return got, closed.value.rcvd.code, closed.value.rcvd.reason

    assert asyncio.run(main()) == (["a", "b"], 4000, "bye")
    with rawws.connect(peer.port, "/?close=1011") as sock:  # after=0: at once
        assert rawws.read_close(sock) == (1011, "")


def test_drop_ends_tcp_with_a_reset_or_a_fin_and_no_close_frame(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?drop=1&how=rst") as sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"last")
        got = b""
        with pytest.raises(ConnectionResetError):  # the reset may discard the echo unread
            while chunk := sock.recv(65536):
                got += chunk
        assert rawws.frame(rawws.OP_TEXT, b"last", masked=False).startswith(got)
    with rawws.connect(peer.port, "/?drop=1&how=fin") as sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"last")
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"last")
        assert rawws.until_eof(sock) == b""  # a FIN, nothing before it


@pytest.mark.parametrize("kind", sorted(VIOLATIONS))
def test_violate_sends_exactly_that_violation(peer: Daemon, kind: str) -> None:
    with rawws.connect(peer.port, f"/?violate={kind}&after=1") as sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"ok")
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"ok")
        wanted = VIOLATIONS[kind]
        got = b""
        while len(got) < len(wanted):
            got += sock.recv(len(wanted) - len(got))
        assert got == wanted


@pytest.mark.parametrize(("kind", "code"), [("utf8", 1007), ("opcode", 1002), ("masked", 1002)])
def test_a_client_library_fails_the_connection_on_a_violation(
    peer: Daemon, kind: str, code: int
) -> None:
    async def main() -> int:
        async with connect(f"{peer.url}/?violate={kind}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.sent is not None
            return closed.value.sent.code

    assert asyncio.run(main()) == code


def test_no_close_reply_leaves_the_clients_close_unanswered(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?no_close_reply=1") as sock:
        rawws.send_frame(sock, rawws.OP_CLOSE, rawws.close_payload(1000))
        began = time.monotonic()
        assert rawws.until_eof(sock) == b""  # no close frame: dropped at close_timeout (1 s)
        assert time.monotonic() - began >= 0.9


def test_the_server_pings_with_a_counter_and_no_pong_answers_none(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?ping=0.1") as sock:
        assert rawws.read_frame(sock) == (rawws.OP_PING, b"1")
        assert rawws.read_frame(sock) == (rawws.OP_PING, b"2")
    with rawws.connect(peer.port, "/?no_pong=1") as sock:
        sock.sendall(rawws.frame(rawws.OP_PING, b"hi") + rawws.frame(rawws.OP_TEXT, b"after"))
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"after")  # no pong before it


def test_send_streams_numbered_messages_of_a_size_and_type(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?send=3&size=6&type=binary") as sock:
        got = [rawws.read_frame(sock) for _ in range(3)]
    assert got == [(rawws.OP_BINARY, b"1 \0\0\0\0"), (rawws.OP_BINARY, b"2 \0\0\0\0"),
                   (rawws.OP_BINARY, b"3 \0\0\0\0")]  # fmt: skip

    async def main() -> float:
        async with connect(f"{peer.url}/?send=20&rate=100") as ws:
            began = time.monotonic()
            got = [str(await ws.recv()) for _ in range(20)]
            assert got == [f"{n} " + "x" * (15 - len(str(n))) for n in range(1, 21)]  # 16 B
            return time.monotonic() - began

    assert asyncio.run(main()) >= 0.15  # 20 at 100 a second: 0.19 s after the first


def test_throttle_paces_the_echos_bytes(peer: Daemon) -> None:
    with rawws.connect(peer.port, "/?throttle=10240") as sock:
        began = time.monotonic()
        rawws.send_frame(sock, rawws.OP_BINARY, b"z" * 16384)
        assert rawws.read_frame_fin(sock) == (rawws.OP_BINARY, True, b"z" * 16384)  # one frame
        took = time.monotonic() - began
    assert took >= 1.4  # 16 KiB at 10 KiB/s, the first 1 KiB at once


@pytest.mark.timeout(120)
def test_a_throttled_echo_stops_reading_past_write_limit(peer: Daemon) -> None:
    """100 clients send 1 MiB each to be echoed at 1 KiB/s and read nothing: the server
    holds write_limit and a frame per connection, not their megabyte."""
    assert peer.proc is not None
    before = rss_kib(peer.proc.pid)
    frames = rawws.frame(rawws.OP_BINARY, b"t" * 16384) * 64
    socks = [rawws.connect(peer.port, "/?throttle=1024") for _ in range(100)]
    try:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            flood(sock, frames)
        grown = wait_settled(peer.proc.pid) - before
        bound = 100 * (32 + 16 + 256)  # KiB: write_limit, a frame, one read
        assert grown < bound, (grown, bound)  # without it: 100 MiB
    finally:
        for sock in socks:
            sock.close()


def test_headers_sends_the_request_first_and_compress_0_refuses_deflate(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--controls", "--compression", "deflate")

    async def main() -> tuple[dict[str, Any], str | None]:
        async with connect(f"{daemon.url}/x?headers=1&compress=0", user_agent_header="t/1") as ws:
            first = json.loads(await ws.recv())
            assert ws.response is not None
            return first, ws.response.headers.get("Sec-WebSocket-Extensions")

    first, negotiated = asyncio.run(main())
    assert negotiated is None
    assert first["request"] == "GET /x?headers=1&compress=0 HTTP/1.1"
    assert ["User-Agent", "t/1"] in first["headers"]
    assert first["extensions"] == "" and first["subprotocol"] is None
    assert str(first["peer"]).startswith("127.0.0.1:")

    async def deflated() -> dict[str, object]:
        async with connect(f"{daemon.url}/?headers=1") as ws:
            return dict(json.loads(await ws.recv()))

    assert str(asyncio.run(deflated())["extensions"]).startswith("permessage-deflate")


def test_the_clients_close_reason_is_echoed(start: Callable[..., Daemon]) -> None:
    daemon = start()  # in every mode: RFC 6455 5.5.1
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, rawws.OP_CLOSE, rawws.close_payload(4001, b"why"))
        assert rawws.read_close(sock) == (4001, "why")


@pytest.mark.timeout(60)
def test_a_drain_drops_delayed_echoes_and_closes_at_once(peer: Daemon) -> None:
    """1,000 clients with an echo a minute away: every one gets 1001 at once, and the
    process exits well within drain_timeout (10 s)."""
    assert asyncio.run(stopped(peer, "/?delay=60000", 1000, send="later")) == [1001] * 1000
    assert peer.wait(10) == 0


async def stopped(daemon: Daemon, path: str, count: int, send: str = "") -> list[int]:
    """Open ``count`` clients on ``path`` (each sending ``send``), SIGTERM the server:
    the close code each then gets."""
    conns = [await connect(f"{daemon.url}{path}") for _ in range(count)]
    for ws in conns:
        if send:
            await ws.send(send)
    daemon.signal(signal.SIGTERM)
    codes = []
    for ws in conns:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        codes.append(closed.value.rcvd.code)
    return codes


def flood(sock: socket.socket, data: bytes) -> int:
    """Send what the kernel takes at once, without blocking: the bytes sent."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            sent += sock.send(data[sent:])
    return sent


@pytest.mark.timeout(120)
def test_delayed_echoes_and_unread_streams_stay_within_their_bound(peer: Daemon) -> None:
    """1,000 connections: 500 clients each sending 1 MiB to be echoed a minute later, then
    500 that never read a stream of 1,000 messages of 64 KiB: the server holds at most 64
    KiB plus a frame of delayed echoes per connection (it stops reading the rest, beyond
    its one read of 256 KiB), and a stream goes no further than what the client reads
    (write_limit)."""
    assert peer.proc is not None
    before = rss_kib(peer.proc.pid)
    frames = rawws.frame(rawws.OP_BINARY, b"d" * 16384) * 64  # 1 MiB in 16 KiB frames
    delayed = [rawws.connect(peer.port, "/?delay=60000") for _ in range(500)]
    streams: list[socket.socket] = []
    try:
        for sock in delayed:
            flood(sock, frames)
        streams = [rawws.connect(peer.port, "/?send=1000&size=65536") for _ in range(500)]
        for sock in streams:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        grown = wait_settled(peer.proc.pid) - before
        # Without the bounds: 500 x 1 MiB held and 500 x 64 MiB made (500 MiB and up).
        held = 500 * (64 + 16 + 256)  # KiB: waiting echoes, a frame, one read
        bound = held + 500 * (32 + 64 + 64)  # and write_limit, a message being made
        assert grown < bound, (grown, bound)
    finally:
        for sock in delayed + streams:
            sock.close()


def wait_settled(pid: int, timeout: float = 20) -> int:
    """RSS (KiB) once it stops growing (two readings 0.5 s apart within 1%)."""
    deadline = time.monotonic() + timeout
    last = rss_kib(pid)
    while True:
        time.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= last // 100 or time.monotonic() > deadline:
            return now
        last = now


def test_require_subprotocol_refuses_only_offers_that_are_none_of_ours(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--subprotocols", "chat", "--require-subprotocol")
    offered = "Sec-WebSocket-Protocol: soap, mqtt"
    status, _, body = upgrade(daemon.port, "/", offered)
    assert (status, body) == (
        400,
        "bad request: no subprotocol offered is served here (soap, mqtt)\n",
    )

    async def main() -> list[Subprotocol | None]:
        chosen = []
        async with connect(
            daemon.url, subprotocols=[Subprotocol("mqtt"), Subprotocol("chat")]
        ) as ws:
            chosen.append(ws.subprotocol)
        async with connect(daemon.url) as ws:  # none offered: none chosen, served
            chosen.append(ws.subprotocol)
        return chosen

    assert asyncio.run(main()) == ["chat", None]


def test_empty_messages_waiting_out_a_delay_are_bounded_too(peer: Daemon) -> None:
    """Each waiting echo counts its own cost, not only its payload: a flood of empty
    messages to a delayed echo pauses the client like a flood of big ones."""
    assert peer.proc is not None
    before = rss_kib(peer.proc.pid)
    with rawws.connect(peer.port, "/?delay=60000") as sock:
        empty = rawws.frame(rawws.OP_BINARY, b"") * 65536  # 384 KiB, 65,536 messages
        for _ in range(8):
            flood(sock, empty)
        grown = wait_settled(peer.proc.pid) - before
    assert grown < 16 * 1024, grown  # KiB; unbounded, 500,000 waiting echoes: 50 MiB


def test_a_fast_stream_lets_the_server_serve_others(peer: Daemon) -> None:
    """A send stream to a client that keeps up goes in batches: another client's echo is
    answered long before the stream ends."""
    total = 300_000
    received = 0
    done = threading.Event()

    def reader(sock: socket.socket) -> None:
        nonlocal received
        while received < total:
            opcode, _ = rawws.read_frame(sock)
            received += opcode == rawws.OP_TEXT
        done.set()

    with rawws.connect(peer.port, f"/?send={total}&size=0", timeout=60) as streamed:
        thread = threading.Thread(target=reader, args=(streamed,), daemon=True)
        thread.start()
        with rawws.connect(peer.port) as other:
            rawws.send_frame(other, rawws.OP_TEXT, b"me too")
            assert rawws.read_frame(other) == (rawws.OP_TEXT, b"me too")
            at_echo = received
        assert done.wait(60)
    assert at_echo < total // 2, at_echo


def test_accept_delay_counts_in_max_connections_and_the_drain_answers_503(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--controls", "--max-connections", "3")

    def attempt() -> int:
        try:
            with rawws.connect(daemon.port, "/?accept_delay=1500"):
                return 101
        except ConnectionError as exc:
            return 503 if " 503 " in str(exc) else 0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(lambda _: attempt(), range(8)))
    assert statuses == [101] * 3 + [503] * 5, statuses

    waiting = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(3)]
    for sock in waiting:
        rawws.send_handshake(sock, daemon.port, "/?accept_delay=60000")
    until_upgrading(daemon, 3)
    daemon.signal(signal.SIGTERM)
    for sock in waiting:
        with sock:
            sock.settimeout(10)
            assert rawws.until_eof(sock).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert daemon.wait(10) == 0


def until_upgrading(daemon: Daemon, count: int, timeout: float = 10) -> None:
    """Wait until ``count`` handshakes are open on the server (its metrics say so, the
    request for them one more)."""
    deadline = time.monotonic() + timeout
    line = f"wsechod_handshakes_pending {count + 1}.0"
    while line not in http_get(daemon.port, "/metrics")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_clients_that_answer_the_drains_close_let_no_close_reply_go_at_once(
    start: Callable[..., Daemon],
) -> None:
    """no_close_reply leaves the client's own close unanswered; the client's answer to the
    server's close completes the closing handshake like any other."""
    daemon = start("--controls", "--close-timeout", "30", "--drain-timeout", "8")

    assert asyncio.run(stopped(daemon, "/?no_close_reply=1", 5)) == [1001] * 5
    assert daemon.wait(10) == 0
    assert daemon.wait_for("drained")["force_closed"] == 0


def test_a_drop_with_a_fin_to_a_client_that_does_not_read_ends_at_close_timeout(
    peer: Daemon,
) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", peer.port))
    with sock:
        rawws.send_handshake(sock, peer.port, "/?send=8&size=1048576&drop=0&how=fin")
        rawws.read_handshake(sock)
        deadline = time.monotonic() + 15  # close_timeout is 1 s here
        while "wsechod_connections_open 0.0" not in http_get(peer.port, "/metrics")[1]:
            assert time.monotonic() < deadline, "the dropped connection stayed"
            time.sleep(0.2)
