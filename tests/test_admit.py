"""Who is admitted before the upgrade: allowed origins (403), the per-address limit (503 with
Retry-After), and the real client behind trusted proxies (X-Forwarded-For, PROXY protocol),
each live-reloadable."""

import asyncio
import ipaddress
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests import rawws
from tests.conftest import Daemon, run_cli
from wsechod.engine import proxy
from wsechod.http import origins

V2 = proxy.V2_SIGNATURE


def status_of(error: InvalidStatus) -> tuple[int, str, dict[str, str]]:
    response = error.value.response if isinstance(error, pytest.ExceptionInfo) else error.response
    return response.status_code, response.body.decode(), dict(response.headers.raw_items())


async def refused(url: str, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    return status_of(info.value)


async def echo(ws: ClientConnection, message: str = "hello") -> None:
    await ws.send(message)
    assert await ws.recv() == message


def reload(daemon: Daemon, path: Path, text: str, key: str) -> None:
    path.write_text(text)
    since = len(daemon.events)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(
        "setting changed", where=lambda e: daemon.events.index(e) >= since and e["key"] == key
    )


def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes or has sent a whole 101 head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or answer.startswith(b"HTTP/1.1 4"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


# --- origins -----------------------------------------------------------------------------


def test_origins_exact_and_wildcard_are_admitted_others_get_403(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text('allowed_origins = ["https://app.example.com", "*.example.org"]\n')
    daemon = start("--config", str(path))

    async def main() -> None:
        for origin in (
            "https://app.example.com",
            "http://a.b.example.org",
            "https://x.example.org",
        ):
            async with connect(daemon.url, origin=origin) as ws:  # type: ignore[arg-type]
                await echo(ws)
        async with connect(daemon.url) as ws:  # no Origin: not a browser, admitted
            await echo(ws)
        for origin in (
            "https://evil.example.com",
            "http://app.example.com",  # another scheme
            "https://app.example.com:8443",  # another port
            "https://example.org",  # the wildcard is for subdomains only
            "https://example.org.evil.net",
        ):
            status, body, _ = await refused(daemon.url, origin=origin)
            assert (status, body) == (403, "origin not allowed\n"), origin

    asyncio.run(main())
    refusal = daemon.wait_for("connection refused", where=lambda e: e["reason"] == "origin")
    assert refusal["level"] == "warning" and refusal["origin"] == "https://evil.example.com"
    # /healthz is not a WebSocket: no origin check.
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example.com\r\n\r\n"
    assert raw_request(daemon.port, request).startswith(b"HTTP/1.1 200 ")


def test_require_origin_and_origins_change_on_reload(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text("require_origin = true\n")
    daemon = start("--config", str(path))

    async def before() -> None:
        status, body, _ = await refused(daemon.url)
        assert (status, body) == (403, "an Origin header is required\n")
        async with connect(daemon.url, origin="https://any.example") as ws:  # type: ignore[arg-type]
            await echo(ws)

    asyncio.run(before())
    reload(daemon, path, 'allowed_origins = ["https://app.example.com"]\n', "allowed_origins")

    async def after() -> None:
        async with connect(daemon.url) as ws:  # require_origin is back to false
            await echo(ws)
        status, _, _ = await refused(daemon.url, origin="https://any.example")
        assert status == 403

    asyncio.run(after())


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("https://app.example.com/", "without path"),
        ("app_1.example.com", "invalid host"),
        ("https://*", "invalid host"),
        ("https://app.example.com:99999", "between 1 and 65535"),
        ("https://bücher.example", "punycode"),
        ("https://*.com", "*.com covers a public suffix"),
        ("*.co.uk", "*.co.uk covers a public suffix"),
        ("https://*.github.io", "covers a public suffix"),  # the list's private section
        ("*.xn--fiqs8s", "covers a public suffix"),  # an IDN top-level domain
    ],
)
def test_invalid_origin_entries_are_one_line_and_exit_2(entry: str, says: str) -> None:
    result = run_cli(
        "--config", "", "--check-config", "--allowed-origins", f"https://ok.example,{entry}"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsechod: error: invalid allowed_origins")
    assert (
        f"entry {entry!r}" in lines[0]
        and says in lines[0]
        and "(from --allowed-origins)" in lines[0]
    )


def test_wildcards_under_a_registrable_domain_or_localhost_are_fine() -> None:
    entries = ("https://*.example.co.uk", "*.app.github.io", "http://*.localhost:3000")
    for entry in (*entries, "https://*.internal", "*.lan", "*.test"):  # private-use names
        result = run_cli("--config", "", "--check-config", "--allowed-origins", entry)
        assert result.returncode == 0, result.stderr


@pytest.mark.unit
def test_origin_matching() -> None:
    entries = tuple(
        origins.check(e)
        for e in ("HTTPS://App.Example.com:443", "*.example.org", "http://[::1]:3000", "null")
    )
    assert entries == ("https://app.example.com", "*.example.org", "http://[::1]:3000", "null")
    yes = ["https://app.example.com", "https://APP.example.com:443", "ws://a.example.org"]
    no = ["https://app.example.com:444", "https://example.org", "http://[::1]", "garbage"]
    assert all(origins.allowed(o, entries) for o in [*yes, "http://[::1]:3000", "null"])
    assert not any(origins.allowed(o, entries) for o in no)
    assert origins.allowed("https://whatever.test", ("*",))
    assert not origins.allowed("null", ("*.example.org",))


# --- per-address limit -------------------------------------------------------------------


def test_per_address_limit_refuses_with_503_and_retry_after_and_spares_open_ones(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text("max_connections_per_ip = 2\n")
    daemon = start("--config", str(path))

    async def main() -> None:
        async with connect(daemon.url) as one, connect(daemon.url) as two:
            status, body, headers = await refused(daemon.url)
            assert (status, body) == (503, "too many connections from your address\n")
            assert headers["Retry-After"] == "5"
            await echo(one)  # the open ones are untouched
            await echo(two)
        # Both closed: the address may connect again (once the server has seen the closes).
        for _ in range(100):
            try:
                async with connect(daemon.url) as again, connect(daemon.url) as other:
                    await echo(again)
                    await echo(other)
                    break
            except InvalidStatus:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the address stayed refused after its connections closed")
        reload(daemon, path, "max_connections_per_ip = 3\n", "max_connections_per_ip")
        async with connect(daemon.url), connect(daemon.url), connect(daemon.url) as third:
            await echo(third)  # the new limit, at once
            assert (await refused(daemon.url))[0] == 503

    asyncio.run(main())
    refusal = daemon.wait_for(
        "connection refused", where=lambda e: e["reason"] == "max_connections_per_ip"
    )
    assert (refusal["client"], refusal["level"]) == ("127.0.0.1", "warning")


# --- behind a proxy ----------------------------------------------------------------------


def upgrade(port: int, *headers: str) -> bytes:
    """An upgrade request with extra header lines."""
    request = rawws.handshake_request(port).decode()
    return (request[:-2] + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


def opened_peer(daemon: Daemon, port: int, data: bytes) -> str:
    """Open a connection with ``data`` (head included), and the peer the server logged."""
    since = len(daemon.events)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        rawws.read_handshake(sock)
        event = daemon.wait_for("connection open", where=lambda e: daemon.events.index(e) >= since)
        rawws.send_frame(sock, rawws.OP_TEXT, b"behind a proxy")
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"behind a proxy")
    return str(event["peer"])


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(
    start: Callable[..., Daemon],
) -> None:
    daemon = start(
        "--trusted-proxies",
        "127.0.0.1,10.0.0.0/8",
        "--log-level",
        "debug",
        "--max-connections-per-ip",
        "1",
    )
    port = daemon.port
    assert opened_peer(daemon, port, upgrade(port, "X-Forwarded-For: 203.0.113.7")) == "203.0.113.7"
    # Left of the right-most untrusted address is the client's own say: ignored.
    spoofed = upgrade(port, "X-Forwarded-For: 1.1.1.1, 203.0.113.8, 10.1.2.3")
    assert opened_peer(daemon, port, spoofed) == "203.0.113.8"
    split = upgrade(port, "X-Forwarded-For: 198.51.100.1", "X-Forwarded-For: 10.0.0.9")
    assert opened_peer(daemon, port, split) == "198.51.100.1"
    assert opened_peer(daemon, port, upgrade(port, "X-Forwarded-For: unknown")).startswith(
        "127.0.0.1:"
    )

    # The per-address limit counts the real client: one each.
    async def main() -> None:
        first = {"X-Forwarded-For": "203.0.113.9"}
        async with connect(daemon.url, additional_headers=first) as ws:
            await echo(ws)
            assert (await refused(daemon.url, additional_headers=first))[0] == 503
            other = {"X-Forwarded-For": "203.0.113.10"}
            async with connect(daemon.url, additional_headers=other) as ws2:
                await echo(ws2)

    asyncio.run(main())


def test_after_a_proxy_header_x_forwarded_for_is_not_read(start: Callable[..., Daemon]) -> None:
    """A client behind an L4 proxy whose own address falls in a broad trusted network
    must not pick its counted address with X-Forwarded-For: the PROXY header's word on the
    client is final."""
    daemon = start("--trusted-proxies", "127.0.0.0/8", "--log-level", "debug")
    port = daemon.port
    named = b"PROXY TCP4 127.0.0.9 127.0.0.1 4242 443\r\n"
    forged = upgrade(port, "X-Forwarded-For: 203.0.113.66")
    assert opened_peer(daemon, port, named + forged) == "127.0.0.9:4242"
    assert opened_peer(daemon, port, forged) == "203.0.113.66"  # without one: read


def test_an_x_forwarded_for_entry_with_an_ipv6_zone_is_not_an_address(
    start: Callable[..., Daemon],
) -> None:
    """A zone names an interface of the proxy's host, not a client (PROXY v1 refuses it
    too): the walk ends there, at the address before it."""
    daemon = start("--trusted-proxies", "127.0.0.1", "--log-level", "debug")
    port = daemon.port
    zoned = upgrade(port, "X-Forwarded-For: 198.51.100.4, fe80::1%eth0")
    assert opened_peer(daemon, port, zoned).startswith("127.0.0.1:")


def test_x_forwarded_for_from_anyone_else_is_ignored(start: Callable[..., Daemon]) -> None:
    daemon = start("--trusted-proxies", "10.0.0.0/8", "--log-level", "debug")
    forged = upgrade(daemon.port, "X-Forwarded-For: 203.0.113.7")
    assert opened_peer(daemon, daemon.port, forged).startswith("127.0.0.1:")


def test_ipv6_clients_are_counted_per_prefix(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text('trusted_proxies = ["127.0.0.1"]\nmax_connections_per_ip = 1\n')
    daemon = start("--config", str(path))

    def client(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": address}

    async def main() -> None:
        async with connect(daemon.url, additional_headers=client("2001:db8:0:1::1")):
            # The same /64: refused; the next /64: admitted.
            refusal = await refused(daemon.url, additional_headers=client("2001:db8:0:1::2"))
            assert refusal[0] == 503
            async with connect(daemon.url, additional_headers=client("2001:db8:0:2::1")) as ws:
                await echo(ws)
        reload(daemon, path, path.read_text() + "ipv6_prefix_length = 128\n", "ipv6_prefix_length")
        async with (
            connect(daemon.url, additional_headers=client("2001:db8:0:1::1")),
            connect(daemon.url, additional_headers=client("2001:db8:0:1::2")) as ws,
        ):
            await echo(ws)  # per address now

    asyncio.run(main())
    refusal = daemon.wait_for(
        "connection refused", where=lambda e: e["reason"] == "max_connections_per_ip"
    )
    assert refusal["client"] == "2001:db8:0:1::/64"


def v2_header(source: str, port: int, *, local: bool = False, tlvs: bytes = b"") -> bytes:
    addr = ipaddress.ip_address(source)
    if addr.version == 4:
        family, block = 0x11, addr.packed + bytes(4) + port.to_bytes(2, "big") + bytes(2)
    else:
        family, block = 0x21, addr.packed + bytes(16) + port.to_bytes(2, "big") + bytes(2)
    body = block + tlvs
    command = 0x20 if local else 0x21
    return V2 + bytes([command, family]) + len(body).to_bytes(2, "big") + body


def test_proxy_protocol_from_a_trusted_proxy_names_the_client(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--trusted-proxies", "127.0.0.1", "--log-level", "debug")
    port = daemon.port
    head = rawws.handshake_request(port)
    v1 = b"PROXY TCP4 198.51.100.9 192.0.2.1 4242 443\r\n"
    assert opened_peer(daemon, port, v1 + head) == "198.51.100.9:4242"
    v1_6 = b"PROXY TCP6 2001:db8::5 2001:db8::1 5000 443\r\n"
    assert opened_peer(daemon, port, v1_6 + head) == "[2001:db8::5]:5000"
    tlv = b"\x04\x00\x03abc"  # a TLV (skipped)
    assert opened_peer(daemon, port, v2_header("192.0.2.77", 6000, tlvs=tlv) + head) == (
        "192.0.2.77:6000"
    )
    assert opened_peer(daemon, port, v2_header("192.0.2.77", 6000, local=True) + head).startswith(
        "127.0.0.1:"
    )  # LOCAL: the proxy's own connection
    assert opened_peer(daemon, port, b"PROXY UNKNOWN\r\n" + head).startswith("127.0.0.1:")
    assert opened_peer(daemon, port, head).startswith("127.0.0.1:")  # no header: fine too

    # Byte by byte: a header split across reads.
    since = len(daemon.events)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for byte in v2_header("192.0.2.78", 7000) + head:
            sock.send(bytes([byte]))
        rawws.read_handshake(sock)
        event = daemon.wait_for("connection open", where=lambda e: daemon.events.index(e) >= since)
        assert event["peer"] == "192.0.2.78:7000"


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 198.51.100.9 192.0.2.1 4242\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",  # the wrong family
        b"PROXY TCP4 198.51.100.9 192.0.2.1 99999 443\r\n",
        b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
        V2 + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2 + b"\x21\x11\x00\x04" + bytes(4),  # address block too short
    ],
)
def test_a_malformed_proxy_header_from_a_trusted_proxy_gets_400(
    start: Callable[..., Daemon], header: bytes
) -> None:
    daemon = start("--trusted-proxies", "127.0.0.1")
    answer = raw_request(daemon.port, header + rawws.handshake_request(daemon.port))
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert answer.endswith(b"\n") and b"bad request: invalid PROXY protocol header: " in answer


def test_a_proxy_header_from_an_untrusted_peer_gets_400(start: Callable[..., Daemon]) -> None:
    daemon = start("--trusted-proxies", "10.0.0.0/8")
    head = rawws.handshake_request(daemon.port)
    for header in (b"PROXY TCP4 198.51.100.9 192.0.2.1 4242 443\r\n", v2_header("192.0.2.1", 1)):
        answer = raw_request(daemon.port, header + head)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        body = answer.split(b"\r\n\r\n", 1)[1]
        assert body.startswith(b"bad request: a PROXY protocol header where the HTTP request")
        assert b"not in trusted_proxies" in body


def test_trusted_proxies_are_validated() -> None:
    result = run_cli("--config", "", "--check-config", "--trusted-proxies", "10.0.0.0/8,10.1.2.3/8")
    assert result.returncode == 2
    assert "invalid trusted_proxies" in result.stderr and "entry '10.1.2.3/8'" in result.stderr
    result = run_cli(
        "--config",
        "",
        "--check-config",
        "--trusted-proxies",
        "::1",
        "--trusted-proxies",
        "fd00::/8",
    )
    assert result.returncode == 0, result.stderr
    assert 'trusted_proxies = ["::1", "fd00::/8"]  # --trusted-proxies' in result.stdout


@pytest.mark.unit
def test_proxy_parsing() -> None:
    assert proxy.parse_header(b"PRO") is None  # undecided yet
    assert proxy.parse_header(b"POST / HTTP/1.1\r\n") == (0, None)
    assert proxy.parse_header(V2[:5]) is None
    assert proxy.parse_header(b"GET") == (0, None)
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET"
    assert proxy.parse_header(line) == (len(line) - 3, (ipaddress.ip_address("1.2.3.4"), 1))
    assert proxy.parse_header(v2_header("::ffff:1.2.3.4", 9)) == (
        len(v2_header("::ffff:1.2.3.4", 9)),
        (ipaddress.ip_address("1.2.3.4"), 9),  # IPv4-mapped: counted as IPv4
    )
    networks = [ipaddress.ip_network("10.0.0.0/8")]
    assert proxy.forwarded_for(["[2001:db8::1]:443, 10.0.0.1:80"], networks) == (
        ipaddress.ip_address("2001:db8::1")
    )
    assert proxy.forwarded_for(["10.0.0.2, 10.0.0.1"], networks) == ipaddress.ip_address("10.0.0.2")
    assert proxy.group(ipaddress.ip_address("2001:db8::1"), 48) == "2001:db8::/48"
    assert proxy.group(None, 64) == ""
    # A dual-stack proxy names an IPv4 client IPv4-mapped in a TCP6 line: each IPv4 client
    # is still counted as itself, not all of them under ::/64.
    mapped = b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1234 80\r\n"
    assert proxy.parse_header(mapped) == (len(mapped), (ipaddress.ip_address("192.0.2.1"), 1234))
    with pytest.raises(proxy.ProxyError):  # a zone is not a client's address
        proxy.parse_header(b"PROXY TCP6 fe80::1%eth0 ::1 1234 80\r\n")


def test_a_proxy_over_a_unix_socket_is_trusted_with_unix(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """nginx on the same host, over a Unix socket: no address to trust, so the entry
    ``unix`` trusts such peers; without it their X-Forwarded-For is ignored."""
    path = tmp_path / "ws.sock"
    for trusted, expected in ((["--trusted-proxies", "unix"], "203.0.113.7"), ([], str(path))):
        daemon = start("--listen", f"unix:{path}", "--log-level", "debug", *trusted)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(upgrade(80, "X-Forwarded-For: 203.0.113.7"))
            rawws.read_handshake(sock)
            event = daemon.wait_for("connection open")
        assert event["peer"] == expected
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0


def test_trusted_proxies_change_on_reload(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text('log_level = "debug"\n')
    daemon = start("--config", str(path))
    forwarded = upgrade(daemon.port, "X-Forwarded-For: 203.0.113.7")
    assert opened_peer(daemon, daemon.port, forwarded).startswith("127.0.0.1:")
    text = 'log_level = "debug"\ntrusted_proxies = ["127.0.0.0/8"]\n'
    reload(daemon, path, text, "trusted_proxies")
    assert opened_peer(daemon, daemon.port, forwarded) == "203.0.113.7"
    proxied = b"PROXY TCP4 198.51.100.9 192.0.2.1 4242 443\r\n" + forwarded
    assert opened_peer(daemon, daemon.port, proxied) == "198.51.100.9:4242"
