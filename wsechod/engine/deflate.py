"""permessage-deflate (RFC 7692) on our frame layer.

websockets negotiates the extension (its ``ServerProtocol`` and ``PerMessageDeflate``
parameters); compressing and inflating are done here with zlib, because a receiver must
handle what RFC 7692 allows and websockets' decoder does not: a message ended by a final
block (BFINAL set, 7.2.3.4) ends zlib's stream, after which it would keep every later
byte unread and inflate nothing. Here a final block starts a new stream that keeps the
sliding window (with context takeover), and data after a final block within a message is
a protocol error.

What costs per frame is kept out of the per-frame path, since a client chooses how many
frames a message takes: the inflate window is kept by appending (its copy is made only when
a final block needs it), and the fragments of an outgoing message are compressed without a
flush and held until ``flush()`` (the engine calls it once the loop has handled what it read)
or the message's last fragment: a sync flush ends a deflate block, whose Huffman tables
zlib builds each time, which made compressing 256-byte fragments cost three times as much as
compressing the whole message, and a frame each cost a send system call.

The inflate budget bounds the CPU a client can make the server spend for little bandwidth: a
compressed byte may inflate to a thousand, which the server then checks and echoes. What a
frame inflates to beyond ``FREE_RATIO`` times its compressed size is drawn from a token
bucket refilled at the ``inflate_rate`` setting (bytes a second, one second's worth saved up
at most); ``inflate`` sets ``pause`` to the seconds the connection should stop reading for
the bucket to be back at zero. Pacing, not a close: reading stops as with TCP back-pressure,
so a client with a legitimate burst of very compressible data is slowed, not cut, and a
bomb costs the server at most the rate's worth of work a second. Ordinary data (text and
JSON deflate 3 to 10 times) inflates within the free ratio and is never paced: like
uncompressed traffic, it costs the server in proportion to what the client sends.

Memory: zlib's state (about 50 KiB a connection at the windows websockets negotiates) is
freed at close, but glibc's malloc keeps what is freed inside its heap unless it is at the
top: 1,000 deflate connections closed left 36-45 MiB more in the process than without
deflate, all of it free in the heap (nothing kept alive: tracemalloc and mallinfo2 agree).
Once connections have released ``TRIM_AFTER`` bytes of zlib state, ``malloc_trim(0)`` gives
the free pages back, a second after (the closes of a drain or of a mass disconnect come
together) and at most every ``TRIM_INTERVAL``: it took 4-7 ms for those 40 MiB, 0.2 ms with
nothing to give back, whatever the live heap (300 MiB in the measurement).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
import time
import zlib
from collections.abc import Callable, Sequence

from websockets.extensions import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate

from wsechod.engine.frames import OP_BINARY, OP_CONT, OP_TEXT, header
from wsechod.log import get_logger

log = get_logger("wsechod.engine")

# 7.2.2: the 4 octets removed from the end of every compressed message, put back to inflate.
_TAIL = b"\x00\x00\xff\xff"
# What may follow a final block (7.2.3.4): nothing, the header byte of an empty stored
# block, and the tail put back.
_AFTER_FINAL = frozenset((b"", b"\x00", _TAIL, b"\x00" + _TAIL))
# zlib's memory per connection: websockets' defaults (what it offers and accepts).
MEM_LEVEL = 5
# Inflated bytes per compressed byte that the inflate budget does not count.
FREE_RATIO = 32
# Fragments smaller than HOLD_SMALL are held uncompressed, to go through zlib together, up
# to HOLD_RAW bytes of them.
HOLD_SMALL, HOLD_RAW = 4096, 64 * 1024
# Giving freed memory back to the system: after this much zlib state was released, a
# second later (to take the closes that come together at once), at most this often.
TRIM_AFTER = 16 * 2**20
TRIM_DELAY = 1.0
TRIM_INTERVAL = 10.0


class TooBig(Exception):
    """The message inflates past ``max_size``."""


class Corrupt(Exception):
    """Not a valid DEFLATE stream (1002)."""


class TokenBucket:
    """A token bucket of inflated bytes: ``rate`` a second, at most ``burst`` saved up.
    One per connection (its clock is the process's monotonic one, as the loop's)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def charge(self, n: int) -> float:
        """Spend ``n`` bytes; the seconds until the bucket is back at zero, 0.0 if it is not
        in debt. The debt is at most one frame's output, which ``max_size`` bounds."""
        now = time.monotonic()
        tokens = min(self._tokens + (now - self._at) * self.rate, self.burst) - n
        self._at = now
        self._tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class _Trimmer:
    """Process-wide: counts the zlib state released and schedules ``malloc_trim``."""

    def __init__(self) -> None:
        self.released = 0
        self.scheduled = False
        self.last = -math.inf
        self._trim = _malloc_trim()
        self.available = self._trim is not None

    def add(self, n: int) -> None:
        self.released += n
        if self.released < TRIM_AFTER or self.scheduled or self._trim is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed outside a loop (a unit test): nothing to schedule
            return
        self.scheduled = True
        loop.call_later(max(TRIM_DELAY, self.last + TRIM_INTERVAL - loop.time()), self.run)

    def run(self) -> None:
        assert self._trim is not None
        released, self.released, self.scheduled = self.released, 0, False
        began = time.perf_counter()
        gave_back = self._trim(0)
        self.last = asyncio.get_running_loop().time()
        log.debug(
            "memory trimmed",
            zlib_released=released,
            gave_back=bool(gave_back),
            ms=round((time.perf_counter() - began) * 1e3, 2),
        )


trimmer = _Trimmer()


def negotiated(extensions: Sequence[Extension], inflate_rate: int) -> Deflate | None:
    """The compression state of a connection whose handshake negotiated ``extensions``
    (None without permessage-deflate); ``inflate_rate``: its budget, 0 for none."""
    found = extensions[0] if extensions else None
    if not isinstance(found, PerMessageDeflate):
        return None
    return Deflate(found, TokenBucket(inflate_rate, inflate_rate) if inflate_rate else None)


def compress_whole(data: bytes, bits: int) -> bytes:
    """A whole message compressed as a stream of its own (no window before it, flushed, its
    tail removed, 7.2.1): it refers to nothing before its start, so any client whose window
    holds ``2**bits`` bytes inflates it, whatever it inflated before. The relay compresses a
    message so once for every member with that window, not once per member: a thousand
    members were a thousand compressions of each message, holding the loop for seconds."""
    encoder = zlib.compressobj(wbits=-bits, memLevel=MEM_LEVEL)
    return (encoder.compress(data) + encoder.flush(zlib.Z_SYNC_FLUSH))[:-4]


class Deflate:
    """One connection's compression state, from the parameters negotiated."""

    __slots__ = (
        "_budget",
        "_decoder",
        "_done",
        "_empty",
        "_encoder",
        "_held",
        "_in_bits",
        "_in_reset",
        "_opcode",
        "_out_bits",
        "_out_reset",
        "_pending",
        "_raw",
        "_raw_size",
        "_window",
        "_window_size",
        "pause",
    )

    def __init__(self, negotiated: PerMessageDeflate, budget: TokenBucket | None = None) -> None:
        # "remote": what the client compresses; "local": what we do.
        self._in_bits = negotiated.remote_max_window_bits or 15
        self._in_reset = negotiated.remote_no_context_takeover
        self._out_bits = negotiated.local_max_window_bits or 15
        self._out_reset = negotiated.local_no_context_takeover
        self._decoder = zlib.decompressobj(wbits=-self._in_bits)
        self._encoder: zlib._Compress | None = None  # made by the first message sent
        # The last inflated bytes, to continue after a final block (see inflate).
        self._window = bytearray()
        self._window_size = 1 << self._in_bits
        self._done = False  # the message in progress had a final block
        self._empty = True  # no compressed byte of the message in progress yet
        self._raw: list[bytes] = []  # fragments held as they came (at most HOLD_RAW bytes)
        self._raw_size = 0
        self._held: list[bytes] = []  # compressed, not sent yet: the message's next frame
        self._pending = False  # fragments held since the last flush (or message end)
        self._opcode = OP_CONT  # the opcode of the next frame of the message being sent
        self._budget = budget
        self.pause = 0.0  # after inflate: seconds to stop reading (the budget is spent)

    @property
    def header(self) -> str:
        """What was negotiated, as a Sec-WebSocket-Extensions value."""
        params = ["permessage-deflate"]
        if self._out_reset:
            params.append("server_no_context_takeover")
        if self._in_reset:
            params.append("client_no_context_takeover")
        if self._out_bits != 15:
            params.append(f"server_max_window_bits={self._out_bits}")
        if self._in_bits != 15:
            params.append(f"client_max_window_bits={self._in_bits}")
        return "; ".join(params)

    # --- inflating -------------------------------------------------------------------

    def inflate(self, data: bytes, first: bool, last: bool, room: int) -> bytes:  # noqa: PLR0912
        """One frame of a compressed message; at most ``room`` bytes of output. Inline, as
        it runs per frame: the window is kept by appending to it, cut back to its size once
        twice as long or at a message's end (not copied per frame, not kept twice over
        while idle)."""
        if first:
            self._done = False
            self._empty = True
            if self._in_reset:
                self._decoder = zlib.decompressobj(wbits=-self._in_bits)
        if data:
            self._empty = False
        if last:
            if self._empty:  # 7.2.3.6: an empty message compresses to 0x00, never to nothing
                raise Corrupt("a compressed message with no payload")
            data += _TAIL
        if self._done:
            if data not in _AFTER_FINAL:
                raise Corrupt("data after the final deflate block")
            return b""
        try:
            out = self._decoder.decompress(data, room + 1)
        except zlib.error as exc:
            raise Corrupt(f"invalid compressed data: {exc}") from None
        if len(out) > room or self._decoder.unconsumed_tail:
            raise TooBig
        if not self._in_reset:
            size = self._window_size
            if len(out) >= size:  # the window is the end of this output alone
                self._window = bytearray(memoryview(out)[-size:])
            else:
                window = self._window
                window += out
                if len(window) > (size if last else 2 * size):
                    del window[:-size]
        if self._decoder.eof:
            self._final_block()
        if self._budget is not None:
            excess = len(out) - FREE_RATIO * len(data)
            self.pause = self._budget.charge(excess) if excess > 0 else 0.0
        return out

    def _final_block(self) -> None:
        """The stream ended (BFINAL): the rest of the message must be empty, and the next
        message starts a new stream with the window as its dictionary."""
        if self._decoder.unused_data not in _AFTER_FINAL:
            raise Corrupt("data after the final deflate block")
        self._done = True
        window = self._window
        self._decoder = (
            zlib.decompressobj(wbits=-self._in_bits, zdict=bytes(window[-self._window_size :]))
            if window
            else zlib.decompressobj(wbits=-self._in_bits)
        )

    # --- compressing -----------------------------------------------------------------

    def _start(self, text: bool) -> zlib._Compress:
        """A new message: its first frame carries the opcode and RSV1 (6.1)."""
        self._opcode = OP_TEXT if text else OP_BINARY
        if self._encoder is None or self._out_reset:
            self._encoder = zlib.compressobj(wbits=-self._out_bits, memLevel=MEM_LEVEL)
        return self._encoder

    def hold(self, data: bytes, text: bool, first: bool) -> bool:
        """A fragment that is not its message's last, compressed without a flush and held
        for ``flush()``; small ones are kept as they came until ``HOLD_RAW`` bytes of them
        go through zlib together (one call rather than one each). True when nothing was
        held before: the caller then makes sure ``flush()`` is called before the loop reads
        again."""
        if first:
            self._start(text)
        n = len(data)
        if n < HOLD_SMALL:
            self._raw.append(data)
            self._raw_size += n
            if self._raw_size >= HOLD_RAW:
                self._squeeze()
        else:
            if self._raw:
                self._squeeze()
            assert self._encoder is not None
            if out := self._encoder.compress(data):
                self._held.append(out)
        if self._pending:
            return False
        self._pending = True
        return True

    def _squeeze(self) -> None:
        """What is held as it came goes through zlib (without a flush)."""
        assert self._encoder is not None
        raw = self._raw
        if out := self._encoder.compress(b"".join(raw) if len(raw) > 1 else raw[0]):
            self._held.append(out)
        raw.clear()
        self._raw_size = 0

    def _compressed(self, data: bytes) -> bytes:
        """Everything held and then ``data``, compressed and sync-flushed."""
        encoder = self._encoder
        assert encoder is not None
        raw = self._raw
        if raw:
            if len(data) < HOLD_SMALL:
                raw.append(data)
                data = b""
            self._squeeze()
        out = encoder.compress(data) + encoder.flush(zlib.Z_SYNC_FLUSH)
        held = self._held
        if held:
            held.append(out)
            out = b"".join(held)
            held.clear()
        self._pending = False
        return out

    def flush(self) -> tuple[bytes, bytes] | None:
        """The header and payload of the frame that carries what ``hold`` has held since
        the last flush (not the message's last frame), or None if nothing is held."""
        if not self._pending:
            return None
        payload = self._compressed(b"")
        opcode = self._opcode
        self._opcode = OP_CONT
        return header(opcode, len(payload), fin=False, rsv1=opcode != OP_CONT), payload

    def end(self, data: bytes, text: bool, first: bool) -> tuple[int, bool, bytes]:
        """The last fragment of a message (or all of it): the opcode, RSV1 and payload of
        the frame that ends it, with what was held before."""
        if first:
            self._start(text)
        out = self._compressed(data)[:-4]  # 7.2.1: without the empty block's 4 octets
        opcode = self._opcode
        self._opcode = OP_CONT
        if self._out_reset:  # the next message makes its own: none kept while idle
            self._encoder = None
        return opcode, opcode != OP_CONT, out

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """The connection is gone: what zlib held goes with this object, and counts
        towards giving freed memory back to the system (``trimmer``)."""
        released = (1 << self._in_bits) + 7 * 1024 + len(self._window)  # inflate's state
        if self._encoder is not None:  # zlib's deflateInit: window, prev, head, pending
            released += (1 << (self._out_bits + 2)) + (1 << (MEM_LEVEL + 9)) + 6 * 1024
        self._encoder = None
        self._window = bytearray()
        self._raw.clear()
        self._held.clear()
        trimmer.add(released)

    # --- a message compressed once for many -----------------------------------------

    @property
    def out_bits(self) -> int:
        """The window the client may expect of what we send: ``compress_whole`` is made for it."""
        return self._out_bits

    def sent_whole(self) -> None:
        """A message compressed whole (``compress_whole``) went out: the client's window now
        holds what this connection's encoder never saw, so the next message it compresses
        starts a stream of its own too."""
        self._encoder = None
