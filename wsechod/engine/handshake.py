"""The opening handshake: an ``asyncio.Protocol`` for a connection's first bytes.

It reads the HTTP request head, parses it whole (``request.py``), asks admission whether
to answer it with plain HTTP (health checks, refusals), and if not, checks the upgrade and
negotiates extensions (``upgrade.py``, every check websockets makes). On a 101
it hands the transport to a ``WebSocket`` with ``set_protocol`` and is dropped: nothing
of the handshake stays in memory for the life of the connection. Bytes the client sent
after the request head, before the 101, are the first bytes of the WebSocket stream.

A handshake is in the engine's table of pending handshakes from the moment its
connection is accepted: it is counted for its client's address (``max_connections_per_ip``)
and, when file descriptors run short, the oldest pending handshakes of the address that
holds the most are cut first. On a TLS listener the engine accepts the connection itself
and runs the TLS handshake with ``loop.connect_accepted_socket`` (a Task that lives as
long as the TLS handshake); this protocol then sees the decrypted request. From a trusted
proxy without TLS, a PROXY protocol header may come first.
"""

from __future__ import annotations

import asyncio
import functools
import http
import inspect
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from websockets.datastructures import Headers
from websockets.extensions import ServerExtensionFactory

from wsechod._version import __version__
from wsechod.engine import bodies, deflate, proxy, upgrade
from wsechod.engine.addresses import format_address
from wsechod.engine.connection import Host, WebSocket, failures
from wsechod.engine.interface import Admitted, ReadBody, Reply, Request
from wsechod.engine.readbuffer import Lender
from wsechod.engine.request import BadRequest, Head, parse
from wsechod.engine.throttle import Throttled

SERVER = f"wsechod/{__version__}"
# Longest request head read before answering 431; websockets allows 8 KiB a line and 128
# headers, but no legitimate upgrade needs more than a few hundred bytes.
MAX_HEAD = 16 * 1024
TOO_LARGE = "head_too_large"  # why a 431 refuses, in /metrics


# C0 and C1 controls: U+0085 (NEL, obs-text byte 0x85 read as ISO-8859-1) ends a line too.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
CAUSE_MAX = 200  # characters of the client's own text quoted back in a 400
# Seconds a connection accepted beyond its address's max_connections_per_ip has to send
# its request and hear 503 (rather than the whole open_timeout, holding a descriptor).
REFUSE_WITHIN = 1.0


def serialize(reply: Reply, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response; the connection closes after it."""
    body = reply.body.encode()
    lines = [
        f"HTTP/1.1 {reply.status.value} {reply.status.phrase}",
        f"Date: {upgrade.http_date()}",
        f"Server: {SERVER}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in reply.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


_REQUEST_LINE = re.compile(rb"\S+ \S+ \S+\r?")  # method, target, version; parse checks more
# Another method, in HTTP/1.x: h11 reads it (websockets' parser reads GET only).
_BODY_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/1\.[01]\r\n")
DRAINING = Reply(
    http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n", refused="draining"
)
SHORT_OF_MEMORY = Reply(
    http.HTTPStatus.SERVICE_UNAVAILABLE,
    "server is short of memory: try again\n",
    {"Retry-After": "1"},
    refused="memory_limit",
)
TLS_RECORD = 0x16  # the first byte of a TLS ClientHello (a handshake record)


def _not_a_request(head: bytearray) -> str | None:
    """What is wrong with the start of a request head that has not ended yet, when it is
    already certain: TLS where plain HTTP is spoken, a first line that is no request line.
    (A PROXY protocol header, or what may be the start of one, is for ``_request``.)"""
    if head[0] == TLS_RECORD:
        return "a TLS handshake on a port without TLS (wss:// or https:// to a ws:// server?)"
    eol = head.find(b"\n")
    if eol < 0 or head.startswith(proxy.V1_PREFIX) or head.startswith(b"\r"):
        return None
    line = bytes(head[:eol])
    if _REQUEST_LINE.fullmatch(line):
        return None
    return f"invalid HTTP request line: {_quoted(line.decode('latin-1').rstrip(chr(13)))}"


def _misframed(head: bytes, rest: bytes) -> str | None:
    """What is wrong with a whole request head before any parser reads it."""
    if proxy.is_header(head + rest[: len(proxy.V2_SIGNATURE)]):
        return (
            "a PROXY protocol header where the HTTP request should be (from a peer not in "
            "trusted_proxies, or a second one)"
        )
    if head.count(b"\n") != head.count(b"\r\n"):
        # websockets would say "connection closed": say what is wrong instead.
        return "a line ends with a bare LF; HTTP lines end with CRLF"
    return None


def _quoted(cause: object) -> str:
    """The client's text as quoted back in a 400 and the log: one short printable line."""
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(cause))
    return text if len(text) <= CAUSE_MAX else text[:CAUSE_MAX] + "..."


class Gatekeeper(Host, Protocol):
    """What a handshake asks of the engine that accepted it, besides what its connection
    will (``Host``): the table of pending handshakes, per-address counts, admission."""

    @property
    def extensions(self) -> list[ServerExtensionFactory] | None:
        """What a new handshake may negotiate."""

    def accepted(self, handshake: Handshake) -> bool:
        """Counted and in the table; False: refuse it (short of file descriptors)."""

    def over_limit(self, group: str) -> bool: ...

    def regroup(self, handshake: Handshake, group: str) -> None: ...

    def handshake_done(self, handshake: Handshake, *, upgraded: bool = False) -> None: ...

    def admit(self, request: Request) -> Reply | Awaitable[Reply] | ReadBody | Admitted | None: ...

    def opened(self, ws: WebSocket, admitted: Admitted | None) -> None: ...

    def refused(self, reason: str, peer: str, detail: str = "") -> None: ...

    def tls_failed(self, peer: str, exc: BaseException) -> None: ...

    def lost(self) -> None:
        """A connection that never became a WebSocket is gone, and its descriptor."""

    @property
    def draining(self) -> bool: ...

    upgrading: int  # handshakes admitted and waiting out the test peer's accept_delay


class Handshake(asyncio.Protocol):
    __slots__ = (
        "_addr",
        "_answered",
        "_body",
        "_cut",
        "_delayed",
        "_engine",
        "_gone",
        "_head",
        "_proxy",
        "_sock",
        "_task",
        "_timer",
        "_tls",
        "_transport",
        "_trusted",
        "group",
        "peer",
        "roles",
    )

    def __init__(self, engine: Gatekeeper, roles: frozenset[str]) -> None:
        self._engine = engine
        self.roles = roles  # its listener's: what it may be served
        self._head = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The TLS handshake under way (``connect_accepted_socket``), and its socket.
        self._tls: asyncio.Task[Any] | None = None
        self._sock: socket.socket | None = None
        self._addr: proxy.Address | None = None  # the peer's, or the client's per PROXY
        self._trusted = False  # the peer may name the client (a trusted proxy)
        self._proxy = False  # a PROXY protocol header may come first
        self._gone = False  # its connection is over and uncounted
        self._cut = False  # aborted: nothing more is done with it
        # A request with a body: its reader and what answers it once read; then the answer
        # being made (an awaitable admission returned).
        self._body: tuple[bodies.BodyReader, Callable[[bytes], Reply | Awaitable[Reply]]] | None
        self._body = None
        self._task: asyncio.Future[Any] | None = None  # a reply, or the test peer's delay
        self._answered = False  # an HTTP reply was written: what else comes is discarded
        self._delayed = False  # admitted, waiting out accept_delay: counted in upgrading
        self.peer = ""
        self.group = ""  # the client's address group (proxy.group), once known

    # --- accepted --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._tls is not None:  # the TLS handshake is done: the request comes now
            return
        info = transport.get_extra_info
        peername, sockname = info("peername"), info("sockname")
        # A unix socket's names are paths (str or b""), an IP socket's tuples.
        if not self._accepted(peername, sockname, unix=isinstance(sockname, (str, bytes))):
            # No room: its request would be answered 503 anyway; say it now.
            self._answer(Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is at capacity\n"))

    def start_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """A connection accepted on a TLS listener: its TLS handshake, then the request.
        Nothing reads the socket until ``connect_accepted_socket`` has set up TLS on it,
        so the ClientHello cannot reach anyone else first."""
        self._sock = sock
        try:
            peername = sock.getpeername()
        except OSError:  # gone already (reset): it has no name any more
            peername = None
        if not self._accepted(peername, sock.getsockname(), unix=sock.family == socket.AF_UNIX):
            sock.close()  # no TLS session to answer in: spare the handshake's CPU
            self._lost()
            return
        loop = self._engine.loop
        timeout = self._engine.options.open_timeout or None
        self._tls = loop.create_task(
            loop.connect_accepted_socket(
                lambda: self, sock, ssl=context, ssl_handshake_timeout=timeout
            )
        )
        self._tls.add_done_callback(self._tls_done)

    def _accepted(self, peername: object, sockname: object, *, unix: bool) -> bool:
        """Who the peer is, its open deadline, its place in the engine's table; False if
        there are not file descriptors enough for it."""
        engine = self._engine
        options = engine.options
        # A unix socket's clients have no name: the socket's path stands for them.
        name = peername or sockname
        self.peer = format_address(name) if name else "unix"
        self._addr = proxy.peer_address(peername)
        self._trusted = proxy.trusted(
            self._addr, options.trusted_proxies, unix and options.trust_unix
        )
        self._proxy = self._trusted and options.tls is None
        if not self._trusted:  # a trusted proxy speaks for others: counted once named
            self.group = proxy.group(self._addr, options.ipv6_prefix_length)
        if not engine.accepted(self):
            return False
        if options.open_timeout:
            # Beyond its address's limit it will be refused: it gets a second to ask.
            over = engine.over_limit(self.group)
            within = min(options.open_timeout, REFUSE_WITHIN) if over else options.open_timeout
            self._timer = engine.loop.call_later(within, self.abort)
        return True

    def _tls_done(self, task: asyncio.Task[Any]) -> None:
        """The TLS handshake ended: on success ``connection_made`` has had the decrypted
        transport already; otherwise the connection is gone."""
        if task.cancelled():
            exc: BaseException = ConnectionAbortedError("cut before the end of TLS handshake")
        elif (error := task.exception()) is not None:
            exc = error
        else:
            self._tls = None
            if self._cut or self._gone:  # cut meanwhile: its transport went with it
                return
            if self._head:  # decrypted before the task could end
                early, self._head = bytes(self._head), bytearray()
                self.data_received(early)
            return
        self._tls = None
        if self._sock is not None and self._sock.fileno() != -1:
            # Cut before the loop took the socket over (once it has, it detaches the socket
            # when it closes, and this close, which the loop's reference holds off, is none).
            self._sock.close()
        self._engine.tls_failed(self.peer, exc)
        self._lost()

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:  # decrypted before the TLS task has ended
            self._head += data
            return
        if self._body is not None:
            self._more_body(data)
            return
        if self._answered or self._task is not None:
            return  # answered, or being answered: what else comes is not read
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
            elif (problem := _not_a_request(head)) is not None:
                self._refuse(problem)  # at once, not at the open timeout: nothing will fix it
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
        """Once, whether the loss is reported by connection_lost, a failed TLS handshake,
        both, or an abort first."""
        if not self._gone:
            self._gone = True
            self._drop_body()
            self._finish()
            self._engine.lost()

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
        if size:  # a PROXY header: its word on the client is final (no X-Forwarded-For)
            if source is not None:
                self._addr, port = source
                self.peer = format_address((str(self._addr), port))
            # Counted as the client it names; a proxy's own connection (LOCAL) as itself.
            self._regroup(self._addr)
        self._head = bytearray()
        data = bytes(head[size:])
        if data:
            self.data_received(data)

    def _undelay(self) -> bool:
        """No longer waiting out accept_delay (uncounted); whether it was."""
        delayed, self._delayed = self._delayed, False
        if delayed:
            self._engine.upgrading -= 1
        return delayed

    def refuse_if_delayed(self) -> None:
        """The server stops: a handshake waiting out accept_delay is answered 503 now."""
        if self._delayed and self._task is not None:
            self._task.cancel()
            self._task = None
            self._undelay()
            self._answer(DRAINING)

    def abort(self) -> None:
        """The client did not complete the handshake in time, the server stops, or it is
        cut to make room for others."""
        self._cut = True  # a TLS task ending meanwhile must not go on with it
        self._undelay()
        if self._task is not None:
            self._task.cancel()
        if self._tls is not None:
            self._tls.cancel()  # its transport is aborted, the socket closed
        if self._transport is not None:  # also when the TLS task ended but has not said so yet
            self._transport.abort()
        self._finish()

    def _finish(self, *, upgraded: bool = False) -> None:
        """Out of the table of pending handshakes (once)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._engine.handshake_done(self, upgraded=upgraded)

    def _regroup(self, addr: proxy.Address | None) -> None:
        """A trusted proxy named the client: from now on it is counted as that client."""
        self._trusted = False
        options = self._engine.options
        self._engine.regroup(self, proxy.group(addr, options.ipv6_prefix_length))

    def _refuse(self, problem: str) -> None:
        """400, saying what is wrong with the request."""
        self._engine.refused("bad request", self.peer, problem)
        self._answer(Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {problem}\n"))

    def _request(self, head: bytes, rest: bytes) -> None:
        if problem := _misframed(head, rest):
            self._refuse(problem)
            return
        if not head.startswith((b"GET ", b"HEAD ")) and _BODY_REQUEST_LINE.match(head):
            self._with_body(head + rest)
            return
        raw = self._parse(head)
        if raw is None:
            return
        if self._trusted:
            self._client(raw.headers)
        request = Request(raw.method, raw.target, raw.headers, self.peer, self.group, self.roles)
        reply = self._admit(request)
        if isinstance(reply, ReadBody):  # a GET has no body to read
            reply = Reply(http.HTTPStatus.METHOD_NOT_ALLOWED, "use POST\n", {"Allow": "POST"})
        if isinstance(reply, Reply) or inspect.isawaitable(reply):
            self._answer_when(reply, head_only=raw.method == "HEAD")
            return
        if reply is not None and reply.delay > 0:  # the test peer's accept_delay
            later = functools.partial(self._upgrade, raw, reply, rest)
            self._delayed = True  # (the open deadline runs meanwhile)
            self._engine.upgrading += 1
            self._task = asyncio.ensure_future(asyncio.sleep(reply.delay))
            self._task.add_done_callback(lambda task: task.cancelled() or later())
            return
        self._upgrade(raw, reply, rest)

    def _upgrade(self, raw: Head, reply: Admitted | None, rest: bytes) -> None:
        """Answer the upgrade: 101 and the WebSocket opens, or why not."""
        self._task = None
        engine = self._engine
        if self._undelay() and engine.draining:  # the stop came while it waited
            self._answer(DRAINING)
            return
        if self._transport is None or self._transport.is_closing():
            return  # gone while the test peer delayed its answer
        if raw.version != "HTTP/1.1":
            # RFC 6455 4.1: the opening handshake is an HTTP/1.1 request (websockets would
            # answer 505, but HTTP/1.0 is the same major version: this request is wrong).
            self._refuse(f"a WebSocket upgrade needs HTTP/1.1, not {_quoted(raw.version)}")
            return
        offer = engine.extensions if reply is None or reply.compress else None
        chosen = None if reply is None else reply.subprotocol
        answer = upgrade.accept(raw, offer, chosen, SERVER)
        if isinstance(answer, upgrade.Refusal):
            text = _quoted(answer.text)  # it quotes the client's header values
            engine.refused("bad handshake", self.peer, text)
            extra = {**answer.headers, "Sec-WebSocket-Version": "13"}  # 4.4: what we speak
            self._answer(Reply(answer.status, text + "\n", extra))
            return
        transport = self._transport
        assert transport is not None
        transport.write(answer.response)
        if reply is not None and reply.throttle:  # the test peer's slow network
            transport = Throttled(transport, reply.throttle)
        self._finish(upgraded=True)  # still counted for its address, as a WebSocket now
        compression = deflate.negotiated(answer.extensions, engine.options.inflate_rate)
        tls = transport.get_extra_info("ssl_object") is not None
        ws = WebSocket(engine, transport, raw.target, self.peer, compression, tls=tls)
        ws.group = self.group
        transport.set_protocol(Lender(ws) if tls else ws)  # TLS reads into a lent buffer
        self._transport = None
        engine.opened(ws, reply)
        if rest:
            ws.data_received(rest)

    def _admit(self, request: Request) -> Reply | Awaitable[Reply] | ReadBody | Admitted | None:
        try:
            return self._engine.admit(request)
        except Exception:  # a bug, but one a client may trigger over and over
            failures.error("admission failed", peer=self.peer)
            return Reply(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    # --- requests with a body (bodies.py) --------------------------------------------

    def _with_body(self, data: bytes) -> None:
        """A request other than GET or HEAD: h11 reads its head, admission decides, and
        its body is read (at most what admission allows) before it is answered."""
        reader = bodies.BodyReader()
        head = reader.head(data)
        if isinstance(head, Reply):
            self._refuse(head.body.removeprefix("bad request: ").strip())
            return
        if self._trusted:
            self._client(head.headers)
        request = Request(head.method, head.target, head.headers, self.peer, self.group, self.roles)
        reply = self._admit(request)
        if not isinstance(reply, ReadBody):
            if isinstance(reply, Reply) or inspect.isawaitable(reply):
                self._answer_when(reply, linger=True)
            else:  # admission would upgrade it: not with this method
                allow = {"Allow": "GET, HEAD"}
                text = f"{head.method} is not served here\n"
                self._answer(Reply(http.HTTPStatus.METHOD_NOT_ALLOWED, text, allow), linger=True)
            return
        declared = bodies.declared(head)
        if declared is not None and declared > reply.limit:
            self._answer(bodies.too_big(reply.limit), linger=True)  # before any of it is sent
            return
        reader.limit = reply.limit
        self._body = (reader, reply.then)
        if reader.waits_for_continue and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._more_body(b"")

    def _more_body(self, data: bytes) -> None:
        assert self._body is not None
        reader, then = self._body
        held = reader.held
        result = reader.feed(data)
        grown, budget = reader.held - held, self._engine.budget
        budget.held += grown  # counted in the memory budget
        budget.bodies += grown
        if grown > 0 and not budget.room_for_body(0):
            self._drop_body()  # bodies have a share of memory_limit; past it, no more
            self._answer(SHORT_OF_MEMORY, linger=True)
            return
        if result is None:
            return
        self._drop_body()
        if isinstance(result, Reply):
            self._answer(result, linger=True)
            return
        try:
            reply = then(result)
        except Exception:
            failures.error("request failed", peer=self.peer)
            reply = Reply(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        self._answer_when(reply)

    def _drop_body(self) -> None:
        """What was read of a body is let go of (answered, or the client gone)."""
        if self._body is not None:
            self._engine.budget.held -= self._body[0].held
            self._engine.budget.bodies -= self._body[0].held
            self._body = None

    def _answer_when(
        self, reply: Reply | Awaitable[Reply], *, head_only: bool = False, linger: bool = False
    ) -> None:
        """Answer now, or once the awaitable has the reply (within the open deadline,
        which still runs: a reply that takes longer is not waited for)."""
        if isinstance(reply, Reply):
            self._answer(reply, head_only, linger=linger)
            return
        task = self._task = asyncio.ensure_future(reply)

        def done(_: asyncio.Future[Reply]) -> None:
            self._task = None
            if task.cancelled():
                return
            if (error := task.exception()) is not None:
                failures.error("request failed", peer=self.peer, error=repr(error))
                answer = Reply(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
            else:
                answer = task.result()
            self._answer(answer, head_only, linger=linger)

        task.add_done_callback(done)

    def _parse(self, head: bytes) -> Head | None:
        """The request, or None once it has been answered 400 saying what is wrong."""
        try:
            raw = parse(head)
        except BadRequest as exc:
            if exc.status == http.HTTPStatus.BAD_REQUEST:
                self._refuse(_quoted(exc))
            else:  # a limit
                self._answer(Reply(exc.status, f"{_quoted(exc)}\n", refused=TOO_LARGE))
            return None
        if _UNPRINTABLE.search(raw.target):
            self._refuse(f"control character in the request target: {_quoted(raw.target)}")
            return None
        hosts = len(raw.headers.get_all("Host"))
        if hosts != 1 and raw.version == "HTTP/1.1":
            # RFC 9112 3.2 (and RFC 6455 4.2.1): exactly one Host, or 400.
            self._refuse("missing Host header" if not hosts else "more than one Host header")
            return None
        return raw

    def _client(self, headers: Headers) -> None:
        """From a trusted proxy that sent no PROXY header, the client its
        X-Forwarded-For names becomes the peer (the proxy itself, if it names none). After
        a PROXY header, X-Forwarded-For is never read: the header named the client, and
        a client may write any X-Forwarded-For it likes."""
        addr = self._addr
        forwarded = headers.get_all("X-Forwarded-For")
        if forwarded:
            client = proxy.forwarded_for(forwarded, self._engine.options.trusted_proxies)
            if client is not None:
                addr = client
                self.peer = str(client)
        self._regroup(addr)

    def _answer(self, reply: Reply, head_only: bool = False, *, linger: bool = False) -> None:
        """Plain HTTP: write the reply and close once it is sent. ``linger``: the client
        may still be sending a body; closing with unread bytes would reset the connection
        and could destroy the reply, so our side is shut and what comes is discarded until
        the client closes (or the open deadline)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if reply.refused:
            self._engine.refused(reply.refused, self.peer)
        transport.write(serialize(reply, head_only))
        self._answered = True
        self._drop_body()
        if linger and transport.can_write_eof():
            transport.write_eof()  # data_received discards the rest; eof_received closes
        else:
            transport.close()  # in the table, with its deadline, until it is gone
