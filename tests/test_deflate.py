"""permessage-deflate (RFC 7692): negotiated by websockets' extension, run by our engine
with the same table, drain, limits and counts as every other connection."""

import asyncio
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from tests import rawws
from tests.conftest import Daemon
from tests.test_echo import make_payloads
from wsechod.engine.deflate import trimmer

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


def test_echo_keeps_its_compression_context(daemon: Daemon) -> None:
    """Only the relay negotiates server_no_context_takeover (it compresses a message once
    for all its receivers); an echo compresses each client's stream with its history."""

    async def main() -> str:
        async with connect(daemon.url) as ws:
            assert ws.response is not None
            return ws.response.headers["Sec-WebSocket-Extensions"]

    assert "server_no_context_takeover" not in asyncio.run(main())


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


@pytest.mark.parametrize("fragments", [1, 3])
def test_a_compressed_message_with_no_payload_is_a_protocol_error(
    daemon: Daemon, fragments: int
) -> None:
    """RFC 7692 7.2.3.6: an empty message compresses to 0x00. No payload at all, with the
    tail put back, is no DEFLATE stream: taken as an empty message, it left the inflater
    in the middle of a block, and the next message was misread."""
    with raw_deflate_connection(daemon.port) as sock:
        frames = [rawws.frame(rawws.OP_BINARY, b"", fin=fragments == 1, rsv=0x40)]
        frames += [
            rawws.frame(rawws.OP_CONT, b"", fin=i == fragments - 2) for i in range(fragments - 1)
        ]
        sock.sendall(b"".join(frames))
        assert rawws.read_close(sock)[0] == 1002


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


def inflater() -> Callable[[bytes, bool], bytes]:
    """The client's side of the server's stream: frames in order, the tail put back at
    each message's end."""
    decoder = zlib.decompressobj(wbits=-15)
    return lambda payload, fin: decoder.decompress(payload + (b"\x00\x00\xff\xff" if fin else b""))


def compressed_fragments(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into fragments of ``size`` bytes, each compressed with a sync flush, as
    websockets' client sends an iterable; the last without the tail."""
    c = zlib.compressobj(wbits=-12)
    out = [
        c.compress(data[i : i + size]) + c.flush(zlib.Z_SYNC_FLUSH)
        for i in range(0, len(data), size)
    ]
    out[-1] = out[-1][:-4]
    return out


def read_message(sock: socket.socket) -> list[tuple[int, bool, bytes]]:
    """The frames of the next data message, up to the one with FIN."""
    frames: list[tuple[int, bool, bytes]] = []
    while not frames or not frames[-1][1]:
        frames.append(rawws.read_frame_fin(sock))
    return frames


def text_of(size: int) -> bytes:
    words = (b"alpha", b"bravo", b"charlie", b"delta", b"echo")
    return b" ".join(words[i * 7 % 5] + str(i).encode() for i in range(size // 6))[:size]


def test_fragments_that_arrive_together_are_echoed_as_one_frame(daemon: Daemon) -> None:
    """A sync flush and a frame per fragment made compressing small fragments cost three
    times as much as the whole message: the fragments of one read go back together."""
    data = text_of(40_000)
    parts = compressed_fragments(data, 256)
    wire = b"".join(
        rawws.frame(
            rawws.OP_TEXT if i == 0 else rawws.OP_CONT, p, i == len(parts) - 1, rsv=0x40 * (i == 0)
        )
        for i, p in enumerate(parts)
    )
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(wire)  # one write: the server reads it in one go (loopback)
        frames = read_message(sock)
    assert frames[0][0] == rawws.OP_TEXT
    assert all(op == rawws.OP_CONT for op, _, _ in frames[1:])
    inflate = inflater()
    assert b"".join(inflate(p, fin) for _, fin, p in frames) == data
    assert len(frames) <= 4 < len(parts)  # was one frame per fragment


def test_a_fragment_alone_is_echoed_before_the_next_is_sent(daemon: Daemon) -> None:
    """Held fragments go out once the server has handled what it read: a client that
    waits for each fragment's echo before sending the next is not left waiting."""
    inflate = inflater()
    parts = compressed_fragments(b"first part, " * 50 + b"second part" * 50, 600)
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_TEXT, parts[0], fin=False, rsv=0x40))
        op, fin, payload = rawws.read_frame_fin(sock)
        assert (op, fin) == (rawws.OP_TEXT, False)
        assert inflate(payload, fin) == b"first part, " * 50
        sock.sendall(rawws.frame(rawws.OP_CONT, parts[1], fin=True))
        op, fin, payload = rawws.read_frame_fin(sock)
        assert (op, fin) == (rawws.OP_CONT, True)
        assert inflate(payload, fin) == b"second part" * 50


def test_held_fragments_go_out_before_the_pong_and_the_close(daemon: Daemon) -> None:
    """Answers leave in the order of their causes, whatever is held."""
    parts = compressed_fragments(b"x" * 3000 + b"y" * 3000, 3000)
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(
            rawws.frame(rawws.OP_BINARY, parts[0], fin=False, rsv=0x40)
            + rawws.frame(rawws.OP_PING, b"p")
            + rawws.frame(rawws.OP_CONT, parts[1], fin=False)
            + rawws.frame(rawws.OP_CLOSE, rawws.close_payload(1000))
        )
        first = rawws.read_frame_fin(sock)
        pong = rawws.read_frame_fin(sock)
        second = rawws.read_frame_fin(sock)
        close = rawws.read_frame_fin(sock)
    assert (first[0], first[1]) == (rawws.OP_BINARY, False)
    assert pong == (rawws.OP_PONG, True, b"p")
    assert (second[0], second[1]) == (rawws.OP_CONT, False)
    assert close[0] == rawws.OP_CLOSE
    inflate = inflater()
    assert inflate(first[2], False) + inflate(second[2], False) == b"x" * 3000 + b"y" * 3000


def test_no_context_takeover_both_ways_with_fragmented_messages(
    start: Callable[..., Daemon],
) -> None:
    """With *_no_context_takeover, each message is a stream of its own, both ways."""
    daemon = start("--compression", "deflate")
    offer = (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
        "client_max_window_bits"
    )
    data = text_of(20_000)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        request = rawws.handshake_request(daemon.port)
        sock.sendall(
            request.replace(b"\r\n\r\n", f"\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n".encode())
        )
        rawws.read_handshake(sock)
        for _ in range(3):  # the same message three times: each inflates on its own
            parts = compressed_fragments(data, 1000)
            sock.sendall(
                b"".join(
                    rawws.frame(
                        rawws.OP_TEXT if i == 0 else rawws.OP_CONT,
                        p,
                        i == len(parts) - 1,
                        rsv=0x40 * (i == 0),
                    )
                    for i, p in enumerate(parts)
                )
            )
            inflate = inflater()  # a fresh decoder: nothing may refer to an earlier message
            assert b"".join(inflate(p, fin) for _, fin, p in read_message(sock)) == data


def test_window_kept_across_a_final_block_after_many_frames(daemon: Daemon) -> None:
    """A message of many frames ended by a final block, then one that refers back into
    its last 4 KiB (the window the client negotiated): the window is the message's end,
    whatever the frames were."""
    first = text_of(30_000)
    ended = zlib.compressobj(wbits=-12)
    stream = ended.compress(first) + ended.flush(zlib.Z_FINISH)
    pieces = [stream[i : i + 100] for i in range(0, len(stream), 100)]
    again = zlib.compressobj(wbits=-12, zdict=first[-4096:])
    second = first[-3000:] * 2
    follow = again.compress(second) + again.flush(zlib.Z_SYNC_FLUSH)
    assert len(follow) < 200  # it does refer back
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(
            b"".join(
                rawws.frame(
                    rawws.OP_TEXT if i == 0 else rawws.OP_CONT,
                    p,
                    i == len(pieces) - 1,
                    rsv=0x40 * (i == 0),
                )
                for i, p in enumerate(pieces)
            )
            + rawws.frame(rawws.OP_TEXT, follow[:-4], rsv=0x40)
        )
        inflate = inflater()
        echoes = [b"".join(inflate(p, fin) for _, fin, p in read_message(sock)) for _ in range(2)]
    assert echoes == [first, second]


def test_what_inflates_beyond_the_free_ratio_is_paced_at_inflate_rate(
    start: Callable[..., Daemon],
) -> None:
    """1 KiB messages that inflate to 1 MiB each kept a core busy at 155 KiB/s of input.
    Beyond 32 times their compressed size, what messages inflate to is read at
    ``inflate_rate`` (one second's worth at once): by any time t after the connection, the
    echoes received add up to at most rate x (1 + t), plus one message (the debt a frame
    may leave) and the free share. Unpaced, all 4 MiB came back within milliseconds."""
    rate, size, count = 2**20, 256 * 1024, 16
    daemon = start("--compression", "deflate", "--inflate-rate", str(rate))
    bomb = compress(bytes(size))
    free = 32 * (len(bomb) + 4)  # the tail is put back before inflating
    inflate = inflater()
    began = time.monotonic()  # before the handshake: the budget starts with it
    with raw_deflate_connection(daemon.port) as sock:
        sock.sendall(rawws.frame(rawws.OP_BINARY, bomb, rsv=0x40) * count)
        for k in range(1, count + 1):
            frames = read_message(sock)
            elapsed = time.monotonic() - began
            assert b"".join(inflate(p, fin) for _, fin, p in frames) == bytes(size)
            assert k * size <= rate * (1 + elapsed) + size + k * free, (k, elapsed)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not trimmer.available, reason="no malloc_trim in this C library")
def test_memory_of_closed_deflate_connections_is_given_back(start: Callable[..., Daemon]) -> None:
    """1,000 deflate connections closed left about 40 MiB more in the process than without
    deflate, all of it free inside malloc's heap: once enough zlib state was released, the
    free pages go back to the system (malloc_trim). Waits until most of the growth is gone;
    before, it stayed."""
    daemon = start("--compression", "deflate", "--max-connections", "0")
    message = rawws.frame(rawws.OP_TEXT, compress(text_of(4000)), rsv=0x40)
    with raw_deflate_connection(daemon.port) as sock:  # whatever the first one loads
        sock.sendall(message)
        read_message(sock)
    before = rss(daemon.proc.pid)
    socks = []
    try:
        for _ in range(500):  # about 25 MiB of zlib state, over the 16 MiB that trims
            socks.append(raw_deflate_connection(daemon.port))
            socks[-1].sendall(message)  # the server's encoder exists once it echoes
        for sock in socks:
            read_message(sock)
        grown = rss(daemon.proc.pid) - before
    finally:
        for sock in socks:
            sock.close()
    assert grown > 10_000  # KiB: the state is there
    deadline = time.monotonic() + 15
    while (now := rss(daemon.proc.pid) - before) > grown / 4:
        assert time.monotonic() < deadline, f"still {now} KiB of {grown} after the close"
        time.sleep(0.1)
