"""One open WebSocket connection: an ``asyncio.Protocol`` that parses frames as bytes
arrive and hands each frame's payload to the application, in stream order.

No Task, queue or coroutine: the event loop calls ``data_received`` and everything a
frame causes (the echo, the pong, the close) is written before the next frame is read,
so answers leave in the order their causes arrived, and a protocol violation is answered
after everything that came before it.

Writes are corked (as uWebSockets does): what a connection is given to send during one
turn of the loop waits in a list and goes to its transport in one write (a ``writev``)
once the loop has handled every read of that turn (``flush``, called by the engine's
``uncork``): a pipelining client's echoes, or a subscriber's messages from several
publishers, cost one system call, and one message alone waits for nothing but the end of
the turn. Anything that needs the transport's true state (closing it, its buffer size)
flushes first.

Memory per connection is bounded whatever the client sends: one frame being assembled
(at most ``max_size``), the transport's buffer and the turn's corked writes (reading
stops once they hold more than ``write_limit``; one frame may overshoot it), and what
was read but not yet parsed while reading is paused (at most one read, 256 KiB with
uvloop).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import socket
import struct
import time
from typing import Any, Protocol

from wsechod import ratelimit
from wsechod.engine import frames
from wsechod.engine.budget import Budget
from wsechod.engine.deflate import Corrupt, Deflate, TooBig, compress_whole
from wsechod.engine.frames import (
    HEADERS,
    INVALID_UTF8,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    CloseCode,
    Failure,
    apply_mask,
    valid_utf8,
)
from wsechod.engine.interface import EXPIRED, Application, Identity, Prepared
from wsechod.engine.options import Options

# States. Reading goes on in CLOSING (we sent a close frame and wait for the client's);
# in CLOSED nothing more is parsed.
OPEN, CLOSING, CLOSED = 1, 2, 3
# Why reading is paused: our own write buffer is full, the application asked, this
# connection has had its turn of the event loop, the process is over its memory budget, or
# the connection is over its inflate budget.
PAUSED_WRITE, PAUSED_APP, PAUSED_TURN, PAUSED_MEMORY, PAUSED_INFLATE = 1, 2, 4, 8, 16
# Work a connection may do before it lets the others have the loop: a unit per frame and
# per 4 KiB of payload (inflated, for compressed frames). Without it one client sending
# tiny frames, or small frames that inflate to much, could hold everyone else for seconds.
TURN = 256
# A frame bigger than this is unmasked from a memoryview instead of a copy.
_VIEW_FROM = 4096
_Decoder = codecs.getincrementaldecoder("utf-8")
_TEXT, _BINARY = HEADERS[0x80 | OP_TEXT], HEADERS[0x80 | OP_BINARY]
_PONG, _PING, _CLOSE = HEADERS[0x80 | OP_PONG], HEADERS[0x80 | OP_PING], HEADERS[0x80 | OP_CLOSE]
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
APP_FAILED = Failure(CloseCode.INTERNAL_ERROR, "internal error")
KEEPALIVE_TICK = 0.25  # seconds: keepalive deadlines are rounded up to a multiple of it
MIN_TICK = 0.001  # below it (a ping_interval under 16 ms), deadlines are not rounded
KEEPALIVE_TIMEOUT = Failure(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
SHORT_OF_MEMORY = "server is short of memory"
_NO_STATUS = int(CloseCode.NO_STATUS_RCVD)

# An application's exception is a bug, but a client can trigger it over and over.
failures = ratelimit.logger("wsechod.engine")


class Host(Protocol):
    """What a connection asks of the engine that accepted it."""

    app: Application
    options: Options  # a connection keeps those of the moment it opened
    loop: asyncio.AbstractEventLoop
    budget: Budget

    corked: list[WebSocket]  # connections with corked writes, flushed by uncork
    closing_all: bool  # a drain: the close deadlines are the engine's

    def next_ping(self) -> bytes:
        """A keepalive ping's payload, unique among the pings in flight."""

    def uncork(self) -> None:
        """Flush every corked connection (once a turn of the loop, when there are some)."""

    def closed(self, ws: WebSocket) -> None:
        """``ws`` is gone, and its file descriptor with it."""

    def failed(self, ws: WebSocket, failure: Failure) -> None:
        """``ws`` failed (7.1.7): counted and logged."""


class WebSocket(asyncio.Protocol):
    """Takes over the transport from the handshake once the 101 has been written."""

    __slots__ = (
        "_app",
        "_budget",
        "_buf",
        "_checked",
        "_compressed",
        "_deflate",
        "_engine",
        "_expiry",
        "_join",
        "_max_size",
        "_msg",
        "_msg_size",
        "_need",
        "_options",
        "_out",
        "_out_limit",
        "_out_size",
        "_parsing",
        "_paused",
        "_ping",
        "_ping_at",
        "_state",
        "_timer",
        "_transport",
        "_utf8",
        "answer_close",
        "answer_pings",
        "app_data",
        "app_held",
        "binary_in",
        "binary_out",
        "blocked",
        "bytes_in",
        "bytes_out",
        "closed_by",
        "code_received",
        "code_sent",
        "dropped",
        "group",
        "identity",
        "member",
        "opened_at",
        "path",
        "peer",
        "subprotocol",
        "text_in",
        "text_out",
    )

    def __init__(
        self,
        engine: Host,
        transport: asyncio.Transport,
        path: str,
        peer: str,
        deflate: Deflate | None,
        *,
        tls: bool = False,
    ) -> None:
        self._engine = engine
        self._app: Application = engine.app
        self._transport = transport
        self._deflate = deflate
        # The options of the moment it opened: a reload changes them for new connections.
        self._options = options = engine.options
        self._max_size = options.max_size
        self._buf: bytearray | None = None  # bytes read but not parsed yet
        self._need = 0  # with _buf: how many bytes the frame at its start needs
        self._msg = 0  # opcode of the fragmented message in progress, 0 if none
        self._msg_size = 0
        self._compressed = False  # the message in progress is compressed
        self._utf8: Any = None  # incremental decoder of a text message in progress
        self._paused = 0  # why reading is paused: PAUSED_* bits
        self._budget = TURN
        self._parsing = False
        self._state = OPEN
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] | None = None  # corked writes, flushed at the turn's end
        self._out_size = 0
        self._out_limit = options.write_limit
        self._join = tls  # a flush is one TLS record, not one per frame
        self._ping: bytes | None = None  # keepalive ping awaiting its pong
        self._ping_at = engine.loop.time()
        self._checked = 0  # bytes of the text frame still arriving already checked
        self.path = path
        self.peer = peer
        self.group = ""  # the client's address group (proxy.group), counted by the engine
        self.identity: Identity | None = None  # who it is, if admission checked a token
        self.subprotocol: str | None = None  # the one the handshake selected
        self.member = False  # the application was told it opened (and will be, that it closed)
        self._expiry: asyncio.TimerHandle | None = None  # its token's
        self.app_data: Any = None
        self.answer_pings = self.answer_close = True  # the test peer may turn them off
        self.app_held = 0  # bytes the application keeps for it (``hold``)
        self.blocked = False
        # Whole messages, by type: counted apart rather than a total and the text ones, so
        # that a message costs one increment, as a plain count would.
        self.text_in = self.binary_in = self.text_out = self.binary_out = 0
        self.dropped = 0
        self.bytes_in = self.bytes_out = 0
        self.code_sent: int | None = None
        self.code_received: int | None = None
        self.closed_by: str | None = None  # who sent the first close frame: client, server
        self.opened_at = engine.loop.time()
        limit = options.write_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        if options.ping_interval:
            self._keepalive_later(options.ping_interval)

    # --- what applications call ------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._state == OPEN

    @property
    def buffered(self) -> int:
        self.flush()
        return self._transport.get_write_buffer_size()

    @property
    def received(self) -> int:
        return self.text_in + self.binary_in

    @property
    def sent(self) -> int:
        return self.text_out + self.binary_out

    def send(  # noqa: PLR0912 - inline
        self, payload: bytes, *, text: bool, first: bool = True, last: bool = True
    ) -> None:
        if self._state != OPEN:
            return
        n = len(payload)
        if n < 126 and first and last and self._deflate is None:  # the common case, inline
            if text:
                data = _TEXT[n] + payload
                self.text_out += 1
            else:
                data = _BINARY[n] + payload
                self.binary_out += 1
            out = self._out
            if out is None:
                self._cork(data)
            else:  # uncounted in _out_size: small frames, at most what the turn read
                out.append(data)
            self.bytes_out += n
            return
        deflate = self._deflate
        if deflate is None:
            opcode, rsv1 = (OP_TEXT if text else OP_BINARY) if first else OP_CONT, False
        elif last:
            opcode, rsv1, payload = deflate.end(payload, text, first)
        else:  # held until the loop has handled this read (deflate.py: why)
            if deflate.hold(payload, text, first):
                self._engine.loop.call_soon(self._flush_held)
            return
        n = len(payload)
        if n < 126:
            self._write(
                HEADERS[(0x80 if last else 0) | (0x40 if rsv1 else 0) | opcode][n] + payload
            )
        elif n < _VIEW_FROM:
            self._write(frames.header(opcode, n, last, rsv1) + payload)
        else:  # no copy of a big payload: the transport keeps both parts
            self._writelines((frames.header(opcode, n, last, rsv1), payload))
        self.bytes_out += n
        if last:
            if text:
                self.text_out += 1
            else:
                self.binary_out += 1

    def _write(self, data: bytes) -> None:
        """Corked: into this turn's list, the engine told to flush at the turn's end; past
        ``write_limit`` at once (the transport's flow control then sees it as usual)."""
        out = self._out
        if out is None:
            self._cork(data)
            return
        out.append(data)
        self._out_size += len(data)
        if self._out_size > self._out_limit:
            self.flush()

    def _cork(self, data: bytes) -> None:
        """The turn's first write: a list for it, and the engine told."""
        self._out = [data]
        self._out_size = len(data)
        engine = self._engine
        corked = engine.corked
        if not corked:
            engine.loop.call_soon(engine.uncork)
        corked.append(self)

    def _writelines(self, parts: tuple[bytes, ...] | list[bytes]) -> None:
        for part in parts:
            self._write(part)

    def flush(self) -> None:
        """What this turn corked, to the transport: one write (a writev with uvloop; over
        TLS joined first, so that it is one record, not one per frame)."""
        out = self._out
        if out is None:
            return
        self._out = None
        if len(out) == 1:
            self._transport.write(out[0])
        elif self._join:
            self._transport.write(b"".join(out))
        else:
            self._transport.writelines(out)

    def _flush_held(self) -> None:
        """The compressed fragments ``send`` held go out as one frame: once the loop has
        handled the read that brought them, or before another frame (a pong, a close)."""
        if self._deflate is None or self._state != OPEN:
            return
        frame = self._deflate.flush()
        if frame is not None:
            self._writelines(frame)
            self.bytes_out += len(frame[1])

    def send_prepared(self, message: Prepared) -> None:
        if self._state != OPEN:
            return
        deflate = self._deflate
        if deflate is not None:  # compressed once for every member with this window
            bits = deflate.out_bits
            payload = message.deflated.get(bits)
            if payload is None:
                payload = message.deflated[bits] = compress_whole(message.payload, bits)
            opcode = OP_TEXT if message.text else OP_BINARY
            self._writelines((frames.header(opcode, len(payload), rsv1=True), payload))
            deflate.sent_whole()
            self.bytes_out += len(payload)
        else:
            self._write(message.frame)
            self.bytes_out += len(message.payload)
        if message.text:
            self.text_out += 1
        else:
            self.binary_out += 1

    def close(self, code: int, reason: str = "") -> None:
        """Our side starts the closing handshake (drain, slow consumer, keepalive): ``code``
        a ``CloseCode``, or an application's own (3000-4999)."""
        if self._state != OPEN:
            return
        self._write_close(code, reason)
        self._state = CLOSING
        self._close_later()
        self._resume_for(PAUSED_APP)  # its close frame must be read; its data is only counted

    def expire_at(self, when: float) -> None:
        """Close it at ``when`` (seconds since the epoch): its token expires then. A
        client renews by connecting again with a new token."""
        delay = max(when - time.time(), 0.0)
        self._expiry = self._engine.loop.call_later(delay, self.close, *EXPIRED)

    def pause_reading(self) -> None:
        self._pause_for(PAUSED_APP)

    def resume_reading(self) -> None:
        self._resume_for(PAUSED_APP)

    def hold(self, nbytes: int) -> None:
        nbytes = max(nbytes, -self.app_held)  # never below nothing, whatever comes late
        self.app_held += nbytes
        self._grew(nbytes)

    # --- the memory budget (``budget.py``) -------------------------------------------

    @property
    def holding(self) -> bool:
        """Part of a frame is buffered, or the application holds part of a message."""
        return self._buf is not None or self.app_held > 0

    @property
    def weight(self) -> int:
        """What closing it would let go of."""
        buf = self._buf
        held = (0 if buf is None else len(buf)) + self.app_held
        return held + self.buffered if self.blocked else held

    def memory_pause(self) -> None:
        self._pause_for(PAUSED_MEMORY)

    def memory_resume(self) -> None:
        self._resume_for(PAUSED_MEMORY)

    def close_for_memory(self, code: CloseCode) -> None:
        """Closed to bring the process back under its budget: what it holds is let go of
        now; a client that does not read its buffer cannot take the close frame."""
        self._fail(Failure(code, SHORT_OF_MEMORY))
        if self.blocked:
            self.abort()

    def _grew(self, nbytes: int) -> None:
        budget = self._engine.budget
        budget.held += nbytes
        if nbytes > 0 and budget.held + budget.outgoing > budget.limit:
            budget.pause(self)

    def _set_buf(self, buf: bytearray | None) -> None:
        old = self._buf
        self._buf = buf
        self._engine.budget.held += (0 if buf is None else len(buf)) - (
            0 if old is None else len(old)
        )

    # --- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._state == CLOSED:
            return  # 7.1.7 / 1.4: after the close, what arrives is discarded
        buf = self._buf
        if buf is None:
            used = self._parse(data)
            if used < len(data) and self._state != CLOSED:
                self._buf = buf = bytearray(memoryview(data)[used:])
                self._grew(len(buf))
                if self._need:  # a frame still arriving
                    self._check_partial_text(buf)
            return
        buf += data
        self._grew(len(data))
        if len(buf) < self._need:
            self._check_partial_text(buf)
            return
        self._continue()

    def eof_received(self) -> bool | None:
        """The client closed its side (a FIN, or TLS's close_notify): nothing it sent can
        be answered any more, so what is still buffered is dropped, and ours is closed
        (connection_lost follows)."""
        self._state = CLOSED
        self._set_buf(None)
        return False

    def pause_writing(self) -> None:
        self.blocked = True
        self._engine.budget.blocked.add(self)
        self._pause_for(PAUSED_WRITE)
        self._app.blocked(self)

    def resume_writing(self) -> None:
        self.blocked = False
        self._engine.budget.blocked.discard(self)
        self._app.unblocked(self)
        self.flush()  # what the application wrote meanwhile goes out: it may fill it again
        if self.blocked:
            return
        self._resume_for(PAUSED_WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        engine = self._engine
        self._state = CLOSED
        self._out = None
        self._set_buf(None)
        if self._deflate is not None:  # zlib's state (about 50 KiB) goes now
            self._deflate.close()
            self._deflate = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        engine.closed(self)
        engine.budget.forget(self)
        self.hold(-self.app_held)  # what the application did not let go of itself

    # --- parsing ---------------------------------------------------------------------

    def _continue(self) -> None:
        """Parse what is buffered (after more data, or once reading may go on)."""
        buf = self._buf
        assert buf is not None
        used = self._parse(buf)
        if self._buf is not None and used:  # not closed meanwhile
            # A fresh buffer for the rest: deleting the front of a bytearray keeps its
            # allocation, which would pin a whole max_size frame per idle connection.
            self._set_buf(bytearray(memoryview(buf)[used:]) if used < len(buf) else None)
            buf = self._buf
            if self._need and buf is not None:  # a frame still arriving
                self._check_partial_text(buf)

    def _parse(self, buf: bytes | bytearray) -> int:  # noqa: PLR0911, PLR0912, PLR0915 - inline
        """Handle every whole frame at the start of ``buf``; return the bytes used."""
        end = len(buf)
        pos = 0
        self._need = 0
        self._parsing = True
        try:
            max_size = self._max_size
            while end - pos >= 2 and not self._paused and self._state != CLOSED:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                length = b1 & 0x7F
                start = pos + 6
                if (
                    (b0 == 0x82 or b0 == 0x81)  # noqa: PLR1714 - faster than "in" here
                    and length < 126
                    and b1 & 0x80
                    and not self._msg
                    and length <= max_size
                    and not self._checked  # not one whose start was checked already
                ):
                    # The common case, inline: a whole message in one small masked frame.
                    stop = start + length
                    if stop > end:
                        self._need = stop - pos
                        break
                    payload = apply_mask(buf[start:stop], buf[pos + 2 : start])
                    pos = stop
                    self.bytes_in += length
                    text = b0 == 0x81
                    if text:
                        if not payload.isascii() and not valid_utf8(payload):
                            return self._fail(INVALID_UTF8, end)
                        self.text_in += 1
                    else:
                        self.binary_in += 1
                    if self._state == OPEN:
                        try:
                            self._app.data(self, payload, text, True, True)
                        except Exception:
                            return self._app_failed(end)
                    self._budget -= 1
                    if self._budget <= 0:
                        self._yield()
                    continue
                if length == 126:
                    if end - pos < 8:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    start = pos + 8
                    if length < 126:  # 5.2: the minimal number of bytes MUST be used
                        return self._fail(frames.NON_MINIMAL_LENGTH, end)
                elif length == 127:
                    if end - pos < 14:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    start = pos + 14
                    if length < 0x10000 or length >> 63:  # 5.2: minimal, top bit 0
                        return self._fail(frames.INVALID_LENGTH, end)
                if not b1 & 0x80:
                    return self._fail(frames.UNMASKED, end)
                opcode = b0 & 0x0F
                if opcode & 0x8:
                    if opcode > OP_PONG or b0 & 0x70:
                        return self._fail(frames.INVALID_CONTROL, end)
                    if not b0 & 0x80 or length > MAX_CONTROL_PAYLOAD:
                        return self._fail(frames.CONTROL_TOO_LONG, end)
                elif failure := self._check_data_header(b0, opcode, length):
                    return self._fail(failure, end)
                stop = start + length
                if stop > end:
                    self._need = stop - pos
                    break
                mask = buf[start - 4 : start]
                if length > _VIEW_FROM:
                    with memoryview(buf) as view:
                        payload = apply_mask(view[start:stop], mask)
                else:
                    payload = apply_mask(buf[start:stop], mask)
                pos = stop
                self.bytes_in += length
                self._budget -= 1 + (length >> 12)
                if opcode & 0x8:
                    self._control(opcode, payload)
                else:
                    self._data(opcode, b0, payload)
                if self._budget <= 0:
                    self._yield()
        finally:
            self._parsing = False
        if self._state == CLOSED:
            return end
        return pos

    def _check_data_header(self, b0: int, opcode: int, length: int) -> Failure | None:
        """Why a data frame's header is a protocol violation, before its payload."""
        if opcode > OP_BINARY:
            return frames.RESERVED_OPCODE
        if b0 & 0x70 and (b0 & 0x70 != RSV1 or self._deflate is None or opcode == OP_CONT):
            return frames.RESERVED_BITS
        if opcode == OP_CONT:
            if not self._msg:
                return frames.UNEXPECTED_CONTINUATION
        elif self._msg:
            return frames.EXPECTED_CONTINUATION
        room = self._max_size - self._msg_size
        if b0 & 0x40 or (opcode == OP_CONT and self._compressed):
            # Deflate grows incompressible data a little (up to 1/8 with zlib's smallest
            # memLevel); what counts is the size once inflated, checked then. This only
            # bounds what is buffered.
            room += (room >> 3) + 64
        if length > room:
            return frames.TOO_BIG
        return None

    def _data(self, opcode: int, b0: int, payload: bytes) -> None:  # noqa: PLR0912
        fin = b0 & 0x80
        if opcode:
            text = opcode == OP_TEXT
            first = True
            self._compressed = bool(b0 & 0x40)
        else:
            text = self._msg == OP_TEXT
            first = False
        if self._compressed:
            payload = self._inflate(first, fin, payload)
            if self._state == CLOSED:
                return
            self._budget -= len(payload) >> 12
        if text:
            if self._checked:
                payload_rest = payload[self._checked :]
                self._checked = 0
                if not self._text_ok(payload_rest, bool(fin)):
                    return
            elif first and fin:
                if not payload.isascii() and not valid_utf8(payload):
                    self._fail(INVALID_UTF8)
                    return
            elif not self._text_ok(payload, bool(fin)):
                return
        if fin:
            self._msg = 0
            self._msg_size = 0
            if text:
                self.text_in += 1
            else:
                self.binary_in += 1
        else:
            if first:
                self._msg = opcode
            self._msg_size += len(payload)
        if self._state != OPEN:
            return  # closing: counted, not answered (RFC 6455 forbids data after a close)
        try:
            self._app.data(self, payload, text, first, bool(fin))
        except Exception:
            self._app_failed()

    def _app_failed(self, result: int = 0) -> int:
        """The application raised on a message: a bug, logged (rate-limited: a client can
        trigger it over and over), and the connection fails with 1011."""
        failures.error("application failed on a message", peer=self.peer)
        return self._fail(APP_FAILED, result)

    def _inflate(self, first: bool, fin: int, payload: bytes) -> bytes:
        deflate = self._deflate
        assert deflate is not None
        try:
            data = deflate.inflate(payload, first, bool(fin), self._max_size - self._msg_size)
        except TooBig:
            self._fail(frames.TOO_BIG)
            return b""
        except Corrupt as exc:
            self._fail(Failure(CloseCode.PROTOCOL_ERROR, str(exc)))
            return b""
        if deflate.pause:
            self._pace(deflate.pause)
        if fin:
            self._compressed = False
        return data

    def _text_ok(self, payload: bytes, final: bool) -> bool:
        """UTF-8 across the frames of a text message: fail at the first bad byte."""
        decoder = self._utf8
        if decoder is None:
            decoder = self._utf8 = _Decoder()
        try:
            decoder.decode(payload, final)
        except UnicodeDecodeError:
            self._fail(INVALID_UTF8)
            return False
        if final:
            self._utf8 = None
        return True

    def _check_partial_text(self, buf: bytearray) -> None:
        """A text frame still arriving: check what has come so far, at every read, so that
        invalid UTF-8 is refused at once rather than after the rest of the frame (or never,
        if the client stalls). ``_checked`` bytes are already fed to the message's decoder;
        the frame's completion feeds only the rest. A compressed frame is checked once it
        has arrived whole and been inflated."""
        b0 = buf[0]
        opcode = b0 & 0x0F
        if opcode != OP_TEXT and (opcode != OP_CONT or self._msg != OP_TEXT):
            return  # binary, or a control frame between the fragments of a text message
        if self._compressed or b0 & 0x40:
            return
        length = buf[1] & 0x7F
        start = 14 if length == 127 else 8 if length == 126 else 6
        checked = self._checked
        if len(buf) <= start + checked:
            return  # nothing new of the payload yet (or not even the whole mask)
        mask = bytes(buf[start - 4 : start])
        turn = checked % 4
        mask = mask[turn:] + mask[:turn]
        with memoryview(buf) as view:
            seen = apply_mask(view[start + checked :], mask)
        if self._text_ok(seen, False):
            self._checked = checked + len(seen)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if not self.answer_pings:
                return
            n = len(payload)
            if self._deflate is not None:
                self._flush_held()
            self._write(_PONG[n] + payload)
        elif opcode == OP_PONG:
            if payload == self._ping:
                self._ping = None
                if self._timer is not None and self._state == OPEN:
                    self._timer.cancel()
                    due = self._ping_at + self._options.ping_interval
                    if due > self._engine.loop.time():
                        self._keepalive_at(due)
                    else:
                        self._keepalive_later(0)
        else:
            self._close_received(payload)

    def _close_received(self, payload: bytes) -> None:
        code: int | None = None
        reason = ""
        if payload:
            if len(payload) == 1:
                self._fail(frames.CLOSE_TOO_SHORT)
                return
            code = int.from_bytes(payload[:2], "big")
            if not frames.valid_peer_code(code):
                self._fail(Failure(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}"))
                return
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                self._fail(frames.INVALID_CLOSE_REASON)
                return
        self.code_received = _NO_STATUS if code is None else code
        if not self.answer_close and self._state == OPEN:  # no_close_reply: it times out
            self._state = CLOSED
            self._set_buf(None)
            self._close_later()
            return
        if self._state == OPEN:
            # 5.5.1: answer with a close frame, echoing the code and its reason. A close
            # between the fragments of a message is a normal close too: the message is
            # abandoned.
            self._write_close(code, reason)
        self._state = CLOSED
        self._close_later()
        self.flush()
        self._transport.close()  # 7.1.1: the server closes the TCP connection first

    # --- closing ---------------------------------------------------------------------

    def _write_close(self, code: int | None, reason: str = "") -> None:
        if self._deflate is not None:
            self._flush_held()
        payload = frames.close_payload(code, reason)
        self._write(_CLOSE[len(payload)] + payload)
        self.code_sent = _NO_STATUS if code is None else int(code)  # a number in logs
        if self.closed_by is None:  # the client's close came first if we are answering it
            self.closed_by = "server" if self.code_received is None else "client"

    def _fail(self, failure: Failure, result: int = 0) -> int:
        """7.1.7 Fail the WebSocket Connection: a close frame with its code if none was
        sent yet, then stop reading frames. Our side of TCP is shut after the close
        frame, and the client's bytes are discarded until it closes its side, so that
        closing early cannot turn into a reset that destroys the close frame."""
        if self._state == CLOSED:
            return result
        if self._state == OPEN:
            self._write_close(failure.code, failure.reason)
        self._state = CLOSED
        self._set_buf(None)  # nothing more is parsed: what is buffered is let go of now
        self._engine.failed(self, failure)
        self._close_later()
        self.flush()
        if self._transport.can_write_eof():
            self._transport.write_eof()
        else:
            self._transport.close()
        return result

    @property
    def close_timeout(self) -> float:
        return self._options.close_timeout

    def _close_later(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        timeout = self._options.close_timeout
        if timeout and not self._engine.closing_all:  # if so, close_all's deadline
            self._timer = self._engine.loop.call_later(timeout, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (deadlines: close, keepalive, drain)."""
        self._state = CLOSED
        self._out = None
        self._transport.abort()

    def drop(self, *, reset: bool) -> None:
        self._state = CLOSED
        self._set_buf(None)
        self.flush()  # what was sent before goes to the kernel (a reset may discard it)
        if reset:  # SO_LINGER 0: closing sends an RST, not a FIN
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self._transport.abort()
        else:
            self._transport.close()  # once what is buffered is written...
            self._close_later()  # ...or at close_timeout, if the client does not read

    def ping(self, payload: bytes) -> None:
        if self._state != OPEN:
            return
        if self._deflate is not None:
            self._flush_held()
        self._write(_PING[len(payload)] + payload)

    def send_raw(self, data: bytes) -> None:
        if self._state != OPEN:
            return
        if self._deflate is not None:
            self._flush_held()
        self._write(data)

    @property
    def extensions(self) -> str:
        return "" if self._deflate is None else self._deflate.header

    # --- flow control ----------------------------------------------------------------

    def _yield(self) -> None:
        """Its turn is over: stop reading until the loop has served the others."""
        self._pause_for(PAUSED_TURN)
        self._engine.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._budget = TURN
        self._resume_for(PAUSED_TURN)

    def _pace(self, delay: float) -> None:
        """Over its inflate budget: stop reading it for ``delay`` seconds."""
        if not self._paused & PAUSED_INFLATE:
            self._pause_for(PAUSED_INFLATE)
            self._engine.loop.call_later(delay, self._resume_for, PAUSED_INFLATE)

    def _pause_for(self, reason: int) -> None:
        if not self._paused:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume_for(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused or self._state == CLOSED:
            return
        if self._transport.is_closing():  # gone meanwhile (a reset): nothing to answer it with
            self._state = CLOSED
            self._set_buf(None)
            return
        if self._buf is not None and not self._parsing:
            self._continue()  # what was read before the pause comes first
        if not self._paused and self._state != CLOSED:
            self._transport.resume_reading()

    # --- keepalive -------------------------------------------------------------------

    def _keepalive_later(self, delay: float) -> None:
        """The next keepalive step in ``delay`` seconds (0: at the next loop pass; a pong
        that came late is followed by the next ping at once, never by none).

        The deadline is rounded up to a multiple of a tick (KEEPALIVE_TICK, or a sixteenth
        of ``ping_interval`` if that is shorter; one grid for every deadline, so that one
        on it stays on it): the connections due within one tick are pinged in one pass of
        the loop and their pongs come back together, so that a process wakes once a tick
        for its idle connections rather than twice per ping."""
        loop = self._engine.loop
        if delay <= 0:
            self._timer = loop.call_later(0, self._keepalive)
        else:
            self._keepalive_at(loop.time() + delay)

    def _keepalive_at(self, when: float) -> None:
        """The next keepalive step at ``when`` (the loop's time), rounded up to its tick."""
        tick = self._tick()
        if tick:
            when = math.ceil(when / tick - 1e-9) * tick  # a deadline on the grid stays on it
        self._timer = self._engine.loop.call_at(when, self._keepalive)

    def _tick(self) -> float:
        """The keepalive's grid: 0 for an interval too short to round."""
        tick = min(KEEPALIVE_TICK, self._options.ping_interval / 16)
        return tick if tick >= MIN_TICK else 0.0

    def _keepalive(self) -> None:
        """Ping every ``ping_interval``; no pong within ``ping_timeout``: fail with 1011.
        The ping is written even when the buffer is full, and a client that does not
        read cannot answer it, so it is dropped at the deadline however full it is. (A
        client the server stopped reading for its own reasons, a held relay publisher or
        one paused by the memory budget or paced by the inflate budget, could not be heard
        answering: its deadline waits until it is read again.)"""
        self._timer = None
        if self._state != OPEN:
            return
        options = self._options
        if self._ping is None:
            # On the grid (when it was due, if it ran within a tick of that), so that the
            # next one is due an interval after, on the grid too; from the time it ran,
            # rounding up would make each interval a tick longer.
            now, tick = self._engine.loop.time(), self._tick()
            self._ping_at = math.floor(now / tick + 1e-9) * tick if tick else now
            self._ping = self._engine.next_ping()
            self._write(_PING[len(self._ping)] + self._ping)
            self._keepalive_later(options.ping_timeout or options.ping_interval)
        elif not options.ping_timeout or (self._paused and not self._paused & PAUSED_WRITE):
            self._keepalive_later(options.ping_interval)  # the pong re-arms the interval
        else:
            self._fail(KEEPALIVE_TIMEOUT)
            if self.buffered:  # it does not read: the close frame cannot reach it
                self.abort()
            elif self._timer is not None:
                # It did not answer a ping: it gets as long to take the close frame, not
                # the whole close_timeout (its buffers in the kernel may be full).
                self._timer.cancel()
                grace = min(options.close_timeout or options.ping_timeout, options.ping_timeout)
                self._timer = self._engine.loop.call_later(grace, self.abort)
