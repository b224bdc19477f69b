"""The test peer's controls in relay mode (``--mode relay --controls``): those that act on
the connection (status, subprotocol, headers, ping, no_pong, close or drop after the
client's Nth message, throttle) work on a member; those that act on echoes are a 400."""

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests import rawws
from tests.conftest import Daemon
from tests.test_peer import upgrade


@pytest.fixture
def relay(start: Callable[..., Daemon]) -> Daemon:
    return start("--mode", "relay", "--controls", "--close-timeout", "1")


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("delay=10", "control delay='10': acts on echoes: echo mode only"),
        ("fragment=64", "control fragment='64': acts on echoes: echo mode only"),
        ("send=3", "control send='3': acts on echoes: echo mode only"),
        ("ping=0", "control ping='0': out of range: 0.1 to 60"),
    ],
)
def test_echo_controls_are_refused_in_relay_mode(relay: Daemon, query: str, why: str) -> None:
    status, _, body = upgrade(relay.port, f"/room?{query}")
    assert (status, body) == (400, f"bad request: {why}\n")


def test_status_and_subprotocol_act_on_a_members_handshake(relay: Daemon) -> None:
    status, headers, _ = upgrade(relay.port, "/room?status=429&retry_after=3")
    assert (status, headers["Retry-After"]) == (429, "3")

    async def main() -> tuple[str | None, str | None]:
        offers = [Subprotocol("wsechod.v1"), Subprotocol("chat")]
        async with (
            connect(f"{relay.url}/room?subprotocol=chat", subprotocols=offers) as chosen,
            connect(f"{relay.url}/room", subprotocols=offers) as plain,
        ):
            return chosen.subprotocol, plain.subprotocol

    assert asyncio.run(main()) == ("chat", "wsechod.v1")  # the control's, else the relay's


def test_headers_come_first_then_pings_and_the_channels_messages(relay: Daemon) -> None:
    with rawws.connect(relay.port, "/room?headers=1&ping=0.2") as member:
        opcode, greeting = rawws.read_frame(member)
        assert opcode == rawws.OP_TEXT and b'"request": "GET /room?headers=1&ping=0.2' in greeting
        assert rawws.read_frame(member) == (rawws.OP_PING, b"1")
        with rawws.connect(relay.port, "/room") as publisher:
            rawws.send_frame(publisher, rawws.OP_TEXT, b"hello")
            got = rawws.read_frame(member)
            while got[0] == rawws.OP_PING:
                got = rawws.read_frame(member)
            assert got == (rawws.OP_TEXT, b"hello")


def test_no_pong_leaves_a_members_pings_unanswered(relay: Daemon) -> None:
    with (
        rawws.connect(relay.port, "/room?no_pong=1") as member,
        rawws.connect(relay.port, "/room") as publisher,
    ):
        member.sendall(rawws.frame(rawws.OP_PING, b"hi"))
        rawws.send_frame(publisher, rawws.OP_TEXT, b"after")
        assert rawws.read_frame(member) == (rawws.OP_TEXT, b"after")  # no pong before it


def test_close_after_the_members_nth_message_which_is_relayed(relay: Daemon) -> None:
    async def main() -> tuple[list[str], int, str]:
        async with (
            connect(f"{relay.url}/room") as listener,
            connect(f"{relay.url}/room?close=4000&reason=bye&after=2") as member,
        ):
            await member.send("a")
            await member.send("b")
            with pytest.raises(ConnectionClosed) as closed:
                await member.recv()
            got = [str(await listener.recv()) for _ in range(2)]
            assert closed.value.rcvd is not None
            return got, closed.value.rcvd.code, closed.value.rcvd.reason

    assert asyncio.run(main()) == (["a", "b"], 4000, "bye")


def test_drop_after_the_members_message_with_a_fin(relay: Daemon) -> None:
    with (
        rawws.connect(relay.port, "/room") as listener,
        rawws.connect(relay.port, "/room?drop=1&how=fin") as member,
    ):
        rawws.send_frame(member, rawws.OP_TEXT, b"last")
        assert rawws.until_eof(member) == b""  # no close frame: a FIN
        assert rawws.read_frame(listener) == (rawws.OP_TEXT, b"last")


@pytest.mark.timeout(60)
def test_a_throttled_member_is_a_slow_consumer(start: Callable[..., Daemon]) -> None:
    """A member that reads all it gets, at 1 KiB/s: once write_limit is waiting for it
    longer than slow_consumer_timeout, it is closed like any slow consumer; the others
    get every message."""
    daemon = start(
        "--mode", "relay", "--controls", "--slow-consumer", "close",
        "--slow-consumer-timeout", "0.5", "--close-timeout", "1", "--log-level", "debug",
    )  # fmt: skip
    throttled = rawws.connect(daemon.port, "/room?throttle=1024")

    def read_all() -> None:
        with contextlib.suppress(OSError):  # a reset, once close_timeout cuts it
            rawws.until_eof(throttled)

    reading = threading.Thread(target=read_all, daemon=True)
    reading.start()

    async def main() -> list[bytes]:
        async with (
            connect(f"{daemon.url}/room") as listener,
            connect(f"{daemon.url}/room") as publisher,
        ):
            for i in range(100):
                await publisher.send(i.to_bytes(4, "big") + bytes(1020))
            return [await listener.recv(decode=False) for _ in range(100)]

    got = asyncio.run(main())
    assert [int.from_bytes(m[:4], "big") for m in got] == list(range(100))
    event = daemon.wait_for("slow consumer: closing", timeout=20)
    assert event["peer"].endswith(f":{throttled.getsockname()[1]}")
    reading.join(20)
    assert not reading.is_alive()  # its connection ended (close_timeout after the close)
    throttled.close()


def test_headers_come_before_the_wsechod_v1_position_line(relay: Daemon) -> None:
    async def main() -> tuple[dict[str, object], str]:
        offers = [Subprotocol("wsechod.v1")]
        async with connect(f"{relay.url}/room?headers=1", subprotocols=offers) as ws:
            return json.loads(await ws.recv()), str(await ws.recv())

    greeting, position = asyncio.run(main())
    assert greeting["subprotocol"] == "wsechod.v1"
    assert position.startswith("p ")


def test_a_resume_for_a_member_given_another_subprotocol_is_a_400(relay: Daemon) -> None:
    """Offered wsechod.v1 and chat, resuming, with subprotocol=chat: the resume would be
    lost silently (chat gets no envelopes)."""
    status, _, body = upgrade(
        relay.port, "/room?since=0&epoch=-&subprotocol=chat",
        "Sec-WebSocket-Protocol: wsechod.v1, chat",
    )  # fmt: skip
    assert (status, body) == (
        400, "bad request: since and epoch need the wsechod.v1 subprotocol (relay mode)\n"
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_the_ending_waits_for_the_members_held_message(start: Callable[..., Daemon]) -> None:
    """The Nth message is held while a throttled member is behind: it is relayed when the
    channel moves (here: the slow member closed after 1 s), and only then the ending."""
    daemon = start(
        "--mode", "relay", "--controls", "--slow-consumer", "close",
        "--slow-consumer-timeout", "1", "--close-timeout", "1",
    )  # fmt: skip
    slow = rawws.connect(daemon.port, "/room?throttle=1024")  # reads nothing: slower still

    async def main() -> tuple[float, int, str]:
        async with (
            connect(f"{daemon.url}/room") as listener,
            connect(f"{daemon.url}/room") as publisher,
            connect(f"{daemon.url}/room?close=4000&after=1") as member,
        ):
            await publisher.send(bytes(40 * 2**10))  # past write_limit for the slow one
            assert await listener.recv() == bytes(40 * 2**10)
            sent = time.monotonic()
            await member.send("held")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await member.recv()
            waited = time.monotonic() - sent
            assert closed.value.rcvd is not None
            return waited, closed.value.rcvd.code, str(await listener.recv())

    waited, code, relayed = asyncio.run(main())
    assert (code, relayed) == (4000, "held")
    assert waited >= 0.5  # not at once: after the channel moved (slow_consumer_timeout)
    slow.close()
