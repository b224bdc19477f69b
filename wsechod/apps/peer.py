"""The test peer: echo, and, when a connection's upgrade request asks for it in its query
string (``controls.py``), the behaviours a client must survive: a refused handshake, a slow
one, delayed or fragmented or throttled echoes, a close with a chosen code, a dropped TCP
connection, a protocol violation, unanswered pings or closes, pings of its own, a stream
of messages. Without controls, a connection is echoed exactly as by ``Echo``.

What a connection holds is bounded: echoes waiting for their time (``delay``) are counted
in the memory budget (``hold``) and, past ``HELD_LIMIT`` bytes, the client is not read until
they drain; a ``send`` stream makes its next message only while the client keeps up
(``blocked``); ``throttle`` is the engine's (``engine.throttle``), under ``write_limit``
like any connection's writes. On a drain, echoes not sent yet are dropped: the close
(1001) goes at once.

The controls that act on the connection rather than on the echo (the handshake, pings,
headers, the ending after N messages, throttle) are functions here that the relay calls
too (``admit``, ``start``, ``count``, ``stop``).
"""

import asyncio
import http
import json
from collections import deque
from dataclasses import dataclass, field

from wsechod.apps.controls import Controls, InvalidControl, parse
from wsechod.apps.echo import Echo
from wsechod.engine.frames import OP_BINARY, OP_CONT, OP_TEXT, frame
from wsechod.engine.interface import Admitted, Connection, Reply, Request

HELD_LIMIT = 64 * 2**10  # bytes of waiting echoes a connection may hold before it is paused
ITEM_OVERHEAD = 96  # bytes a waiting echo costs besides its payload (tuple, deque slot)
STREAM_BATCH = 64  # messages a send stream makes before it lets the loop serve others
TICK = 0.01  # seconds: how often a rated stream sends its next messages
# The frames that break the protocol (RFC 6455 5.2), written as they are.
VIOLATIONS = {
    "utf8": b"\x81\x02\xc3\x28",
    "rsv": b"\xb1\x02ok",
    "masked": b"\x81\x82\x01\x02\x03\x04" + bytes((ord("o") ^ 1, ord("k") ^ 2)),
    "opcode": b"\x83\x00",
    "fragmented_control": b"\x09\x00",
    "big_control": b"\x89\x7e\x00\x7e" + b"x" * 126,
    "close_code": b"\x88\x02\x03\xed",
    "continuation": b"\x80\x02ok",
}

# What waits in a connection's queue: a frame to echo (payload, text, first, last), or
# the ending (close, drop, violation): due at the loop's time.
Item = tuple[float, bytes | None, bool, bool, bool]


@dataclass(slots=True)
class Session:
    """One connection's controls and where it is with them."""

    controls: Controls
    greeting: dict[str, object] | None = None  # headers=1: the request, sent first
    received: int = 0  # whole messages
    queue: deque[Item] = field(default_factory=deque)
    held: int = 0  # bytes in the queue
    paused: bool = False
    ended: bool = False
    ping_timer: asyncio.TimerHandle | None = None
    stream_timer: asyncio.TimerHandle | None = None
    pings: int = 0
    streamed: int = 0  # send: messages made so far
    pump: asyncio.TimerHandle | None = None


class TestPeer:
    """Echo with controls (``controls = true``)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._echo = Echo()
        self.degraded, self.families, self.figures = (
            self._echo.degraded, self._echo.families, self._echo.figures,
        )  # fmt: skip

    def blocked(self, conn: Connection) -> None:
        pass

    def admit(self, request: Request) -> Reply | Admitted | None:
        return admit(request, self.max_size, echo=True)

    def opened(self, conn: Connection) -> None:
        session: Session | None = conn.app_data
        if session is None:
            return
        start(conn, session)
        if session.controls.send:
            self._stream(conn, session)
        if ends_after(session) == 0:  # at once
            now = asyncio.get_running_loop().time()
            self._enqueue(conn, session, (now, None, False, True, True))

    def data(self, conn: Connection, payload: bytes, text: bool, first: bool, last: bool) -> None:
        session: Session | None = conn.app_data
        if session is None:
            conn.send(payload, text=text, first=first, last=last)
            return
        if session.ended:
            return
        controls = session.controls
        due = asyncio.get_running_loop().time() + controls.delay
        pieces = split(payload, controls.fragment or len(payload) or 1)
        if controls.fragment and not (session.queue or controls.delay):
            frames = (wire(p, text=text, first=first and b, last=last and e) for p, b, e in pieces)
            conn.send_raw(b"".join(frames))  # one write for the message's frames
        else:
            for piece, begins, ends in pieces:
                self._enqueue(conn, session, (due, piece, text, first and begins, last and ends))
        if last:
            session.received += 1
            if session.received == ends_after(session):
                self._enqueue(conn, session, (due, None, False, True, True))

    def unblocked(self, conn: Connection) -> None:
        session: Session | None = conn.app_data
        if session is not None and session.controls.send and session.stream_timer is None:
            self._stream(conn, session)  # it stopped while the client was behind

    def closed(self, conn: Connection) -> None:
        session: Session | None = conn.app_data
        if session is None:
            return
        stop(session)
        session.queue.clear()
        conn.hold(-session.held)
        session.held = 0

    # --- the queue of echoes and the ending ----------------------------------------------

    def _enqueue(self, conn: Connection, session: Session, item: Item) -> None:
        controls = session.controls
        if not session.queue and not controls.delay:
            self._write(conn, session, item)  # nothing to wait for: at once
            return
        session.queue.append(item)
        size = len(item[1] or b"") + ITEM_OVERHEAD
        session.held += size
        conn.hold(size)
        if session.held > HELD_LIMIT and not session.paused:
            session.paused = True
            conn.pause_reading()
        if session.pump is None:
            self._drain(conn, session)

    def _drain(self, conn: Connection, session: Session) -> None:
        """Write what is due; come back when more is."""
        session.pump = None
        loop = asyncio.get_running_loop()
        queue = session.queue
        while queue:
            item = queue[0]
            now = loop.time()
            if item[0] > now:
                session.pump = loop.call_later(item[0] - now, self._drain, conn, session)
                return
            size = len(item[1] or b"")
            queue.popleft()
            session.held -= size + ITEM_OVERHEAD
            conn.hold(-size - ITEM_OVERHEAD)
            self._write(conn, session, item)
        if session.paused:
            session.paused = False
            conn.resume_reading()

    def _write(self, conn: Connection, session: Session, item: Item) -> None:
        _, payload, text, first, last = item
        if payload is not None:
            if session.controls.fragment:  # framed here: compression would merge them
                conn.send_raw(wire(payload, text=text, first=first, last=last))
            else:
                conn.send(payload, text=text, first=first, last=last)
            return
        end(conn, session)

    # --- what the server sends on its own ------------------------------------------------

    def _stream(self, conn: Connection, session: Session) -> None:
        """``send``: the next messages, as fast as the client reads (rate 0) or at the
        rate asked, never while the client is behind (``blocked``: ``unblocked`` goes
        on), and at most STREAM_BATCH at a time, so that the loop serves the others."""
        session.stream_timer = None
        controls = session.controls
        batch = STREAM_BATCH if not controls.rate else max(1, round(controls.rate * TICK))
        for _ in range(batch):
            if session.streamed >= controls.send or not conn.open or conn.blocked:
                return
            session.streamed += 1
            payload = message(session.streamed, controls.size, text=controls.text)
            conn.send(payload, text=controls.text)
        if session.streamed < controls.send and conn.open:
            delay = batch / controls.rate if controls.rate else 0.0
            loop = asyncio.get_running_loop()
            session.stream_timer = loop.call_later(delay, self._stream, conn, session)


# --- the controls that act on the connection: the test peer's and the relay's ----------


def admit(request: Request, max_size: int, *, echo: bool) -> Reply | Admitted | None:
    """The handshake on the controls' terms: refused (a bad control, ``status``, a
    ``subprotocol`` not offered), or admitted with the connection's ``Session``."""
    try:
        controls = parse(request.path, max_size, echo=echo)
    except InvalidControl as exc:
        return Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {exc}\n", refused="control")
    if controls is None:
        return None
    if controls.status:
        return refusal(controls)
    if controls.subprotocol and controls.subprotocol not in request.subprotocols:
        text = f"bad request: control subprotocol={controls.subprotocol!r}: not offered\n"
        return Reply(http.HTTPStatus.BAD_REQUEST, text, refused="control")
    session = Session(controls)
    if controls.headers:
        session.greeting = {
            "request": f"{request.method} {request.path} HTTP/1.1",
            "headers": [[name, value] for name, value in request.headers.raw_items()],
            "peer": request.peer,
        }
    return Admitted(
        subprotocol=controls.subprotocol or None,
        compress=controls.compress,
        delay=controls.accept_delay,
        throttle=controls.throttle,
        app_data=session,
    )


def start(conn: Connection, session: Session) -> None:
    """The connection opened: pings and closes answered or not, the request sent back
    (``headers``), the server's own pings."""
    controls = session.controls
    conn.answer_pings = not controls.no_pong
    conn.answer_close = not controls.no_close_reply
    if session.greeting is not None:
        session.greeting |= {"subprotocol": conn.subprotocol, "extensions": conn.extensions}
        conn.send(json.dumps(session.greeting).encode(), text=True)
    if controls.ping:
        loop = asyncio.get_running_loop()
        session.ping_timer = loop.call_later(controls.ping, _ping, conn, session)


def ends_after(session: Session) -> int | None:
    """After how many of the client's messages the connection ends (None: it does not)."""
    controls = session.controls
    if controls.close or controls.violate:
        return controls.after
    return controls.drop


def count(conn: Connection, session: Session) -> None:
    """The relay: one more whole message from the client; the ending, if it is due."""
    session.received += 1
    if session.received == ends_after(session) and not session.ended and conn.open:
        end(conn, session)


def end(conn: Connection, session: Session) -> None:
    """close, violate or drop."""
    session.ended = True
    controls = session.controls
    if controls.close:
        conn.close(controls.close, controls.reason)
    elif controls.violate:
        conn.send_raw(VIOLATIONS[controls.violate])
    else:
        conn.drop(reset=controls.reset)


def stop(session: Session) -> None:
    """The connection closed: its timers go."""
    for timer in (session.ping_timer, session.stream_timer, session.pump):
        if timer is not None:
            timer.cancel()


def _ping(conn: Connection, session: Session) -> None:
    if not conn.open:
        return
    session.pings += 1
    conn.ping(str(session.pings).encode())
    loop = asyncio.get_running_loop()
    session.ping_timer = loop.call_later(session.controls.ping, _ping, conn, session)


def wire(payload: bytes, *, text: bool, first: bool, last: bool) -> bytes:
    """One frame of a message, unmasked and uncompressed (RFC 6455 5.2)."""
    opcode = (OP_TEXT if text else OP_BINARY) if first else OP_CONT
    return frame(opcode, payload, fin=last)


def message(number: int, size: int, *, text: bool) -> bytes:
    """A stream message: its number, then filler, ``size`` bytes in all."""
    head = f"{number} ".encode()
    filler = (b"x" if text else b"\x00") * max(0, size - len(head))
    return (head + filler)[:size]


def split(payload: bytes, size: int) -> list[tuple[bytes, bool, bool]]:
    """``payload`` in pieces of at most ``size`` bytes: each with whether it begins and
    ends the frame it came from (an empty payload is one empty piece)."""
    if len(payload) <= size:
        return [(payload, True, True)]
    pieces = range(0, len(payload), size)
    return [(payload[i : i + size], i == 0, i + size >= len(payload)) for i in pieces]


# Headers a status requires (RFC 9110), sent unless the control gives its own.
REQUIRED = {
    http.HTTPStatus.UNAUTHORIZED: ("WWW-Authenticate", 'Bearer realm="wsechod"'),
    http.HTTPStatus.PROXY_AUTHENTICATION_REQUIRED: ("Proxy-Authenticate", 'Basic realm="wsechod"'),
    http.HTTPStatus.METHOD_NOT_ALLOWED: ("Allow", "GET"),
    http.HTTPStatus.UPGRADE_REQUIRED: ("Upgrade", "websocket"),
}


def refusal(controls: Controls) -> Reply:
    """``status=``: the handshake refused with that status, its headers, and the headers
    the status requires; a 304 has no body."""
    status = controls.status
    assert status is not None
    headers: dict[str, str] = {}
    if controls.retry_after is not None:
        headers["Retry-After"] = str(controls.retry_after)
    if controls.location:
        headers["Location"] = controls.location
    if controls.www_authenticate:
        headers["WWW-Authenticate"] = controls.www_authenticate
    if (required := REQUIRED.get(status)) is not None:
        headers.setdefault(*required)
    text = f"{status.value} {status.phrase}: as the status control asked\n"
    return Reply(status, "" if status == http.HTTPStatus.NOT_MODIFIED else text, headers)
