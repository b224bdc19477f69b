"""permessage-deflate (RFC 7692): negotiated by websockets' extension, run by our engine
with the same table, drain, limits and counts as every other connection."""

import asyncio
import os
import socket
import zlib
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from tests import rawws
from tests.conftest import Daemon
from tests.test_echo import make_payloads

DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"


@pytest.fixture
def daemon(start: Callable[..., Daemon]) -> Daemon:
    return start("--compression", "deflate", "--max-size", "65536", "--log-level", "debug")


def test_compressed_echo_is_exact_for_every_size(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon.url, compression="deflate", max_size=None) as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            for message in make_payloads():
                await ws.send(message)
                assert await ws.recv() == message

    asyncio.run(main())


def test_fragmented_compressed_message_is_streamed_back(daemon: Daemon) -> None:
    parts = ["é" * 1000, "x" * 5000, "end"]

    async def fragments() -> AsyncIterator[str]:
        for part in parts:
            yield part

    async def main() -> str:
        async with connect(daemon.url, compression="deflate") as ws:
            await ws.send(fragments())
            message = await ws.recv()
            assert isinstance(message, str)
            return message

    assert asyncio.run(main()) == "".join(parts)


def test_client_without_compression_is_served_plain(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon.url, compression=None) as ws:
            assert ws.protocol.extensions == []
            await ws.send("plain")
            assert await ws.recv() == "plain"

    asyncio.run(main())


def test_compressed_message_over_max_size_closes_1009(daemon: Daemon) -> None:
    """A zip bomb: small on the wire, too big once inflated."""

    async def main() -> int | None:
        async with connect(daemon.url, compression="deflate", max_size=None) as ws:
            await ws.send(bytes(65537))  # compresses to a few hundred bytes
            with pytest.raises(ConnectionClosedError) as info:
                await ws.recv()
            return info.value.rcvd.code if info.value.rcvd else None

    assert asyncio.run(main()) == 1009


def raw_deflate_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    request = rawws.handshake_request(port).replace(b"\r\n\r\n", f"\r\n{DEFLATE}\r\n\r\n".encode())
    sock.sendall(request)
    rawws.read_handshake(sock)
    return sock


def compress(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_rsv1_on_a_continuation_frame_is_a_protocol_error(daemon: Daemon) -> None:
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(
            rawws.frame(rawws.OP_TEXT, b"a", fin=False)
            + rawws.frame(rawws.OP_CONT, compress(b"b"), rsv=0x40)
        )
        assert rawws.read_frame(sock)[0] == rawws.OP_TEXT  # the first fragment's echo
        assert rawws.read_close(sock)[0] == 1002


def test_corrupt_compressed_data_is_a_protocol_error(daemon: Daemon) -> None:
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_BINARY, os.urandom(64), rsv=0x40))
        assert rawws.read_close(sock)[0] in (1002, 1007)


def test_invalid_utf8_inside_compressed_text_closes_1007(daemon: Daemon) -> None:
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_TEXT, compress(b"ok \xff"), rsv=0x40))
        assert rawws.read_close(sock)[0] == 1007


def inflate_frames(frames: list[bytes]) -> list[bytes]:
    """The server's compressed messages, each one whole frame, inflated in order."""
    decoder = zlib.decompressobj(wbits=-15)
    return [decoder.decompress(f + b"\x00\x00\xff\xff") for f in frames]


def test_rfc_7692_example_of_a_final_block_is_understood_twice(daemon: Daemon) -> None:
    """7.2.3.4: "Hello" in a block with BFINAL set, then the header byte of an empty stored
    block. The stream ends there; the next message must start a new one (it used to be
    kept unread, growing memory, and inflated to nothing)."""
    hello = bytes.fromhex("f348cdc9c90700")
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_TEXT, hello, rsv=0x40) * 2)
        sock.sendall(rawws.frame(rawws.OP_TEXT, compress(b"world"), rsv=0x40))
        echoes = [rawws.read_frame(sock) for _ in range(3)]
    assert [op for op, _ in echoes] == [rawws.OP_TEXT] * 3
    assert inflate_frames([payload for _, payload in echoes]) == [b"Hello", b"Hello", b"world"]


def test_data_after_a_final_block_in_the_same_message_is_a_protocol_error(
    daemon: Daemon,
) -> None:
    final = zlib.compressobj(wbits=-15)
    ended = final.compress(b"done") + final.flush(zlib.Z_FINISH)
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_BINARY, ended + compress(b"more"), rsv=0x40))
        assert rawws.read_close(sock)[0] == 1002
