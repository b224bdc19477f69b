"""The opening handshake: an ``asyncio.Protocol`` for a connection's first bytes.

It reads the HTTP request head, lets websockets' Sans-I/O ``ServerProtocol`` parse it,
asks admission whether to answer it with plain HTTP (health checks, refusals), and if
not, has ``ServerProtocol.accept`` check the upgrade and negotiate extensions. On a 101
it hands the transport to a ``WebSocket`` with ``set_protocol`` and is dropped: nothing
of the handshake stays in memory for the life of the connection. Bytes the client sent
after the request head, before the 101, are the first bytes of the WebSocket stream.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
from typing import TYPE_CHECKING, cast

import structlog
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from wsechod import __version__
from wsechod.engine.connection import WebSocket
from wsechod.engine.deflate import Deflate
from wsechod.engine.interface import Reply, Request

if TYPE_CHECKING:
    from wsechod.engine.server import Engine

SERVER = f"wsechod/{__version__}"
# Longest request head read before answering 431; websockets allows 8 KiB a line and 128
# headers, but no legitimate upgrade needs more than a few hundred bytes.
MAX_HEAD = 16 * 1024
TOO_LARGE = "head_too_large"  # why a 431 refuses, in /metrics

log = structlog.stdlib.get_logger("wsechod.engine")


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


class Handshake(asyncio.Protocol):
    __slots__ = ("_engine", "_head", "_t", "_timer", "peer")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._head = bytearray()
        self._t: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peer = self._engine.peer_of(transport)
        self._engine.transports += 1  # until connection_lost, whoever owns it then
        if self._engine.out_of_fds():
            self._answer(Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is at capacity\n"))
            return
        self._engine.handshakes.add(self)
        timeout = self._engine.options.open_timeout
        if timeout:
            self._timer = self._engine.loop.call_later(timeout, self.abort)

    def data_received(self, data: bytes) -> None:
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
        self._engine.transports -= 1
        self._finish()

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

    def _request(self, head: bytes, rest: bytes) -> None:
        engine = self._engine
        protocol = ServerProtocol(extensions=engine.extensions, max_size=engine.options.max_size)
        protocol.receive_data(head)
        events = protocol.events_received()
        if not events or not isinstance(events[0], WsRequest):
            why = protocol.handshake_exc
            cause = why.__cause__ if why is not None and why.__cause__ else why
            engine.refused("bad request", self.peer, str(cause))
            self._answer(Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {cause}\n"))
            return
        raw = events[0]
        method = raw.method
        hosts = len(raw.headers.get_all("Host"))
        if hosts != 1 and raw.protocol == "HTTP/1.1":
            # RFC 9112 3.2 (and RFC 6455 4.2.1): exactly one Host, or 400.
            problem = "missing Host header" if not hosts else "more than one Host header"
            engine.refused("bad request", self.peer, problem)
            self._answer(Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {problem}\n"))
            return
        request = Request(method, raw.path, raw.headers, self.peer)
        try:
            reply = engine.admit(request)
        except Exception:  # a hostile request must not become a traceback in a loop
            log.exception("admission failed")
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
        transport.set_protocol(ws)
        self._t = None
        engine.opened(ws)
        if rest:
            ws.data_received(rest)

    def _answer(self, reply: Reply, head_only: bool = False) -> None:
        """Plain HTTP: write the reply and close once it is sent."""
        if self._t is None:
            return
        if reply.refused:
            self._engine.refused(reply.refused, self.peer)
        self._t.write(serialize(reply, head_only))
        self._t.close()
        self._finish()
