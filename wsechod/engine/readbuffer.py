"""What a TLS connection's reads are decrypted into: a buffer the engine lends, rather than
a fresh one per read.

uvloop's TLS hands a plain ``asyncio.Protocol`` its data by reading up to 256 KiB into a
new ``bytes`` for every read (``SSL_READ_MAX_SIZE``), which made a third of a TLS echo's
CPU (py-spy: ``SSLObject.read``). A protocol that offers a buffer (``get_buffer``, and not
an ``asyncio.Protocol``: a ``BufferedProtocol``) is decrypted into it instead. ``Lender``
stands between the TLS transport and the connection: one buffer for the whole process
(the loop reads one connection at a time, and what was read is handed on before the
next), copied out as ``bytes`` of the size that was read.
"""

import asyncio
from typing import Any, Protocol

BUFFER_SIZE = 256 * 2**10  # as much as uvloop reads at once


class Reader(Protocol):
    """The side of a connection a transport calls."""

    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class Lender(asyncio.BufferedProtocol):
    """A TLS transport's protocol: lends the shared buffer, passes the rest on."""

    __slots__ = ("_to",)
    _view = memoryview(bytearray(BUFFER_SIZE))

    def __init__(self, to: Reader) -> None:
        self._to = to

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._to.data_received(bytes(self._view[:nbytes]))

    def eof_received(self) -> bool | None:
        return self._to.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._to.connection_lost(exc)

    def pause_writing(self) -> None:
        self._to.pause_writing()

    def resume_writing(self) -> None:
        self._to.resume_writing()

    def connection_made(self, transport: Any) -> None:  # made already: the handshake's
        pass  # pragma: no cover
