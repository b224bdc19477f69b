"""A slow network, on request (the test peer's ``throttle``): a transport that writes what
it is given no faster than a rate, between the connection and its real transport.

Only writing goes through it (the real transport still hands what it reads straight to
the connection). It keeps what waits in its own buffer and applies the write limits the
connection sets to that buffer plus the real one, so the engine's flow control holds as
for any connection: past ``write_limit`` the connection is blocked, the echo stops reading,
the relay treats the member as a slow consumer. The real transport is given the next
bytes only once it has written the previous ones, so it never fills up on its own.
"""

import asyncio
from typing import Any

NEVER = 2**31 - 1  # bytes: the real transport's own limit (uvloop takes an int), never reached
STEP = 0.1  # seconds: the largest write is a tenth of a second's worth
MIN_WAIT = 0.05  # seconds between writes at least: 20 wake-ups a second per connection


class Throttled(asyncio.Transport):
    """``transport``, writing at most ``rate`` bytes a second."""

    def __init__(self, transport: asyncio.Transport, rate: int) -> None:
        super().__init__()
        self._real = transport
        self._rate = rate
        self._step = max(1, int(rate * STEP))
        self._buf = bytearray()
        self._allowance = float(self._step)  # a full bucket: the first bytes go at once
        self._loop = asyncio.get_running_loop()
        self._refilled = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._protocol: Any = None
        self._high, self._low = 64 * 2**10, 16 * 2**10
        self._paused = False
        self._closing = False  # close() or write_eof(): once the buffer is written
        self._eof = False
        self._pumping = False
        # The real transport is given a step only when it has written the last one, so
        # its buffer stays within a step (and TLS's overhead): its own flow control is
        # off, or it would pause and resume the connection behind our back (a TLS
        # transport resumed it while we held more than write_limit).
        transport.set_write_buffer_limits(high=NEVER)

    # --- asyncio.WriteTransport ------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._real.is_closing():
            return
        self._buf += data
        if self._timer is None and not self._pumping:
            self._pump()
        self._check_limits()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return len(self._buf) + self._real.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 2**10 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def write_eof(self) -> None:
        self._eof = True
        self.close()

    def close(self) -> None:
        self._closing = True
        if self._timer is None and not self._pumping:
            self._pump()

    def abort(self) -> None:
        self._stop()
        self._real.abort()

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        self._real.set_protocol(protocol)

    def get_protocol(self) -> Any:
        return self._protocol

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    # --- pacing ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Write what the rate allows now; come back when more is allowed. (A resume
        inside it may write more: that waits for this pump, one timer at a time.)"""
        self._timer = None
        self._pumping = True
        try:
            self._step_once()
        finally:
            self._pumping = False

    def _step_once(self) -> None:
        real = self._real
        if real.is_closing():
            self._stop()
            return
        if self._buf and real.get_write_buffer_size() == 0:
            now = self._loop.time()
            gained = (now - self._refilled) * self._rate
            self._allowance = min(float(self._step), self._allowance + gained)
            self._refilled = now
            size = min(len(self._buf), int(self._allowance))
            if size > 0:
                real.write(bytes(self._buf[:size]))
                del self._buf[:size]
                self._allowance -= size
        self._check_limits()  # also when only the real transport has written meanwhile
        if self._buf:  # the rate's next step, or the real transport's turn to write
            due = (min(len(self._buf), self._step) - self._allowance) / self._rate
            self._arm(STEP if real.get_write_buffer_size() else max(MIN_WAIT, due))
        elif self._closing:
            if self._eof:
                real.write_eof()
            else:
                real.close()
        elif self._paused:  # until the real transport has written enough to resume
            self._arm(STEP)

    def _arm(self, wait: float) -> None:
        """The next pump: one timer at a time."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(wait, self._pump)

    def _check_limits(self) -> None:
        size = self.get_write_buffer_size()
        if not self._paused and size > self._high:
            self._paused = True
            self._protocol.pause_writing()
        elif self._paused and size <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf.clear()
