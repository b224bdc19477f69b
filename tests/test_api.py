"""The relay's HTTP API: POST /publish/<channel> from a backend, with an API key or a
token, to members on two instances through a real Redis. Clients: Python's http.client
(as a backend would use it) and raw sockets (to send what a client library would not)."""

import asyncio
import hmac
import http.client
import json
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests import rawws
from tests.conftest import Daemon, run_cli
from tests.credentials import KEY, SECRET, bearer, token
from tests.redisd import RedisServer
from tests.test_relay import subscribed
from wsechod.auth import apikeys


def post(
    port: int, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        text = response.read().decode()
        headers = dict(response.getheaders())
        if headers["Content-Type"] != "application/json":  # the engine's own, plain text
            return response.status, {"error": text.strip()}, headers
        return response.status, json.loads(text), headers
    finally:
        conn.close()


def relay_with_api(start: Callable[..., Daemon], key_file: Path, *args: str) -> Daemon:
    return start("--mode", "relay", "--api-key-file", str(key_file), "--log-level", "debug", *args)


def test_a_backend_publishes_to_members_on_two_instances(
    start: Callable[..., Daemon], key_file: Path, redis_server: RedisServer
) -> None:
    one = relay_with_api(start, key_file, "--broker", redis_server.url)
    two = relay_with_api(start, key_file, "--broker", redis_server.url)

    async def main() -> tuple[list[str | bytes], list[str | bytes], list[int]]:
        since = len(one.events), len(two.events)
        async with (
            connect(f"{one.url}/news") as a,
            connect(f"{one.url}/news") as b,
            connect(f"{two.url}/news") as c,
        ):
            await asyncio.to_thread(subscribed, one, "/news", since[0])
            await asyncio.to_thread(subscribed, two, "/news", since[1])
            answers = []
            for body, kind in ((b"hello", "text/plain; charset=utf-8"), (b"\x00\x01", None)):
                headers = {"X-API-Key": KEY}
                if kind:
                    headers["Content-Type"] = kind
                status, document, _ = await asyncio.to_thread(
                    post, one.port, "/publish/news", body, headers
                )
                assert status == 202, document
                assert document["channel"] == "/news"
                answers.append(int(str(document["delivered_here"])))
            got_a = [await asyncio.wait_for(a.recv(), 10) for _ in range(2)]
            got_c = [await asyncio.wait_for(c.recv(), 10) for _ in range(2)]
            assert [await asyncio.wait_for(b.recv(), 10) for _ in range(2)] == got_a
            return got_a, got_c, answers

    got_here, got_there, answers = asyncio.run(main())
    assert got_here == got_there == ["hello", b"\x00\x01"]  # text stays text, binary binary
    assert answers == [2, 2]  # the members on this instance; the other's got it too
    status, document, _ = post(two.port, "/publish/nobody", b"x", {"X-API-Key": "L" * 32})
    assert (status, document["delivered_here"]) == (202, 0)  # any valid name: 202


NOT_HEX = "invalid channel name: '%' not followed by two hexadecimal digits"
NOT_UTF8 = "a text body (by its Content-Type) that is not UTF-8, at byte 0"
TEXT = {"X-API-Key": KEY, "Content-Type": "text/plain"}
REFUSALS = {
    "no key": ("/publish/r", {}, b"x", 401, "unauthorized: missing API key or token"),
    "bad key": ("/publish/r", {"X-API-Key": "nope"}, b"x", 401, "unauthorized: invalid API key"),
    "bad name": ("/publish/r%zz", {"X-API-Key": KEY}, b"x", 400, NOT_HEX),
    "ours": ("/publish/healthz", {"X-API-Key": KEY}, b"x", 400,
             "invalid channel name: /healthz is the server's own"),
    "too big": ("/publish/r", {"X-API-Key": KEY}, b"x" * 2000, 413,
                "request body over 1024 bytes"),
    "not utf-8": ("/publish/r", TEXT, b"\xff", 400, NOT_UTF8),
    "long name": ("/publish/" + "r" * 300, {"X-API-Key": KEY}, b"x", 414, "channel name too long"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_publishes_get_their_status_and_one_line(
    start: Callable[..., Daemon], key_file: Path, case: str
) -> None:
    path, headers, body, status, error = REFUSALS[case]
    daemon = relay_with_api(start, key_file, "--max-size", "1024")
    got, document, _ = post(daemon.port, path, body, headers)
    assert (got, document["error"]) == (status, error)


def test_a_body_over_the_limit_is_refused_before_it_is_sent(
    start: Callable[..., Daemon], key_file: Path
) -> None:
    """curl's way: Expect: 100-continue. A Content-Length over max_size gets 413 and never
    100 Continue; one within gets 100 Continue, then 202. Chunked bodies, too."""
    daemon = relay_with_api(start, key_file, "--max-size", "1024")
    head = (
        f"POST /publish/r HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        "Expect: 100-continue\r\nContent-Length: {n}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(head.replace("{n}", "5000").encode())
        answer = rawws.until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(head.replace("{n}", "5").encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert rawws.until_eof(sock).startswith(b"HTTP/1.1 202 ")
    chunked = (
        f"POST /publish/r HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(chunked + b"400\r\n" + b"x" * 1024 + b"\r\n400\r\n" + b"x" * 1024 + b"\r\n")
        assert rawws.until_eof(sock).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(chunked + b"5\r\nhello\r\n0\r\n\r\n")
        assert rawws.until_eof(sock).startswith(b"HTTP/1.1 202 ")


def test_length_and_chunking_together_are_refused(
    start: Callable[..., Daemon], key_file: Path
) -> None:
    """The shape of request smuggling (RFC 9112 6.3), which h11 itself would accept."""
    daemon = relay_with_api(start, key_file)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(
            f"POST /publish/r HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode()
        )
        answer = rawws.until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"both Content-Length and Transfer-Encoding" in answer


def test_a_token_with_the_publish_right_may_publish_and_one_without_may_not(
    start: Callable[..., Daemon], key_file: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    daemon = relay_with_api(start, key_file, "--auth", "jwt", "--jwt-secret-file", str(secret))
    backend = token("backend", publish=["/alerts/**"])
    status, document, _ = post(daemon.port, "/publish/alerts/fire", b"!", bearer(backend))
    assert status == 202, document
    status, document, _ = post(daemon.port, "/publish/chat", b"!", bearer(backend))
    assert (status, document["error"]) == (403, "forbidden: no right to publish here")
    status, document, headers = post(daemon.port, "/publish/chat", b"!", bearer("bad"))
    assert (status, document["error"]) == (401, "unauthorized: invalid token")
    assert headers["WWW-Authenticate"].startswith("Bearer")


def test_the_api_is_only_where_its_role_is_and_not_in_echo_mode(
    start: Callable[..., Daemon], key_file: Path
) -> None:
    daemon = relay_with_api(
        start, key_file, "--listen", "127.0.0.1:0 public ops", "--listen", "127.0.0.1:0 api"
    )
    public, internal = (int(a.rsplit(":", 1)[1]) for a in daemon.wait_for("listening")["addresses"])
    status, document, _ = post(public, "/publish/r", b"x", {"X-API-Key": KEY})
    assert status == 404
    assert "api role" in str(document["error"])
    assert post(internal, "/publish/r", b"x", {"X-API-Key": KEY})[0] == 202
    echo = start("--api-key-file", str(key_file))
    status, document, _ = post(echo.port, "/publish/r", b"x", {"X-API-Key": KEY})
    assert (status, document["error"]) == (404, "not found: no channels in echo mode")


def test_publishing_while_draining_is_503(start: Callable[..., Daemon], key_file: Path) -> None:
    daemon = relay_with_api(start, key_file, "--drain-timeout", "10")
    sock = rawws.connect(daemon.port, "/r")  # never answers the close: the drain lasts
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stop requested")
    status, document, headers = post(daemon.port, "/publish/r", b"x", {"X-API-Key": KEY})
    assert (status, document["error"]) == (503, "server is shutting down")
    assert headers["Retry-After"] == "1"
    sock.close()


def test_every_key_is_compared_in_constant_time() -> None:
    """hmac.compare_digest on the digests, against every key on file, whatever matches
    (no early exit): read in the code, not timed on a busy machine."""
    keys = (apikeys.ApiKey("a", b"\x01" * 32), apikeys.ApiKey("b", b"\x02" * 32))
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hmac, "compare_digest", counting)  # the module apikeys calls
        assert apikeys.match(keys, "anything") is None
        assert len(calls) == len(keys)
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_api_key_file_is_checked_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("alone\n")
    result = run_cli("--mode", "relay", "--api-key-file", str(bad), "--check-config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"invalid api_key_file '{bad}'" in result.stderr
    assert "line 1" in result.stderr
    short = tmp_path / "short"
    short.write_text("name tooshort\n")
    result = run_cli("--mode", "relay", "--api-key-file", str(short), "--check-config")
    assert result.returncode == 2
    assert "at least 16 bytes" in result.stderr


def test_a_good_key_is_never_rate_limited_by_its_address(
    start: Callable[..., Daemon], key_file: Path, secret_file: Path
) -> None:
    """Handshakes from an address spend its handshake_rate; a backend behind the same
    address (a NAT, a proxy) still publishes with its key; a wrong key is limited."""
    daemon = relay_with_api(
        start, key_file, "--auth", "jwt", "--jwt-secret-file", str(secret_file),
        "--handshake-rate", "1",
    )  # fmt: skip
    statuses = [
        raw_status(daemon.port, rawws.handshake_request(daemon.port, "/room")) for _ in range(6)
    ]
    assert statuses.count(429) >= 3, statuses  # a burst of 2, then 429
    assert post(daemon.port, "/publish/room", b"x", {"X-API-Key": KEY})[0] == 202
    assert post(daemon.port, "/publish/room", b"x", {"X-API-Key": "wrong" * 8})[0] == 429


def raw_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_unfinished_bodies_take_a_share_of_memory_limit_and_close_no_websocket(
    start: Callable[..., Daemon], key_file: Path
) -> None:
    """Found by a hostile run: bodies sent but never finished counted in memory_limit and
    got WebSockets closed with 1013. Bodies now have a quarter of it: past that, 503."""
    daemon = relay_with_api(start, key_file, "--memory-limit", "8388608")  # bodies: 2 MiB
    head = (
        f"POST /publish/room HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).encode()

    async def main() -> list[bytes]:
        async with connect(f"{daemon.url}/room") as victim, connect(f"{daemon.url}/room") as peer:
            socks = []
            answers = []
            for _ in range(6):
                sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
                socks.append(sock)
                sock.sendall(head + b"x" * 900_000)  # never finished
                await asyncio.sleep(0.05)
            for sock in socks:
                sock.settimeout(0.5)
                try:
                    answers.append(sock.recv(4096))
                except TimeoutError:
                    answers.append(b"")  # still reading: within the share
            await victim.send(b"v" * 600_000)
            assert await asyncio.wait_for(peer.recv(), 10) == b"v" * 600_000
            for sock in socks:
                sock.close()
            return answers

    answers = asyncio.run(main())
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert refused and all(b"short of memory" in a for a in refused), answers
    assert sum(1 for a in answers if not a) <= 2, answers  # 2 MiB hold two of them
    assert "memory limit reached" not in daemon.log
