"""What the engine offers applications, and what it asks of them.

Applications (echo, relay) are plain callbacks on a connection: they never see frames,
HTTP, sockets or the event loop's transports, so they can be tested and swapped without
the engine, and the engine can change its I/O without touching them.
"""

import http
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class Family:
    """A metric an application exports (``/metrics`` renders it as ``wsechod_<name>``): a
    ``counter`` or a ``gauge``; with ``labels``, its samples are the figures keyed
    ``name/label/...``. ``merge``: how the figures of several workers add up (``sum``; a
    state such as "connected" is ``min``)."""

    name: str
    kind: str
    doc: str
    labels: tuple[str, ...] = ()
    merge: str = "sum"


@dataclass(slots=True)
class Figures:
    """An application's figures now: plain numbers keyed as its families say, and what
    it reports missing (``/healthz``'s "degraded: ..."), if anything."""

    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


class Listener(NamedTuple):
    """A listening socket and the roles it serves (``public``: WebSocket clients; ``ops``:
    health and metrics; ``api``: the HTTP API), which admission reads from the request."""

    socket: socket.socket
    roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer given instead of the upgrade: a status and a body (one line of text,
    unless ``content_type`` says otherwise). ``refused``: why it refuses a WebSocket
    handshake, a short fixed word counted in ``/metrics``; empty for answers that are
    not refusals (``/healthz``, ``/metrics``)."""

    status: http.HTTPStatus
    body: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "text/plain; charset=utf-8"
    refused: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """The parts of an HTTP request that admission decides on."""

    method: str
    path: str  # with the query string
    headers: Any  # websockets.datastructures.Headers: get(), get_all(), case-insensitive
    peer: str  # the client, behind trusted proxies too
    group: str = ""  # the client's address group for per-address limits; "": none
    roles: frozenset[str] = frozenset(("public", "ops", "api"))  # its listener's

    @property
    def route(self) -> str:
        """The path without the query string."""
        return self.path.partition("?")[0]

    @property
    def subprotocols(self) -> list[str]:
        """The entries of every ``Sec-WebSocket-Protocol`` header, in order."""
        return [
            entry.strip()
            for value in self.headers.get_all("Sec-WebSocket-Protocol")
            for entry in value.split(",")
            if entry.strip()
        ]


# The close a connection gets when its token expires (4401, as for a missing or invalid
# token: the client must authenticate again).
EXPIRED = (4401, "token expired")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, as admission established it (from a token): ``sub``, shown in
    the access log and presence ("": anonymous); whether it may send messages to its
    channel (a read-only member may not); and until when it may stay (the token's expiry,
    seconds since the epoch; None: for ever)."""

    sub: str = ""
    may_publish: bool = True
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """Admission's yes, and what the connection takes from it: the subprotocol to select
    among those the client offered, who it is, and, to refuse a browser in a way its
    script can read (it sees no HTTP status), a close to send at once after the 101
    (code and reason) instead of opening it to the application. The test peer's terms:
    ``compress`` False refuses permessage-deflate, ``delay`` seconds pass before the 101
    is sent, ``throttle`` bytes a second at most are written to it, ``app_data`` becomes
    the connection's."""

    subprotocol: str | None = None
    identity: Identity | None = None
    close: tuple[int, str] | None = None
    compress: bool = True
    delay: float = 0.0
    throttle: int = 0
    app_data: Any = None


@dataclass(frozen=True, slots=True)
class ReadBody:
    """Admission's answer to a request with a body (the HTTP API's POST): read it, at most
    ``limit`` bytes (a larger one gets 413), then ``then(body)`` gives the reply, at once
    or once it is ready (an awaitable: say, what Redis answers)."""

    limit: int
    then: "Callable[[bytes], Reply | Awaitable[Reply]]"


# What the engine asks of admission for each request: refuse or answer it with a reply
# (now, or once an awaitable has it), read its body first, or go on with the WebSocket.
Admission = Callable[[Request], Reply | Awaitable[Reply] | ReadBody | Admitted | None]


class Prepared:
    """A message framed once for many receivers (relay fan-out): connections without
    compression write ``frame`` as it is; compressing ones, the payload compressed once
    per window size (``deflated``, filled by the first of them that needs it)."""

    __slots__ = ("deflated", "frame", "payload", "text")

    def __init__(self, payload: bytes, text: bool, frame: bytes) -> None:
        self.payload = payload
        self.text = text
        self.frame = frame
        self.deflated: dict[int, bytes] = {}  # window bits -> the payload compressed alone


class Connection(Protocol):
    """One open WebSocket connection, as an application sees it."""

    path: str  # the request path, query string included
    peer: str  # "host:port", or the Unix socket's name
    identity: Identity | None  # who it is, when admission checked a token
    subprotocol: str | None  # the one the handshake selected
    dropped: int  # messages an application chose not to send (relay slow consumers)
    app_held: int  # bytes the application said it keeps for this connection (``hold``)
    app_data: Any  # free for the application's per-connection state
    answer_pings: bool  # False: pings go unanswered (the test peer's no_pong)
    answer_close: bool  # False: the client's close frame is not answered (no_close_reply)

    @property
    def open(self) -> bool:
        """True until a close frame has been sent or received: sends are accepted."""

    @property
    def buffered(self) -> int:
        """Bytes accepted by ``send`` and not yet written to the socket."""

    @property
    def received(self) -> int:
        """Whole messages received from the client."""

    @property
    def sent(self) -> int:
        """Whole messages sent to the client."""

    @property
    def blocked(self) -> bool:
        """Whether ``buffered`` went above ``write_limit`` and has not drained since."""

    def send(self, payload: bytes, *, text: bool, first: bool = True, last: bool = True) -> None:
        """Send one frame of a message (a whole message by default). Ignored once the
        connection is closing: RFC 6455 forbids data after a close frame."""

    def send_prepared(self, message: Prepared) -> None:
        """Send a whole message framed by ``prepare`` (the same bytes for everyone)."""

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (a ``CloseCode``, or the application's
        own in 3000-4999); the connection goes away when it completes or after
        ``close_timeout``."""

    def ping(self, payload: bytes) -> None:
        """Send a ping (at most 125 bytes), besides the keepalive's own."""

    def drop(self, *, reset: bool) -> None:
        """End the TCP connection without a close frame: at once with a reset (RST), or
        with a FIN once what is buffered is written. (The test peer's ``drop``.)"""

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is, framed by the caller: the test peer's protocol
        violations, nothing else."""

    @property
    def extensions(self) -> str:
        """The extensions the handshake negotiated, as the 101 said them ("": none)."""

    def pause_reading(self) -> None:
        """Stop reading from this client (it is sending faster than others can take)."""

    def resume_reading(self) -> None:
        """Undo ``pause_reading``; reading goes on once nothing else holds it."""

    def hold(self, nbytes: int) -> None:
        """The application keeps ``nbytes`` more (negative: fewer) for this connection, a
        message it puts together: counted in the process's memory budget, which stops
        reading from it when the process is over (see ``wsechod.engine.budget``)."""


class Application(Protocol):
    """The callbacks the engine makes. They run on the event loop and must not block."""

    def admit(self, request: Request) -> Reply | Admitted | None:
        """Before the upgrade: refuse the request with a reply, accept it (None), or
        accept it on terms (the test peer's: a subprotocol, no compression, a delay)."""

    def opened(self, conn: Connection) -> None: ...

    def data(self, conn: Connection, payload: bytes, text: bool, first: bool, last: bool) -> None:
        """One frame's payload: ``first`` and ``last`` frame of its message."""

    def blocked(self, conn: Connection) -> None:
        """``conn`` has more than ``write_limit`` bytes waiting to be written; the engine
        has stopped reading from it until it drains."""

    def unblocked(self, conn: Connection) -> None:
        """``conn`` has drained (below a quarter of ``write_limit``)."""

    def closed(self, conn: Connection) -> None:
        """The connection is gone; nothing can be sent to it any more."""

    def degraded(self) -> str | None:
        """Why the application works only partly (``/healthz`` shows it), or None."""

    def families(self) -> tuple[Family, ...]:
        """The metrics it exports (the same for every instance of the application)."""

    def figures(self) -> Figures:
        """Its figures now, read at scrape time: nothing is counted for metrics per
        message."""
