"""permessage-deflate (RFC 7692) on our frame layer.

websockets negotiates the extension (its ``ServerProtocol`` and ``PerMessageDeflate``
parameters); compressing and inflating are done here with zlib, because a receiver must
handle what RFC 7692 allows and websockets' decoder does not: a message ended by a final
block (BFINAL set, 7.2.3.4) ends zlib's stream, after which it would keep every later
byte unread and inflate nothing. Here a final block starts a new stream that keeps the
sliding window (with context takeover), and data after a final block within a message is
a protocol error.
"""

import zlib

from websockets.extensions.permessage_deflate import PerMessageDeflate

# 7.2.2: the 4 octets removed from the end of every compressed message, put back to inflate.
_TAIL = b"\x00\x00\xff\xff"
# What may follow a final block (7.2.3.4): nothing, the header byte of an empty stored
# block, and the tail put back.
_AFTER_FINAL = frozenset((b"", b"\x00", _TAIL, b"\x00" + _TAIL))
# zlib's memory per connection: websockets' defaults (what it offers and accepts).
MEM_LEVEL = 5


class TooBig(Exception):
    """The message inflates past ``max_size``."""


class Corrupt(Exception):
    """Not a valid DEFLATE stream (1002)."""


class Deflate:
    """One connection's compression state, from the parameters negotiated."""

    __slots__ = (
        "_decoder",
        "_done",
        "_encoder",
        "_in_bits",
        "_in_reset",
        "_out_bits",
        "_out_reset",
        "_window",
    )

    def __init__(self, negotiated: PerMessageDeflate) -> None:
        # "remote": what the client compresses; "local": what we do.
        self._in_bits = negotiated.remote_max_window_bits or 15
        self._in_reset = negotiated.remote_no_context_takeover
        self._out_bits = negotiated.local_max_window_bits or 15
        self._out_reset = negotiated.local_no_context_takeover
        self._decoder = zlib.decompressobj(wbits=-self._in_bits)
        self._encoder = zlib.compressobj(wbits=-self._out_bits, memLevel=MEM_LEVEL)
        self._window = b""  # the last inflated bytes, to continue after a final block
        self._done = False  # the message in progress had a final block

    def inflate(self, data: bytes, first: bool, last: bool, room: int) -> bytes:
        """One frame of a compressed message; at most ``room`` bytes of output."""
        if first:
            self._done = False
            if self._in_reset:
                self._decoder = zlib.decompressobj(wbits=-self._in_bits)
                self._window = b""
        if last:
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
            self._window = (self._window + out)[-(1 << self._in_bits) :]
        if self._decoder.eof:  # a final block: the next message starts a new stream
            if self._decoder.unused_data not in _AFTER_FINAL:
                raise Corrupt("data after the final deflate block")
            self._done = True
            self._decoder = (
                zlib.decompressobj(wbits=-self._in_bits, zdict=self._window)
                if self._window
                else zlib.decompressobj(wbits=-self._in_bits)
            )
        return out

    def compress(self, data: bytes, first: bool, last: bool) -> bytes:
        """One frame of a message; the first of each message carries RSV1 (6.1)."""
        if first and self._out_reset:
            self._encoder = zlib.compressobj(wbits=-self._out_bits, memLevel=MEM_LEVEL)
        out = self._encoder.compress(data) + self._encoder.flush(zlib.Z_SYNC_FLUSH)
        if last:
            out = out[:-4]  # 7.2.1: without the empty block's 4 octets
        return out
