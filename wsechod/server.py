"""The WebSocket server: websockets' ``serve`` configured from settings, the operations
endpoints answered in ``process_request``, connection limits, and the drain.

It knows nothing of signals or processes: it is started on a list of listening sockets and
drained when the runtime says so.
"""

import asyncio
import http
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from wsechod import __version__
from wsechod.settings import Settings


@dataclass(slots=True)
class Tally:
    """Messages a handler took from its client and sent back to it; logged at close, so
    an operator (and the drain test) can see that nothing vanished in between."""

    received: int = 0
    sent: int = 0
    dropped: int = 0  # relay: messages not delivered because this client read too slowly


Handler = Callable[[ServerConnection, Tally], Awaitable[None]]
# An HTTP answer given instead of the upgrade: status, one-line body, extra headers.
Reply = tuple[http.HTTPStatus, str, dict[str, str]]

SERVER_HEADER = f"wsechod/{__version__}"
SHUTDOWN_REASON = "server shutting down"
# After the drain deadline, connections are cut; this is how long we then wait for the
# library to notice before giving up on it (the process is about to exit anyway).
ABORT_GRACE = 1.0

log = structlog.stdlib.get_logger("wsechod.server")


def _seconds(value: float) -> float | None:
    """Settings use 0 for "no limit"; websockets uses None."""
    return value or None


@dataclass(frozen=True, slots=True)
class DrainReport:
    connections: int
    force_closed: int
    duration: float


class Server:
    """Serves one handler on a list of listening sockets, and drains them on request."""

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        admit: Callable[[str], Reply | None] | None = None,
        degraded: Callable[[], str | None] | None = None,
        handoff: bool = False,
    ) -> None:
        """``admit(path)`` may refuse an upgrade with an HTTP reply (relay limits);
        ``degraded()`` says why the service works only partly (/healthz shows it);
        ``handoff``: the sockets belong to systemd, which keeps them open for the next
        process, so a drain stops accepting at once and newcomers wait for that process."""
        self.handoff = handoff
        self.settings = settings
        self.handler = handler
        self.admit = admit
        self.degraded = degraded
        self.draining = False
        self.active: set[ServerConnection] = set()
        self._idle = asyncio.Event()
        self._late = 0  # connections whose handshake completed during the drain
        self._servers: list[WsServer] = []
        # Operations endpoints, answered on the WebSocket port (design: HTTP for operations).
        self._endpoints: dict[str, Callable[[], Reply]] = {"/healthz": self._health}

    async def start(self, sockets: list[socket.socket]) -> None:
        s = self.settings
        for sock in sockets:
            server = await serve(
                self._handle,
                sock=sock,
                process_request=self._process_request,
                server_header=SERVER_HEADER,
                compression="deflate" if s.compression == "deflate" else None,
                open_timeout=_seconds(s.open_timeout),
                ping_interval=_seconds(s.ping_interval),
                ping_timeout=_seconds(s.ping_timeout),
                close_timeout=_seconds(s.close_timeout),
                max_size=s.max_size,
                max_queue=s.max_queue,
                write_limit=s.write_limit,
            )
            self._servers.append(server)

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Answer what is not a WebSocket session before websockets tries the upgrade."""
        try:
            refusal = self._refusal(request)
        except Exception as exc:  # a hostile request must not become a traceback
            log.warning("bad request", peer=ws.remote_address, error=repr(exc))
            refusal = http.HTTPStatus.BAD_REQUEST, "bad request\n", {}
        if refusal is None:
            return None
        status, text, headers = refusal
        response = ws.respond(status, text)
        response.headers.update(headers)
        return response

    def _refusal(self, request: Request) -> Reply | None:
        if request.method != "GET":
            return http.HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served\n", {"Allow": "GET"}
        endpoint = self._endpoints.get(request.path.partition("?")[0])
        if endpoint is not None:
            return endpoint()
        if self.draining:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n", {}
        if "websocket" not in ",".join(request.headers.get_all("Upgrade")).lower():
            text = "this is a WebSocket server; connect with a WebSocket client\n"
            return http.HTTPStatus.UPGRADE_REQUIRED, text, {"Upgrade": "websocket"}
        limit = self.settings.max_connections
        if limit and len(self.active) >= limit:
            log.warning("connection refused", reason="max_connections", limit=limit)
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", {}
        return None if self.admit is None else self.admit(request.path)

    def _health(self) -> Reply:
        """200 while serving, 503 while draining, so load balancers stop sending clients."""
        if self.draining:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", {}
        why = None if self.degraded is None else self.degraded()
        # Still 200: this instance serves its own clients; the body tells what is missing.
        return http.HTTPStatus.OK, "ok\n" if why is None else f"degraded: {why}\n", {}

    async def _handle(self, ws: ServerConnection) -> None:
        self.active.add(ws)
        tally = Tally()
        log.debug("connection open", peer=ws.remote_address, path=ws.request and ws.request.path)
        try:
            if self.draining:  # the handshake finished just as the drain began
                self._late += 1
                await ws.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
            else:
                await self.handler(ws, tally)
        except ConnectionClosed:
            pass  # a client vanishing is ordinary; the close codes are logged below
        finally:
            self.active.discard(ws)
            if not self.active:
                self._idle.set()
            sent, rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
            log.debug(
                "connection closed",
                peer=ws.remote_address,
                code_sent=sent and sent.code,
                code_received=rcvd and rcvd.code,
                received=tally.received,
                sent=tally.sent,
                dropped=tally.dropped,
            )

    def stop_accepting(self) -> None:
        """With systemd's sockets: stop accepting now, before the stop is announced.

        websockets' ``Server.close()`` only schedules the close, so a handed-over socket
        would accept for at least one more loop pass; the asyncio server under it closes
        its listeners synchronously.
        """
        if self.handoff:
            for server in self._servers:
                server.server.close()

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in server.sockets]

    async def drain(self, force: asyncio.Future[str]) -> DrainReport:
        """Refuse new clients, close open ones with 1001, cut what is left at the deadline.

        Our own listening sockets stay open until the end so that health checks and new
        clients get a definite HTTP 503 instead of a refused or hanging connection; sockets
        handed over by systemd stop being accepted at once (see ``handoff``).
        """
        started = time.monotonic()
        self.draining = True
        self.stop_accepting()
        connections = list(self.active)
        closing = {
            asyncio.create_task(ws.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON))
            for ws in connections
        }
        if self.active:
            self._idle.clear()
            idle: asyncio.Future[Any] = asyncio.ensure_future(self._idle.wait())
            await asyncio.wait(
                [idle, force],
                timeout=self.settings.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            idle.cancel()
        left = list(self.active)
        for ws in left:
            ws.transport.abort()
        for server in self._servers:
            server.close(close_connections=False)
        waiters = [asyncio.ensure_future(server.wait_closed()) for server in self._servers]
        _, pending = await asyncio.wait([*waiters, *closing], timeout=ABORT_GRACE)
        for task in pending:
            task.cancel()
        closed = len(connections) + self._late
        return DrainReport(closed, len(left), time.monotonic() - started)
