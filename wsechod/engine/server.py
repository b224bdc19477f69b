"""The engine: listening sockets in, one protocol object per connection, a table of the
open ones for counts and the drain.

It knows nothing of signals, pidfiles or settings files: it is given its options, an
application, an admission function and a list of listening sockets, and it is told when
to stop accepting, when to close everyone and when to cut what is left.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import resource
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Any

from websockets.extensions import ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    ServerPerMessageDeflateFactory,
    enable_server_permessage_deflate,
)

from wsechod import ratelimit
from wsechod.engine.addresses import format_address
from wsechod.engine.budget import Budget
from wsechod.engine.connection import APP_FAILED, WebSocket, failures
from wsechod.engine.frames import Failure
from wsechod.engine.handshake import Handshake
from wsechod.engine.interface import (
    Admission,
    Admitted,
    Application,
    Listener,
    ReadBody,
    Reply,
    Request,
)
from wsechod.engine.options import Options
from wsechod.log import get_logger

log = get_logger("wsechod.engine")
warn = ratelimit.logger("wsechod.engine")
access = get_logger("wsechod.access")

_DEFLATE = enable_server_permessage_deflate(None)  # websockets' defaults: 12-bit windows
_DEFLATE_EACH = [  # the same, each message compressed on its own
    ServerPerMessageDeflateFactory(
        server_no_context_takeover=True,
        server_max_window_bits=12,
        client_max_window_bits=12,
        compress_settings={"memLevel": 5},
    )
]
# File descriptors kept free for what is not a client: a handshake being refused, log
# files reopened, broker connections, DNS.
FD_HEADROOM = 16
ACCEPT_BATCH = 64  # connections accepted on a TLS listener per loop pass
ACCEPT_RETRY = 0.1  # seconds before accepting again when the process is out of descriptors
# The access log shows this much of a request path (the head may hold 16 KiB of it).
ACCESS_PATH = 512


_TOKEN = re.compile(r"(?<=[?&]token=)[^&#]*")


def loggable(path: str) -> str:
    """A request path as logs show it: at most ACCESS_PATH characters, and the value of a
    ``token`` query parameter masked (it is a credential; proxies' logs are warned about
    in the docs, ours need not add to them)."""
    path = path[:ACCESS_PATH]
    return _TOKEN.sub("***", path) if "token=" in path else path


def code_label(code: int | None) -> str:
    """A close code as a metrics label: clients choose among 2000 codes of 3000-4999, so
    those are counted by range, which keeps the number of series bounded."""
    if code is None:
        return "none"
    return f"{code // 1000}000-{code // 1000}999" if code >= 3000 else str(code)


class Engine:
    """Serves one application on a list of listening sockets."""

    def __init__(
        self,
        options: Options,
        app: Application,
        admit: Admission | None = None,
    ) -> None:
        self.options = options  # replaced by a reload; each connection keeps its own
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.corked: list[WebSocket] = []  # connections whose writes wait for the turn's end
        self.connections: set[WebSocket] = set()  # the table of open connections
        # Accepted, not upgraded yet, oldest first; and the same per address group.
        self.handshakes: dict[Handshake, None] = {}
        self.pending: dict[str, dict[Handshake, None]] = {}
        self.draining = False
        # Set by close_all: the close deadlines of the connections it closed are its own
        # (one timer for all of them, instead of one each).
        self.closing_all = False
        self.upgrading = 0  # handshakes admitted, waiting out the test peer's accept_delay
        self.stats: Counter[str] = Counter()  # plain counts, summed up in the "drained" line
        # Closed connections by who sent the first close frame, the code sent and the code
        # received (code_label): counted at close, never per message.
        self.closes: Counter[tuple[str, str, str]] = Counter()
        self.transports = 0  # accepted and not yet lost: each holds a file descriptor
        self.budget = Budget(self.loop, self.connections, options.memory_limit)
        # Connections per client address group (proxy.group), pending handshakes and open
        # WebSockets, for max_connections_per_ip; a group leaves when its last one goes.
        self.per_address: Counter[str] = Counter()
        self._admit = admit
        self._servers: list[asyncio.AbstractServer] = []
        self._accepting: list[socket.socket] = []  # TLS listeners: accepted here
        self._sockets: list[socket.socket] = []
        self._idle: asyncio.Future[None] | None = None
        self._no_handshakes: asyncio.Future[None] | None = None
        self._pings = itertools.count()
        self._fd_limit = self._fd_base = 0
        self._addresses: list[str] = []
        self.roles: list[frozenset[str]] = []  # each listener's, as addresses
        # Per-connection events are debug lines; deciding once spares a structlog call per
        # connection when nobody reads them.
        self._debug = logging.getLogger("wsechod.engine").isEnabledFor(logging.DEBUG)

    # --- listening -------------------------------------------------------------------

    async def listen(self, listeners: Sequence[Listener]) -> None:
        """Serve each listener's socket; its connections' requests carry its roles."""
        self._fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            self._fd_base = len(os.listdir("/proc/self/fd"))
        except OSError:
            self._fd_base = 64  # no /proc: a guess on the safe side
        self._sockets = [listener.socket for listener in listeners]
        self.budget.start()
        # Read now: once the loop stops accepting on them, uvloop has detached the sockets.
        self._addresses = [format_address(sock.getsockname()) for sock in self._sockets]
        self.roles = [listener.roles for listener in listeners]
        for sock, roles in listeners:
            if self.options.tls is not None:
                # Accepted here, so that TLS is set up (connect_accepted_socket) before
                # anything reads the connection; a reload renews the certificate only.
                sock.listen(self.options.backlog)  # systemd's too, as uvloop does below
                self.loop.add_reader(sock.fileno(), self._accept_tls, sock, roles)
                self._accepting.append(sock)
            else:
                server = await self.loop.create_server(
                    functools.partial(Handshake, self, roles),
                    sock=sock,
                    backlog=self.options.backlog,
                )
                self._servers.append(server)

    def _accept_tls(self, listening: socket.socket, roles: frozenset[str]) -> None:
        """Accept what is waiting on a TLS listener (a batch at a time, so that a flood of
        connections leaves the loop to the others between batches)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for descriptors
                warn.warning("cannot accept", reason=exc.strerror or str(exc))
                self.loop.remove_reader(listening.fileno())
                self.loop.call_later(ACCEPT_RETRY, self._resume_accepting, listening, roles)
                return
            sock.setblocking(False)
            tls = self.options.tls
            assert tls is not None
            Handshake(self, roles).start_tls(sock, tls)
            if self._short_of_fds():
                return  # what the cuts free is closed at the next pass: the rest waits

    def _resume_accepting(self, listening: socket.socket, roles: frozenset[str]) -> None:
        if listening in self._accepting:
            self.loop.add_reader(listening.fileno(), self._accept_tls, listening, roles)

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    def stop_accepting(self) -> None:
        """Synchronous: once this returns, no new connection is accepted (what is still in
        the kernel's backlog stays there, for whoever owns the socket next)."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self._accepting:
            self.loop.remove_reader(sock.fileno())
        self._accepting.clear()

    # --- the table -------------------------------------------------------------------

    def accepted(self, handshake: Handshake) -> bool:
        """A connection was accepted: count its descriptor and its address, and put it in
        the table of pending handshakes. False if accepting it would leave too few file
        descriptors and no room could be made: the caller refuses it.

        When the process runs out, the event loop's accept (libuv) quietly accepts and
        closes the clients it cannot keep: nobody would hear of it. Before that point,
        room is made by cutting the oldest pending handshake of the address group that
        holds the most, if it holds more than the newcomer's would (one address opening
        connections and sending nothing cannot keep the others out); otherwise the
        newcomer is refused, with a 503 and a log line."""
        self.transports += 1
        if self._short_of_fds() and not self._make_room(handshake.group):
            self.stats["refused_open_files_limit"] += 1
            warn.warning(
                "connection refused",
                reason="open files limit",
                limit=self._fd_limit,
                connections=len(self.connections),
                hint="raise the open files limit (ulimit -n, LimitNOFILE=) or lower "
                "max_connections",
            )
            return False
        self.handshakes[handshake] = None
        self.pending.setdefault(handshake.group, {})[handshake] = None
        if handshake.group:
            self.per_address[handshake.group] += 1
        return True

    def _short_of_fds(self) -> bool:
        if self._fd_limit == resource.RLIM_INFINITY:
            return False
        return self._fd_base + self.transports + FD_HEADROOM >= self._fd_limit

    def _make_room(self, group: str) -> bool:
        """Cut the oldest pending handshake of the heaviest address group, if it is
        heavier than ``group`` would be with one more."""
        if not self.pending:
            return False
        heaviest, waiting = max(self.pending.items(), key=lambda item: len(item[1]))
        if len(waiting) <= len(self.pending.get(group, ())) + 1:
            return False
        oldest = next(iter(waiting))
        self.stats["handshakes_cut"] += 1
        warn.warning(
            "pending handshake cut",
            reason="open files limit",
            client=heaviest or "unnamed",
            pending=len(waiting),
        )
        oldest.abort()
        return True

    def over_limit(self, group: str) -> bool:
        """Whether ``group`` holds more connections than ``max_connections_per_ip``."""
        limit = self.options.max_connections_per_ip
        return bool(limit and group and self.per_address.get(group, 0) > limit)

    def regroup(self, handshake: Handshake, group: str) -> None:
        """A trusted proxy named the client of a pending handshake: count it there."""
        if handshake not in self.handshakes or group == handshake.group:
            handshake.group = group
            return
        self._leave(handshake)
        handshake.group = group
        self.pending.setdefault(group, {})[handshake] = None
        if group:
            self.per_address[group] += 1

    def handshake_done(self, handshake: Handshake, *, upgraded: bool = False) -> None:
        """Out of the table of pending handshakes (once); upgraded, its connection stays
        counted for its address until it closes."""
        if self.handshakes.pop(handshake, False) is None:
            self._leave(handshake, count=not upgraded)
        waiter = self._no_handshakes
        if not self.handshakes and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _leave(self, handshake: Handshake, *, count: bool = True) -> None:
        group = handshake.group
        waiting = self.pending.get(group)
        if waiting is not None:
            waiting.pop(handshake, None)
            if not waiting:
                del self.pending[group]
        if count and group:
            self._uncount(group)

    def _uncount(self, group: str) -> None:
        left = self.per_address[group] - 1
        if left > 0:
            self.per_address[group] = left
        else:
            del self.per_address[group]

    def lost(self) -> None:
        """A connection that never became a WebSocket is gone: its descriptor too."""
        self.transports -= 1

    def reconfigure(self, options: Options) -> None:
        """A reload: new connections get ``options``; open ones keep theirs."""
        self.options = options
        self.budget.limit = options.memory_limit
        self._debug = logging.getLogger("wsechod.engine").isEnabledFor(logging.DEBUG)

    @property
    def extensions(self) -> list[ServerExtensionFactory] | None:
        """What a new handshake may negotiate."""
        if not self.options.compression:
            return None
        return list(_DEFLATE if self.options.compression_context else _DEFLATE_EACH)

    def set_admission(self, admit: Admission) -> None:
        """Admission reads the engine's state (draining, connections), so it comes after."""
        self._admit = admit

    def admit(self, request: Request) -> Reply | Awaitable[Reply] | ReadBody | Admitted | None:
        return None if self._admit is None else self._admit(request)

    def connections_from(self, group: str) -> int:
        """Connections from an address group (``Request.group``): pending handshakes and
        open WebSockets."""
        return self.per_address.get(group, 0)

    def opened(self, ws: WebSocket, admitted: Admitted | None = None) -> None:
        """A WebSocket is open: in the table, and the application's, unless admission
        said to close it at once (then the application never hears of it)."""
        self.connections.add(ws)
        self.stats["connections_opened"] += 1
        if admitted is not None:
            ws.identity = identity = admitted.identity
            ws.subprotocol = admitted.subprotocol
            ws.app_data = admitted.app_data
            if admitted.close is not None:
                ws.close(*admitted.close)
                return
            if identity is not None and identity.expires is not None:
                ws.expire_at(identity.expires)
        ws.member = True
        if self._debug:
            log.debug("connection open", peer=ws.peer, path=loggable(ws.path))
        try:
            self.app.opened(ws)
        except Exception:  # a bug, but one a client may trigger over and over
            failures.error("application failed on open", peer=ws.peer)
            ws.close(APP_FAILED.code, APP_FAILED.reason)

    def closed(self, ws: WebSocket) -> None:
        """A connection is gone: its file descriptor, its place in the table."""
        self.transports -= 1
        if ws not in self.connections:
            return
        self.connections.discard(ws)
        if ws.group:
            self._uncount(ws.group)
        stats = self.stats
        stats["connections_closed"] += 1
        stats["messages_in"] += ws.received
        stats["messages_out"] += ws.sent
        stats["bytes_in"] += ws.bytes_in
        stats["bytes_out"] += ws.bytes_out
        stats["text_in"] += ws.text_in
        stats["text_out"] += ws.text_out
        closed_by = ws.closed_by or "none"
        self.closes[closed_by, code_label(ws.code_sent), code_label(ws.code_received)] += 1
        if ws.member:
            try:
                self.app.closed(ws)
            except Exception:
                failures.error("application failed on close", peer=ws.peer)
        if self._debug:
            log.debug(
                "connection closed",
                peer=ws.peer,
                code_sent=ws.code_sent,
                code_received=ws.code_received,
                received=ws.received,
                sent=ws.sent,
                dropped=ws.dropped,
            )
        if self.options.access_log:
            access.info(
                "access",
                peer=ws.peer,
                path=loggable(ws.path),
                sub=None if ws.identity is None else ws.identity.sub,
                duration=round(self.loop.time() - ws.opened_at, 3),
                messages_in=ws.received,
                messages_out=ws.sent,
                bytes_in=ws.bytes_in,
                bytes_out=ws.bytes_out,
                code_sent=ws.code_sent,
                code_received=ws.code_received,
                closed_by=closed_by,
                dropped=ws.dropped,
            )
        if not self.connections and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def failed(self, ws: WebSocket, failure: Failure) -> None:
        """A connection failed (protocol violation, keepalive): the client's doing, so
        it is counted and logged at debug only."""
        code = int(failure.code)  # a number in logs and stats
        self.stats[f"failed_{code}"] += 1
        if self._debug:
            log.debug("connection failed", peer=ws.peer, code=code, reason=failure.reason)

    def refused(self, reason: str, peer: str, detail: str = "") -> None:
        """A handshake answered with an HTTP error instead of the upgrade."""
        self.stats[f"refused_{reason.replace(' ', '_')}"] += 1
        if self._debug:
            log.debug("handshake refused", peer=peer, reason=reason, detail=detail)

    def tls_failed(self, peer: str, exc: BaseException) -> None:
        """A TLS handshake failed: a client that does not trust us, that we do not trust
        (mutual TLS), or that does not speak TLS. The client's doing: debug only."""
        self.stats["tls_handshake_failed"] += 1
        if self._debug:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else None
            error = reason or str(exc) or type(exc).__name__
            log.debug("tls handshake failed", peer=peer, error=error)

    def uncork(self) -> None:
        corked, self.corked = self.corked, []
        for ws in corked:
            ws.flush()

    def next_ping(self) -> bytes:
        return (next(self._pings) & 0xFFFFFFFF).to_bytes(4, "big")

    # --- stopping --------------------------------------------------------------------

    def close_all(self, code: int, reason: str) -> int:
        """Send every open connection a close frame at once (and a 503 to handshakes
        that wait out accept_delay); returns how many connections. Those that have not
        closed at their ``close_timeout`` are cut, by one timer per value of it rather
        than one per connection (a drain of 100,000 creates and cancels two each)."""
        for handshake in list(self.handshakes):
            handshake.refuse_if_delayed()
        self.closing_all = True
        by_timeout: dict[float, list[WebSocket]] = {}
        for ws in list(self.connections):
            ws.close(code, reason)
            by_timeout.setdefault(ws.close_timeout, []).append(ws)
        for timeout, closing in by_timeout.items():
            if timeout:
                self.loop.call_later(timeout, self._cut, closing)
        return sum(map(len, by_timeout.values()))

    def _cut(self, closing: list[WebSocket]) -> None:
        for ws in closing:
            if ws in self.connections:
                ws.abort()

    async def wait_closed(self, within: float, force: asyncio.Future[Any]) -> None:
        """Until the table is empty, ``within`` seconds have passed or ``force`` resolves."""
        if not self.connections:
            return
        self._idle = self.loop.create_future()
        try:
            await asyncio.wait(
                [self._idle, force], timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._idle = None

    async def finish_handshakes(self, within: float) -> None:
        """After the listeners have closed: connections accepted just before get a short
        time to send their request and hear 503, rather than a silent close."""
        if not self.handshakes:
            return
        self._no_handshakes = self.loop.create_future()
        try:
            await asyncio.wait([self._no_handshakes], timeout=within)
        finally:
            self._no_handshakes = None

    def abort_all(self) -> int:
        """Cut every connection still open or still in its handshake; returns how many
        WebSocket connections had to be cut."""
        stop_listening = list(self.handshakes)
        for handshake in stop_listening:
            handshake.abort()
        left = list(self.connections)
        for ws in left:
            ws.abort()
        return len(left)

    def close_sockets(self) -> None:
        """The listening sockets we own are closed last, so that clients arriving during
        the drain get a definite 503 rather than a refused connection."""
        self.stop_accepting()
        self.budget.stop()
        for sock in self._sockets:
            sock.close()
