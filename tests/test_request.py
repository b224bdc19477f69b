"""The engine's own request parsing and upgrade checks (engine/request.py, upgrade.py),
held against websockets' ``Request.parse`` and ``ServerProtocol.accept`` on the same bytes:
what one accepts the other accepts with the same method, target and headers; what one
refuses the other refuses, with the same status and words. Over real sockets the refusals
are in test_http.py and test_hostile.py."""

from __future__ import annotations

import base64
import re
import time
from datetime import timedelta
from email.utils import parsedate_to_datetime

import pytest
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from wsechod.engine import request, upgrade
from wsechod.engine.handshake import _quoted

pytestmark = pytest.mark.unit

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BASE = {
    "Host": "example.com",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": KEY,
    "Sec-WebSocket-Version": "13",
}
FACTORIES = enable_server_permessage_deflate(None)


def head(
    *extra: tuple[str, str], drop: tuple[str, ...] = (), line: str = "GET /a?b=1 HTTP/1.1"
) -> bytes:
    fields = [(k, v) for k, v in BASE.items() if k not in drop] + list(extra)
    return (line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n").encode("latin-1")


def theirs(raw: bytes, chosen: str | None = None) -> tuple[ServerProtocol, WsRequest | None]:
    selected = None if chosen is None else Subprotocol(chosen)
    protocol = ServerProtocol(extensions=FACTORIES, select_subprotocol=lambda *_: selected)
    protocol.receive_data(raw)
    events = protocol.events_received()
    return protocol, (events[0] if events and isinstance(events[0], WsRequest) else None)


# Heads both parsers read, and the upgrade answers that follow.
UPGRADES = {
    "plain": head(),
    "HEAD": head(line="HEAD / HTTP/1.1"),
    "POST": head(line="POST / HTTP/1.1"),
    "keep-alive, Upgrade": head(("Connection", "keep-alive, Upgrade"), drop=("Connection",)),
    "two Connection headers": head(("Connection", "keep-alive"), ("Connection", "upgrade")),
    "Connection: keep-alive": head(("Connection", "keep-alive"), drop=("Connection",)),
    "no Connection": head(drop=("Connection",)),
    "Upgrade: WebSocket": head(("Upgrade", "WebSocket"), drop=("Upgrade",)),
    "Upgrade: websocket, h2c": head(("Upgrade", "websocket, h2c"), drop=("Upgrade",)),
    "Upgrade twice": head(("Upgrade", "websocket")),
    "no Upgrade": head(drop=("Upgrade",)),
    "bad Connection grammar": head(("Connection", "Upgrade,,@@"), drop=("Connection",)),
    "no key": head(drop=("Sec-WebSocket-Key",)),
    "two keys": head(("Sec-WebSocket-Key", KEY)),
    "key not base64": head(("Sec-WebSocket-Key", "not base64!"), drop=("Sec-WebSocket-Key",)),
    "key of 15 bytes": head(
        ("Sec-WebSocket-Key", base64.b64encode(b"x" * 15).decode()), drop=("Sec-WebSocket-Key",)
    ),
    "version 8": head(("Sec-WebSocket-Version", "8"), drop=("Sec-WebSocket-Version",)),
    "two versions": head(("Sec-WebSocket-Version", "13")),
    "no version": head(drop=("Sec-WebSocket-Version",)),
    "two Origins": head(("Origin", "https://a"), ("Origin", "https://b")),
    "deflate": head(("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")),
    "deflate twice": head(
        ("Sec-WebSocket-Extensions", "permessage-deflate; server_max_window_bits=10"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ),
    "deflate, bad parameter then good": head(
        ("Sec-WebSocket-Extensions", "permessage-deflate; x=1, permessage-deflate"),
    ),
    "unknown extension": head(("Sec-WebSocket-Extensions", "x-unknown")),
    "extension grammar": head(("Sec-WebSocket-Extensions", "permessage-deflate;;")),
    "subprotocol grammar": head(("Sec-WebSocket-Protocol", "chat, , @")),
    "subprotocols": head(("Sec-WebSocket-Protocol", "chat, superchat")),
    "spaces around values": head(("X-A", "  a b \t")),
    "latin-1 value": head(("X-A", "caf\xe9")),
    "Content-Length 0": head(("Content-Length", "0")),
    "Content-Length 5": head(("Content-Length", "5")),
    "Transfer-Encoding": head(("Transfer-Encoding", "chunked")),
    "too many headers": head(*((f"X-{i}", "v") for i in range(130))),
    "128 headers": head(*((f"X-{i}", "v") for i in range(128 - len(BASE)))),
    "long header line": head(("X-A", "a" * 8190)),
    "header line at the limit": head(("X-A", "a" * (8192 - 7))),
    "long request line": head(line="GET /" + "a" * 8200 + " HTTP/1.1"),
    "HTTP/1.0": head(line="GET / HTTP/1.0"),
    "HTTP/2.0": head(line="GET / HTTP/2.0"),
    "no version in the line": head(line="GET /"),
    "space in the target": head(line="GET /a b HTTP/1.1"),
    "bad header name": b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
    "no colon": b"GET / HTTP/1.1\r\nHost: x\r\nXYZ\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    "empty head": b"\r\n\r\n",
    "not ASCII in the target": b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
}


def words(exc: BaseException | None) -> str:
    assert exc is not None
    cause = exc.__cause__ or exc
    return str(cause)


@pytest.mark.parametrize("case", list(UPGRADES))
def test_parse_agrees_with_websockets(case: str) -> None:
    raw = UPGRADES[case]
    protocol, expected = theirs(raw)
    try:
        ours = request.parse(raw)
    except request.BadRequest as exc:
        assert expected is None, f"websockets reads it, we refuse: {exc}"
        refused = protocol.handshake_exc
        said = words(refused)
        limit = {"request line": 414, "header line": 431, "too many": 431}
        if "expected no more than" in said:
            # A limit, said in our own words, with the status of RFC 9110 and RFC 6585.
            assert [exc.status] == [v for k, v in limit.items() if k in str(exc)], exc
            return
        assert exc.status == 400
        if isinstance(refused and refused.__cause__, UnicodeDecodeError):
            assert "not ASCII" in str(exc)
        else:
            assert _quoted(exc) == _quoted(said)
        return
    assert expected is not None, f"we read it, websockets refuses: {protocol.handshake_exc}"
    assert (ours.method, ours.target, ours.version) == (
        expected.method,
        expected.path,
        expected.protocol,
    )
    assert list(ours.headers.raw_items()) == list(expected.headers.raw_items())


def terms(extension: object) -> dict[str, object]:
    """An extension's negotiated parameters (not its zlib objects)."""
    return {k: v for k, v in vars(extension).items() if k not in ("encoder", "decoder")}


@pytest.mark.parametrize("case", list(UPGRADES))
@pytest.mark.parametrize("subprotocol", [None, "chat"])
def test_accept_agrees_with_websockets(case: str, subprotocol: str | None) -> None:
    raw = UPGRADES[case]
    protocol, expected = theirs(raw, subprotocol)
    if expected is None or expected.protocol != "HTTP/1.1":
        pytest.skip("refused before the upgrade (test_parse_agrees_with_websockets)")
    response = protocol.accept(expected)
    ours = upgrade.accept(request.parse(raw), FACTORIES, subprotocol, "wsechod/test")
    if response.status_code != 101:
        assert isinstance(ours, upgrade.Refusal), response
        assert ours.status == response.status_code
        assert ours.text == response.body.decode().splitlines()[0]
        for name in ("Allow", "Upgrade"):
            assert ours.headers.get(name) == response.headers.get(name)
        return
    assert isinstance(ours, upgrade.Upgrade), ours
    status, *lines = ours.response.decode().removesuffix("\r\n\r\n").split("\r\n")
    assert status == "HTTP/1.1 101 Switching Protocols"
    got = dict(line.split(": ", 1) for line in lines)
    want = dict(response.headers.raw_items())
    assert got.pop("Server") == "wsechod/test"
    # Made a moment apart, the two dates may straddle a second (found by a loaded run).
    dates = parsedate_to_datetime(got.pop("Date")), parsedate_to_datetime(want.pop("Date"))
    assert timedelta(0) <= dates[0] - dates[1] <= timedelta(seconds=5)
    assert got == want
    assert [type(e) for e in ours.extensions] == [type(e) for e in protocol.extensions]
    assert list(map(terms, ours.extensions)) == list(map(terms, protocol.extensions))


def test_accept_key_of_the_rfc() -> None:
    """RFC 6455 1.3's worked example."""
    ours = upgrade.accept(request.parse(head()), None, None, "wsechod/test")
    assert isinstance(ours, upgrade.Upgrade)
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in ours.response


def test_no_extensions_offered_when_none_are_served() -> None:
    raw = UPGRADES["deflate"]
    ours = upgrade.accept(request.parse(raw), None, None, "wsechod/test")
    assert isinstance(ours, upgrade.Upgrade)
    assert ours.extensions == [] and b"Extensions" not in ours.response


@pytest.mark.parametrize("blank", [b" ", b"\t"])
@pytest.mark.parametrize("end", [b"a", b"\x00", b"\x7f", b"\r"])
def test_long_runs_of_blanks_cost_linear_time(blank: bytes, end: bytes) -> None:
    """A header line of 8,000 blanks and one more byte, accepted or not, at the line
    limit: 20 of them parse in a fraction of the CPU one took when the separator and the
    value could both take the blanks (0.4 s each, the loop held: a client could stall a
    worker with a few requests a second)."""
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-A:" + blank * 8000 + end + b"\r\n\r\n"
    began = time.process_time()
    for _ in range(20):
        try:
            value = request.parse(raw).headers["X-A"]
        except request.BadRequest as exc:
            assert end != b"a" and str(exc).startswith("invalid HTTP header value")
        else:
            assert end == b"a" and value == "a"
    assert time.process_time() - began < 0.5


def test_the_date_is_an_http_date() -> None:
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", upgrade.http_date())


def test_offers_are_remembered_within_a_bound() -> None:
    """The same offer is negotiated once (each connection gets an extension of its own
    with the same parameters); a client making a thousand different offers leaves at most
    OFFERS_KEPT of them in memory."""
    upgrade._offers.clear()
    first = upgrade.accept(request.parse(UPGRADES["deflate"]), FACTORIES, None, "x")
    again = upgrade.accept(request.parse(UPGRADES["deflate"]), FACTORIES, None, "x")
    assert isinstance(first, upgrade.Upgrade) and isinstance(again, upgrade.Upgrade)
    assert first.response.split(b"\r\n")[2:] == again.response.split(b"\r\n")[2:]
    assert list(map(terms, again.extensions)) == list(map(terms, first.extensions))
    assert again.extensions[0] is not first.extensions[0]  # each its own
    # What is kept is parameters and the header, not extensions (with their zlib objects).
    kept = list(upgrade._offers.values())
    assert len(kept) == 1 and all(isinstance(t, tuple) for t in kept[0][0])
    for i in range(1000):
        offer = f"permessage-deflate; client_max_window_bits={8 + i % 8}, x-{i}"
        raw = head(("Sec-WebSocket-Extensions", offer))
        answer = upgrade.accept(request.parse(raw), FACTORIES, None, "x")
        protocol, parsed = theirs(raw)
        assert parsed is not None and protocol.accept(parsed).status_code == 101
        assert isinstance(answer, upgrade.Upgrade)
        assert list(map(terms, answer.extensions)) == list(map(terms, protocol.extensions))
    assert len(upgrade._offers) <= upgrade.OFFERS_KEPT
