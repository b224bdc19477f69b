"""The opening handshake: an ``asyncio.Protocol`` for a connection's first bytes.

It reads the HTTP request head, lets websockets' Sans-I/O ``ServerProtocol`` parse it,
asks admission whether to answer it with plain HTTP (health checks, refusals), and if
not, has ``ServerProtocol.accept`` check the upgrade and negotiate extensions. On a 101
it hands the transport to a ``WebSocket`` with ``set_protocol`` and is dropped: nothing
of the handshake stays in memory for the life of the connection. Bytes the client sent
after the request head, before the 101, are the first bytes of the WebSocket stream.

With TLS, the TLS handshake comes first (``loop.start_tls`` on the accepted connection, so
that the connection is counted, timed by ``open_timeout`` and its failure logged like any
other); from a trusted proxy without TLS, a PROXY protocol header may come first.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import re
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from wsechod import __version__
from wsechod.engine import proxy
from wsechod.engine.addresses import format_address
from wsechod.engine.connection import WebSocket, failures
from wsechod.engine.deflate import Deflate
from wsechod.engine.interface import Reply, Request

if TYPE_CHECKING:
    from wsechod.engine.server import Engine

SERVER = f"wsechod/{__version__}"
# Longest request head read before answering 431; websockets allows 8 KiB a line and 128
# headers, but no legitimate upgrade needs more than a few hundred bytes.
MAX_HEAD = 16 * 1024
TOO_LARGE = "head_too_large"  # why a 431 refuses, in /metrics


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
CAUSE_MAX = 200  # characters of the client's own text quoted back in a 400


def serialize(reply: Reply, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response; the connection closes after it."""
    body = reply.body.encode()
    lines = [
        f"HTTP/1.1 {reply.status.value} {reply.status.phrase}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Server: {SERVER}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in reply.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def _quoted(cause: object) -> str:
    """The client's text as quoted back in a 400 and the log: one short printable line."""
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(cause))
    return text if len(text) <= CAUSE_MAX else text[:CAUSE_MAX] + "..."


class Handshake(asyncio.Protocol):
    __slots__ = ("_addr", "_engine", "_gone", "_head", "_proxy", "_t", "_timer", "_tls", "peer")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._head = bytearray()
        self._t: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The TLS handshake under way: start_tls's coroutine, driven by _drive_tls.
        self._tls: Coroutine[Any, Any, asyncio.Transport | None] | None = None
        self._addr: proxy.Address | None = None  # the peer's, or the client's per PROXY
        self._proxy = False  # a PROXY protocol header may come first
        self._gone = False  # connection_lost (or a failed TLS handshake) has counted it
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        engine = self._engine
        self._t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peer = engine.peer_of(transport)
        self._addr = proxy.peer_address(transport.get_extra_info("peername"))
        engine.transports += 1  # until connection_lost, whoever owns it then
        options = engine.options
        if engine.out_of_fds():
            if options.tls is None:
                self._answer(Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is at capacity\n"))
            else:  # no TLS session to answer in: spare the handshake's CPU
                self._t.abort()
            return
        engine.handshakes.add(self)
        if options.open_timeout:
            self._timer = engine.loop.call_later(options.open_timeout, self.abort)
        if options.tls is not None:
            self._tls = engine.loop.start_tls(self._t, self, options.tls, server_side=True)
            self._drive_tls()
        elif options.trusted_proxies or options.trust_unix:
            self._proxy = self._trusted()

    def _trusted(self) -> bool:
        """The peer may name the client (PROXY header, X-Forwarded-For): its address is
        trusted, or it came over a Unix socket and ``unix`` is (not just any peer without
        an address: a TCP peer already gone has none either)."""
        options = self._engine.options
        t = self._t
        sock = t.get_extra_info("socket") if t is not None and options.trust_unix else None
        unix = sock is not None and sock.family == socket.AF_UNIX
        return proxy.trusted(self._addr, options.trusted_proxies, unix)

    def _drive_tls(self, _: object = None) -> None:
        """Run ``loop.start_tls`` up to its wait for the TLS handshake, and on when it ends.

        Not a Task: uvloop starts reading as soon as ``connection_made`` returns, and a
        Task would call start_tls one loop pass later, after this protocol had been handed
        the ClientHello. Run here, start_tls puts its TLS protocol in place before
        ``connection_made`` returns (what arrives before its own ``connection_made`` waits
        in its buffer), and no Task is made per connection."""
        coro = self._tls
        assert coro is not None
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self._tls = None
            self._tls_done(done.value)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # ssl.SSLError, a reset, an EOF, a cancelled wait
            self._tls = None
            self._engine.tls_failed(self.peer, exc)
            if self._t is not None:  # start_tls closes it on its errors; not on every one
                self._t.abort()
            self._lost()
        else:  # a future (or None: a bare yield, go on at the next pass)
            if waiting is None:
                self._engine.loop.call_soon(self._drive_tls)
            else:
                waiting.add_done_callback(self._drive_tls)

    def _tls_done(self, tls: asyncio.Transport | None) -> None:
        """The TLS handshake is done: the HTTP request comes through ``tls``."""
        if tls is None or tls.is_closing():  # closed meanwhile (the client, a timeout)
            self._engine.tls_failed(self.peer, ConnectionAbortedError("connection closed"))
            self._lost()
            return
        self._t = tls
        if self._head:  # decrypted before start_tls returned
            early, self._head = bytes(self._head), bytearray()
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            self._head += data
            return
        if self._proxy:
            self._proxy_header(data)
            return
        head = self._head
        seen = max(len(head) - 2, 0)  # the empty line may straddle two reads
        head += data
        # The head ends at the first empty line: CRLF CRLF, or (invalid, answered 400 at
        # once rather than at the open timeout) a bare LF on either side.
        ends = [i for i in (head.find(b"\n\r\n", seen), head.find(b"\n\n", seen)) if i >= 0]
        if not ends:
            if len(head) > MAX_HEAD:
                status = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                self._answer(Reply(status, "request head too large\n", refused=TOO_LARGE))
            return
        end = min(ends)
        end += 3 if head[end + 1] == 0x0D else 2
        if end > MAX_HEAD:
            status = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            self._answer(Reply(status, "request head too large\n", refused=TOO_LARGE))
            return
        self._head = bytearray()
        self._request(bytes(head[:end]), bytes(head[end:]))

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        """Once, whether the loss is reported by connection_lost, a failed TLS handshake
        or both (uvloop reports some TLS failures both ways)."""
        if not self._gone:
            self._gone = True
            self._engine.transports -= 1
            self._finish()

    def _proxy_header(self, data: bytes) -> None:
        """The first bytes from a trusted proxy: a PROXY protocol header, if they start
        with one, names the client; what follows is read as the HTTP request."""
        head = self._head
        head += data
        try:
            found = proxy.parse_header(head)
        except proxy.ProxyError as exc:
            self._refuse(f"invalid PROXY protocol header: {exc}")
            return
        if found is None:
            return  # bounded: a header says its size, at most 64 KiB
        self._proxy = False
        size, source = found
        if source is not None:
            self._addr, port = source
            self.peer = format_address((str(self._addr), port))
        self._head = bytearray()
        data = bytes(head[size:])
        if data:
            self.data_received(data)

    def abort(self) -> None:
        """The client did not complete the handshake in time, or the server stops."""
        if self._t is not None:
            self._t.abort()
        self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._engine.handshake_done(self)

    def _refuse(self, problem: str) -> None:
        """400, saying what is wrong with the request."""
        self._engine.refused("bad request", self.peer, problem)
        self._answer(Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {problem}\n"))

    def _request(self, head: bytes, rest: bytes) -> None:
        engine = self._engine
        options = engine.options
        if proxy.is_header(head + rest[: len(proxy.V2_SIGNATURE)]):
            self._refuse(
                "a PROXY protocol header where the HTTP request should be (from a peer not "
                "in trusted_proxies, or a second one)"
            )
            return
        if head.count(b"\n") != head.count(b"\r\n"):
            # websockets would say "connection closed": say what is wrong instead.
            self._refuse("a line ends with a bare LF; HTTP lines end with CRLF")
            return
        protocol = ServerProtocol(extensions=engine.extensions, max_size=options.max_size)
        protocol.receive_data(head)
        events = protocol.events_received()
        if not events or not isinstance(events[0], WsRequest):
            why = protocol.handshake_exc
            self._refuse(_quoted(why.__cause__ if why is not None and why.__cause__ else why))
            return
        raw = events[0]
        method = raw.method
        hosts = len(raw.headers.get_all("Host"))
        if hosts != 1 and raw.protocol == "HTTP/1.1":
            # RFC 9112 3.2 (and RFC 6455 4.2.1): exactly one Host, or 400.
            self._refuse("missing Host header" if not hosts else "more than one Host header")
            return
        group = self._client(raw.headers)
        request = Request(method, raw.path, raw.headers, self.peer, group)
        try:
            reply = engine.admit(request)
        except Exception:  # a bug, but one a client may trigger over and over
            failures.error("admission failed", peer=self.peer)
            reply = Reply(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        if reply is not None:
            self._answer(reply, head_only=method == "HEAD")
            return
        response = protocol.accept(raw)
        if response.status_code != 101:
            body = (response.body or b"").decode(errors="replace").splitlines()
            text = (body[0] if body else response.reason_phrase) + "\n"
            engine.refused("bad handshake", self.peer, text.strip())
            status = http.HTTPStatus(response.status_code)
            extra = {k: v for k, v in response.headers.raw_items() if k in ("Allow", "Upgrade")}
            extra["Sec-WebSocket-Version"] = "13"  # 4.4: the version we speak
            self._answer(Reply(status, text, extra))
            return
        response.headers["Server"] = SERVER
        protocol.send_response(response)
        transport = self._t
        assert transport is not None
        for chunk in protocol.data_to_send():
            transport.write(chunk)
        self._finish()
        negotiated = protocol.extensions[0] if protocol.extensions else None
        deflate = Deflate(negotiated) if isinstance(negotiated, PerMessageDeflate) else None
        ws = WebSocket(engine, transport, raw.path, self.peer, deflate)
        ws.group = group
        transport.set_protocol(ws)
        self._t = None
        engine.opened(ws)
        if rest:
            ws.data_received(rest)

    def _client(self, headers: Headers) -> str:
        """Behind a trusted proxy, the client its X-Forwarded-For names becomes the peer;
        returns the client's address group."""
        options = self._engine.options
        addr = self._addr
        if self._trusted():
            forwarded = headers.get_all("X-Forwarded-For")
            client = proxy.forwarded_for(forwarded, options.trusted_proxies) if forwarded else None
            if client is not None:
                addr = client
                self.peer = str(client)
        return proxy.group(addr, options.ipv6_prefix_length)

    def _answer(self, reply: Reply, head_only: bool = False) -> None:
        """Plain HTTP: write the reply and close once it is sent."""
        if self._t is None:
            return
        if reply.refused:
            self._engine.refused(reply.refused, self.peer)
        self._t.write(serialize(reply, head_only))
        self._t.close()
        self._finish()
