"""Channel history and resume (memory broker): offsets in wsechod.v1 envelopes, a resume
with ?since=&epoch= that gives what was missed then the live stream with no gap and no
duplicate, and an explicit answer when history cannot fill the gap. Clients: websockets
(asyncio) and websocket-client (which shows each frame's opcode)."""

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import websocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.conftest import Daemon, run_cli
from tests.credentials import KEY
from tests.redisd import RedisServer
from tests.test_api import post
from tests.test_echo import http_get
from tests.test_relay import subscribed
from tests.test_workers import wait_until
from wsechod.brokers.format import APPEND, CHAIN, DIVERGE, LOOK, went_on
from wsechod.brokers.memory import MemoryHistory
from wsechod.brokers.trail import WINDOW, Trail
from wsechod.history import History, Position

V1 = [Subprotocol("wsechod.v1")]


def relay(start: Callable[..., Daemon], *args: str) -> Daemon:
    return start("--mode", "relay", "--history-size", "100", "--history-ttl", "60", *args)


def envelope(message: str | bytes) -> tuple[str, int, str, str | bytes]:
    """(kind, offset, epoch, payload) of a wsechod.v1 message."""
    raw = message.encode() if isinstance(message, str) else message
    line, _, payload = raw.partition(b"\n")
    kind, offset, epoch = line.decode().split(" ")
    return kind, int(offset), epoch, payload.decode() if isinstance(message, str) else payload


async def joined(url: str) -> tuple[ClientConnection, int, str]:
    """A v1 member, once it has its position (the server's ``p``)."""
    ws = await connect(url, subprotocols=V1)
    kind, offset, epoch, _ = envelope(await asyncio.wait_for(ws.recv(), 10))
    assert kind == "p", (kind, offset)
    return ws, offset, epoch


async def published(url: str, *messages: str | bytes) -> None:
    async with connect(url) as pub:
        for message in messages:
            await pub.send(message)


def test_v1_members_get_offsets_in_envelopes_and_plain_members_plain_messages(
    start: Callable[..., Daemon],
) -> None:
    daemon = relay(start)
    url = f"{daemon.url}/room"

    async def main() -> None:
        ws, top, epoch = await joined(url)
        assert (top, ws.subprotocol) == (0, "wsechod.v1")
        async with ws, connect(url) as plain:
            await published(url, "one", b"\x00two", "three")
            got = [envelope(await ws.recv()) for _ in range(3)]
            assert got == [
                ("m", 1, epoch, "one"),
                ("m", 2, epoch, b"\x00two"),
                ("m", 3, epoch, "three"),
            ]
            assert [await plain.recv() for _ in range(3)] == ["one", b"\x00two", "three"]

    asyncio.run(main())
    # websocket-client: the frame types are kept (text stays text, binary binary).
    ws = websocket.create_connection(f"{url}?since=0&epoch=x", subprotocols=V1, timeout=10)
    try:
        opcode, data = ws.recv_data()
        assert (opcode, data.split(b" ")[0]) == (websocket.ABNF.OPCODE_TEXT, b"l")
    finally:
        ws.close()


def test_a_resume_under_a_publisher_that_does_not_stop_has_no_gap_and_no_duplicate(
    start: Callable[..., Daemon],
) -> None:
    """Three reconnects while a publisher sends without pause, the last one reading its
    replay slowly (its write buffer full: what arrives live meanwhile waits or is read
    from history again): every offset once, in order, each with its own message."""
    daemon = relay(start, "--history-size", "5000", "--write-limit", "4096")
    url = f"{daemon.url}/stream"

    async def main() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            async with connect(url) as pub:
                n = 0
                while not stop.is_set():
                    n += 1
                    await pub.send(f"{n:06d}" + "x" * 200)
                    await asyncio.sleep(0.001)  # about 1,000 a second at most

        sending = asyncio.create_task(publisher())
        ws, offset, epoch = await joined(url)
        for round_ in range(4):
            async with ws:
                junction = False
                for _ in range(300 if round_ < 3 else 1500):
                    kind, at, e, payload = envelope(await asyncio.wait_for(ws.recv(), 10))
                    assert e == epoch
                    if kind == "p":  # the junction: replay done, live from here
                        assert at == offset and not junction
                        junction = True
                        continue
                    assert (kind, at) == ("m", offset + 1), (kind, at, offset)
                    offset = at
                    seen.append((at, str(payload)[:6]))
                    if round_ == 3 and len(seen) % 100 == 0:
                        await asyncio.sleep(0.05)  # a slow reader while catching up
                assert round_ == 0 or junction
            await asyncio.sleep(0.05)  # missed meanwhile
            ws = await connect(f"{url}?since={offset}&epoch={epoch}", subprotocols=V1)
        await ws.close()
        stop.set()
        await sending
        return seen

    seen = asyncio.run(main())
    offsets = [at for at, _ in seen]
    assert offsets == list(range(1, len(seen) + 1))
    assert all(int(number) == at for at, number in seen)  # its own message, not another's


def test_a_gap_history_cannot_fill_is_said_then_the_live_stream_follows(
    start: Callable[..., Daemon],
) -> None:
    daemon = relay(start, "--history-size", "5")
    url = f"{daemon.url}/room"

    async def main() -> None:
        ws, _, epoch = await joined(url)
        await ws.close()
        await published(url, *(f"m{i}" for i in range(1, 21)))
        async with await connect(f"{url}?since=1&epoch={epoch}", subprotocols=V1) as late:
            assert envelope(await late.recv()) == ("l", 20, epoch, "")
            await published(url, "live")
            assert envelope(await late.recv()) == ("m", 21, epoch, "live")
        # Within reach (the last five: 17 to 21), then the junction.
        async with await connect(f"{url}?since=16&epoch={epoch}", subprotocols=V1) as near:
            got = [envelope(await asyncio.wait_for(near.recv(), 10))[:2] for _ in range(6)]
            assert got == [("m", n) for n in range(17, 22)] + [("p", 21)]
        # Another epoch, or an offset beyond the top: lost, and the position now.
        for query in ("since=3&epoch=other", f"since=99&epoch={epoch}"):
            async with await connect(f"{url}?{query}", subprotocols=V1) as wrong:
                assert envelope(await wrong.recv()) == ("l", 21, epoch, "")

    asyncio.run(main())


def test_a_restart_is_a_new_epoch(start: Callable[..., Daemon]) -> None:
    first = relay(start)
    url = f"{first.url}/room"

    async def before() -> str:
        ws, _, epoch = await joined(url)
        await ws.close()
        await published(url, "a", "b")
        return epoch

    epoch = asyncio.run(before())
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    second = relay(start)

    async def after() -> None:
        resumed = f"{second.url}/room?since=2&epoch={epoch}"
        async with await connect(resumed, subprotocols=V1) as ws:
            kind, offset, new, _ = envelope(await ws.recv())
            assert (kind, offset) == ("l", 0) and new != epoch

    asyncio.run(after())


def test_history_expires_after_its_ttl_and_a_quiet_channel_keeps_its_position(
    start: Callable[..., Daemon],
) -> None:
    daemon = relay(start, "--history-ttl", "0.5")
    url = f"{daemon.url}/room"

    async def main() -> None:
        ws, _, epoch = await joined(url)
        await ws.close()
        await published(url, "a", "b", "c")
        async with await connect(f"{url}?since=1&epoch={epoch}", subprotocols=V1) as ws:
            got = [envelope(await ws.recv())[:2] for _ in range(3)]
            assert got == [("m", 2), ("m", 3), ("p", 3)]
        deadline = time.monotonic() + 10
        while True:  # until the entries have expired
            async with await connect(f"{url}?since=1&epoch={epoch}", subprotocols=V1) as ws:
                if envelope(await ws.recv())[0] == "l":
                    break
            assert time.monotonic() < deadline, "history never expired"
            await asyncio.sleep(0.1)
        # Nothing missed since offset 3: told so, though the entries are gone.
        async with await connect(f"{url}?since=3&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("p", 3, epoch, "")

    asyncio.run(main())


def test_history_memory_bounds_what_is_kept_the_oldest_channel_first(
    start: Callable[..., Daemon],
) -> None:
    """64 KiB in all: 100 messages of 4 KiB on one channel do not all stay; the most
    recent do; a channel published to later pushes out the first one's messages, then its
    position (a new epoch from then on); members who only join cost nothing."""
    daemon = relay(start, "--history-memory", "65536", "--max-size", "8192")
    body = "x" * 4096

    async def main() -> None:
        a, _, epoch = await joined(f"{daemon.url}/a")
        await a.close()
        await published(f"{daemon.url}/a", *(f"{i:03d}{body}" for i in range(1, 101)))
        async with await connect(f"{daemon.url}/a?since=0&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv())[:2] == ("l", 100)
        async with await connect(f"{daemon.url}/a?since=95&epoch={epoch}", subprotocols=V1) as ws:
            assert [envelope(await ws.recv())[:2] for _ in range(6)][-1] == ("p", 100)
        for n in range(500):  # joins create nothing: /a keeps its messages
            joiner, _, _ = await joined(f"{daemon.url}/join/{n}")
            await joiner.close()
        async with await connect(f"{daemon.url}/a?since=95&epoch={epoch}", subprotocols=V1) as ws:
            assert [envelope(await ws.recv())[:2] for _ in range(6)][-1] == ("p", 100)
        await published(f"{daemon.url}/b", *(f"{i:03d}{body}" for i in range(1, 21)))
        async with await connect(f"{daemon.url}/a?since=95&epoch={epoch}", subprotocols=V1) as ws:
            kind, offset, new, _ = envelope(await ws.recv())
            assert (kind, offset) == ("l", 0) and new != epoch
        page = (await asyncio.to_thread(http_get, daemon.port, "/metrics"))[1]
        kept = re.search(r"^wsechod_relay_history_bytes (\S+)$", page, re.M)
        assert kept is not None and 65536 >= float(kept.group(1)) > 4096 * 10  # the bound

    asyncio.run(main())


def test_the_api_answers_with_the_offset_and_members_get_the_message_there(
    start: Callable[..., Daemon], key_file: Path
) -> None:
    daemon = relay(start, "--api-key-file", str(key_file))

    async def main() -> None:
        ws, _, epoch = await joined(f"{daemon.url}/news")
        async with ws:
            headers = {"X-API-Key": KEY, "Content-Type": "text/plain"}
            status, answer, _ = await asyncio.to_thread(
                post, daemon.port, "/publish/news", b"hello", headers
            )
            assert (status, answer) == (
                202,
                {"channel": "/news", "delivered_here": 1, "offset": 1, "epoch": epoch},
            )
            assert envelope(await ws.recv()) == ("m", 1, epoch, "hello")
        # No member here: kept all the same, for whoever resumes.
        status, answer, _ = post(daemon.port, "/publish/news", b"later", {"X-API-Key": KEY})
        assert (status, answer["delivered_here"], answer["offset"]) == (202, 0, 2)

    asyncio.run(main())


def test_policies_per_channel_and_the_sender_is_left_out_unless_relay_echo(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text(
        '[[channel]]\npattern = "/kept/*"\nhistory_size = 10\nhistory_ttl = 60.0\n'
        "relay_echo = true\n"
    )
    daemon = start("--mode", "relay", "--config", str(config))

    async def main() -> None:
        plain, top, epoch = await joined(f"{daemon.url}/other")
        assert (top, epoch) == (0, "-")  # no history here
        kept, _, kept_epoch = await joined(f"{daemon.url}/kept/1")
        async with plain, kept:
            await published(f"{daemon.url}/other", "x")
            assert envelope(await plain.recv()) == ("m", 0, "-", "x")
            await kept.send("mine")  # relay_echo: back to its sender, numbered
            assert envelope(await kept.recv()) == ("m", 1, kept_epoch, "mine")
        async with await connect(f"{daemon.url}/other?since=0&epoch=-", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("l", 0, "-", "")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("since=1", "since and epoch go together"),
        ("since=abc&epoch=e", "since='abc': an offset"),
        ("since=1&since=2&epoch=e", "since given 2 times"),
        ("since=1&epoch=a%20b", "epoch='a b'"),
        ("since=" + "9" * 5000 + "&epoch=e", "an offset (0 or more)"),  # no int() of it
    ],
)
def test_a_bad_resume_is_a_400_naming_the_parameter(
    start: Callable[..., Daemon], query: str, says: str
) -> None:
    daemon = relay(start)

    async def main() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{daemon.url}/room?{query}", subprotocols=V1)
        assert refused.value.response.status_code == 400
        assert says in refused.value.response.body.decode()
        with pytest.raises(InvalidStatus) as plain:  # a resume needs envelopes
            await connect(f"{daemon.url}/room?since=1&epoch=e")
        assert b"need the wsechod.v1 subprotocol" in plain.value.response.body
        async with connect(f"{daemon.url}/room?other=1&cache=2") as ws:  # others: ignored
            assert ws.subprotocol is None

    asyncio.run(main())


def test_history_settings_are_checked(tmp_path: Path) -> None:
    only_size = run_cli("--check-config", "--mode", "relay", "--history-size", "10")
    assert (only_size.returncode, only_size.stderr) == (
        2,
        "wsechod: error: invalid history_ttl 0.0 (from default): history needs both "
        "history_size and history_ttl (or neither)\n",
    )
    config = tmp_path / "w.toml"
    config.write_text('[[channel]]\npattern = "/a"\nhistory_ttl = 5.0\n')
    table = run_cli("--check-config", "--mode", "relay", "--config", str(config))
    assert table.returncode == 2 and "[[channel]] '/a'" in table.stderr, table.stderr
    assert len(table.stderr.strip().splitlines()) == 1


# --- with Redis: history shared by every instance -------------------------------------------


def redis_relays(start: Callable[..., Daemon], url: str, *args: str) -> tuple[Daemon, Daemon]:
    args = ("--broker", url, "--log-level", "debug", *args)
    return relay(start, *args), relay(start, *args)


def test_instances_share_offsets_and_a_resume_works_on_another_instance(
    start: Callable[..., Daemon], redis_server: RedisServer, key_file: Path
) -> None:
    one, two = redis_relays(start, redis_server.url, "--api-key-file", str(key_file))

    async def main() -> None:
        a, _, epoch = await joined(f"{one.url}/room")
        b, _, epoch_b = await joined(f"{two.url}/room")
        assert epoch == epoch_b  # one channel, one epoch, whichever instance
        async with a, b:
            await asyncio.to_thread(subscribed, two, "/room", 0)
            await asyncio.to_thread(subscribed, one, "/room", 0)
            await a.send("from one")  # not back to its sender (relay_echo is off)
            await published(f"{two.url}/room", "from two")
            headers = {"X-API-Key": KEY, "Content-Type": "text/plain"}
            status, answer, _ = await asyncio.to_thread(
                post, one.port, "/publish/room", b"from the api", headers
            )
            assert (status, answer["offset"], answer["epoch"]) == (202, 3, epoch), answer
            got_b = [envelope(await asyncio.wait_for(b.recv(), 10)) for _ in range(3)]
            assert got_b == [
                ("m", 1, epoch, "from one"),
                ("m", 2, epoch, "from two"),
                ("m", 3, epoch, "from the api"),
            ]
            got_a = [envelope(await asyncio.wait_for(a.recv(), 10)) for _ in range(2)]
            assert got_a == [("m", 2, epoch, "from two"), ("m", 3, epoch, "from the api")]
        # Away from instance two; back on instance one, after two more.
        await published(f"{two.url}/room", "4", "5")
        resumed = f"{one.url}/room?since=1&epoch={epoch}"
        async with await connect(resumed, subprotocols=V1) as ws:
            got = [envelope(await asyncio.wait_for(ws.recv(), 10))[:2] for _ in range(5)]
            assert got == [("m", 2), ("m", 3), ("m", 4), ("m", 5), ("p", 5)]

    asyncio.run(main())


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (from /proc: no tool needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_after_its_session_with_redis_breaks_an_instance_delivers_what_it_missed(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """Instance two's connections to Redis are killed while instance one publishes: its
    member still gets every message, once, in order, read from history after the
    reconnect (a plain member: nothing to do on its side)."""
    one, two = redis_relays(start, redis_server.url)
    admin = redis.Redis(port=redis_server.port)

    def connected() -> int:
        return sum(e["event"] == "broker connected" for e in two.events)

    async def main() -> list[str | bytes]:
        async with connect(f"{two.url}/feed") as member, connect(f"{one.url}/feed") as pub:
            await asyncio.to_thread(subscribed, two, "/feed", 0)
            await asyncio.to_thread(subscribed, one, "/feed", 0)
            await pub.send("0")
            assert await asyncio.wait_for(member.recv(), 10) == "0"
            sessions = connected()
            ports = local_ports(two.proc.pid)
            theirs = [
                c["id"] for c in admin.client_list() if int(c["addr"].rsplit(":")[1]) in ports
            ]
            assert len(theirs) >= 3  # subscriber, publisher, reader (and presence)
            for n in range(1, 51):
                await pub.send(str(n))
                if n == 10:
                    for client_id in theirs:
                        admin.client_kill_filter(_id=client_id)
            await asyncio.to_thread(
                two.wait_for, "broker connected", 20, lambda _: connected() > sessions
            )
            return [await asyncio.wait_for(member.recv(), 10) for _ in range(50)]

    got = asyncio.run(main())
    assert got == [str(n) for n in range(1, 51)]
    assert "Traceback" not in one.log + two.log


def test_history_turned_off_by_a_reload_during_a_replay_is_said_and_nothing_is_lost(
    start: Callable[..., Daemon], tmp_path: Path, key_file: Path
) -> None:
    """Found by a hostile run: the live messages held for a member that was catching up
    were dropped, without a word, when a reload turned history off mid-replay."""
    config = tmp_path / "wsechod.toml"
    config.write_text("history_size = 1000\nhistory_ttl = 600.0\n")
    daemon = start(
        "--mode", "relay", "--config", str(config), "--write-limit", "4096",
        "--api-key-file", str(key_file),
    )  # fmt: skip
    url = f"{daemon.url}/room"

    async def main() -> list[tuple[str, int, str, str | bytes]]:
        ws, _, epoch = await joined(url)
        await ws.close()
        # 12 MB, fewer than a chunk of history reads (256): the case that lost them
        await published(url, *(f"{n:04d}" + "x" * 60_000 for n in range(1, 201)))
        async with await connect(f"{url}?since=0&epoch={epoch}", subprotocols=V1) as late:
            first = [envelope(await asyncio.wait_for(late.recv(), 10)) for _ in range(3)]
            config.write_text("")  # history off
            since = len(daemon.events)
            daemon.signal(signal.SIGHUP)
            await asyncio.to_thread(
                daemon.wait_for,
                "setting changed",
                10,
                lambda e: e["key"] == "history_ttl" and daemon.events.index(e) >= since,
            )
            for n in range(5):
                assert (
                    post(daemon.port, "/publish/room", f"live {n}".encode(), {"X-API-Key": KEY})[0]
                    == 202
                )
            rest: list[tuple[str, int, str, str | bytes]] = []
            while len(rest) < 6 or rest[-1][3] != b"live 4":
                rest.append(envelope(await asyncio.wait_for(late.recv(), 10)))
            return first + rest

    got = asyncio.run(main())
    kinds = [kind for kind, *_ in got]
    assert kinds.count("l") == 1
    lost = kinds.index("l")
    assert got[lost][:3] == ("l", 0, "-")
    assert [g[1] for g in got[:lost]] == list(range(1, lost + 1))  # in order, none twice
    assert [g[3] for g in got[lost + 1 :]] == [f"live {n}".encode() for n in range(5)]


@pytest.mark.unit
def test_reading_history_creates_nothing_and_a_lost_ring_means_new_epochs() -> None:
    """Found by a hostile run: each join made a ring, and enough joins pushed out every
    channel's history. Now only publishing does; rings count in history_memory."""
    kept = History(10, 60.0)
    store = MemoryHistory(limit=4096)
    epoch = store.append("/real", b"x" * 100, False, kept).epoch
    for n in range(10_000):
        assert store.recover(f"/join/{n}", None, 10, kept).top == Position(0, epoch)
    found = store.recover("/real", Position(0, epoch), 10, kept)
    assert found.entries is not None and [e.payload for e in found.entries] == [b"x" * 100]
    for n in range(20):  # publishing does push the least recently used out
        store.append(f"/busy/{n}", b"y" * 100, False, kept)
    assert store.held <= 4096
    gone = store.recover("/real", Position(1, epoch), 10, kept)
    assert gone.entries is None and gone.top.epoch != epoch  # its offsets start again


def test_history_redis_lost_behind_an_instance_becomes_a_new_epoch(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """Redis comes back with an older copy of a channel (its counter behind what an
    instance delivered, as after a restart from a snapshot): offsets are not used twice
    in one epoch; the channel gets a new one, offsets going on from where they were."""
    one, two = redis_relays(start, redis_server.url)
    admin = redis.Redis(port=redis_server.port)

    async def main() -> None:
        member, epoch = await fed(one, two, 5)
        async with member:
            admin.hset("wsechod:{/feed}:m", "o", 2)  # offsets 3 to 5 "lost"
            kill_sessions(admin, two)
            warned = await asyncio.to_thread(two.wait_for, DIFFERS, 20)
            assert (warned["since"], warned["started_here"]) == (6, True)
            await published(f"{one.url}/feed", "after")
            kind, offset, new, payload = envelope(await asyncio.wait_for(member.recv(), 10))
            assert (kind, offset, payload) == ("m", 6, "after") and new != epoch
        stale = f"{one.url}/feed?since=5&epoch={epoch}"
        async with await connect(stale, subprotocols=V1) as ws:
            # It had 1 to 5, which Redis still has: it goes on in the new epoch.
            assert envelope(await ws.recv()) == ("m", 6, new, "after")

    asyncio.run(main())


def test_look_finds_the_first_message_redis_holds_otherwise_and_diverge_replaces_the_epoch(
    redis_server: RedisServer,
) -> None:
    """The scripts an instance runs after its session with Redis starts again, on a real
    Redis: LOOK compares the ids of the last WINDOW messages delivered with what the stream
    holds at those offsets (the same payload published again is another message; trimmed
    offsets are skipped, missing ones past the counter lost); DIVERGE replaces the epoch
    at the same offsets, keeps the hash's ttl, and records what it replaced, which LOOK
    and a resume then follow."""
    admin = redis.Redis(port=redis_server.port)
    keys = ("wsechod:{/c}:m", "wsechod:{/c}:h")
    meta, stream = keys

    def append(n: int, payload: bytes, message_id: int) -> None:
        assert appended(admin, keys, payload, message_id, run_id="A") == [n, b"E"]

    def look(trail: Trail) -> list[Any]:  # an instance on the same server, "A"
        return admin.eval(LOOK, 2, *keys, *trail.look(), "A")  # type: ignore[no-any-return]

    trail = Trail(Position(0, "E"))
    for n in range(1, 101):
        append(n, str(n).encode(), 1000 + n)
        trail.delivered(Position(n, "E"), 1000 + n)
    assert trail.window() == range(101 - WINDOW, 101)
    assert look(trail) == [b"E", 100, 0, 0, b""]
    admin.xtrim(stream, minid="90-0")  # 37 to 89 trimmed: not a difference
    lagged(admin, "/c", 97)  # a replica that had 97, promoted
    assert look(trail) == [b"E", 97, 98, 0, b""]  # 98 to 100 lost
    append(98, b"98", 5000)  # the same payload again, from another instance: not the same
    assert look(trail) == [b"E", 98, 98, 0, b""]
    assert admin.eval(DIVERGE, 2, *keys, "E", 98, "F", 60, CHAIN, "A") == 1
    assert admin.eval(DIVERGE, 2, *keys, "E", 98, "G", 60, CHAIN, "A") == 0  # no longer E
    assert admin.hgetall(meta) == {b"e": b"F", b"o": b"98", b"pe": b"E 98", b"r": b"A"}
    assert admin.ttl(meta) > 86_400  # APPEND's seven days, not shortened
    # Another instance that delivered 1 to 99 follows it into F: 98 differs there too.
    assert look(trail) == [b"F", 98, 98, 1, b""]  # E replaced there: known
    behind = Trail(Position(0, "E"))
    for n in range(80, 98):
        behind.delivered(Position(n, "E"), 1000 + n)
    assert look(behind) == [b"F", 98, 0, 0, b""]  # all it had is there: it goes on in F
    assert admin.eval(LOOK, 2, *keys, "X", 5, 1, b"", "", "A") == [b"F", 98]  # unrelated
    # Redis went back to before F (a restart from a copy taken in E): an instance in F
    # that saw E replaced compares with E, rather than taking it for a new channel.
    admin.hset(meta, mapping={"e": "E", "o": 97})
    admin.hdel(meta, "pe")
    moved_on = Trail(Position(0, "E"))
    for n in range(90, 101):
        moved_on.delivered(Position(n, "E" if n < 98 else "F"), 1000 + n)
    moved_on.retire("E")
    assert look(moved_on) == [b"E", 97, 98, 0, b""]
    assert went_on(b"E 98", Position(97, "E")) and not went_on(b"E 98", Position(98, "E"))
    assert not went_on(b"F 120 E 98", Position(97, "D"))
    assert went_on(b"F 120 E 98", Position(97, "E"))
    assert not went_on(b"F 90 E 98", Position(97, "E"))  # differed earlier in F
    for n in range(CHAIN + 2):  # the chain keeps the newest CHAIN
        epoch: Any = admin.hget(meta, "e")
        assert admin.eval(DIVERGE, 2, *keys, epoch, 99, f"N{n}", 60, CHAIN, "") == 1
    chain: Any = admin.hget(meta, "pe")
    assert len(chain.split()) == 2 * CHAIN
    admin.delete(meta)
    assert look(trail) == []  # the hash is gone


def appended(
    admin: redis.Redis,
    keys: tuple[str, str],
    payload: bytes,
    message_id: int,
    *,
    run_id: str,
    fresh: str = "E",
) -> Any:
    """APPEND as an instance runs it on the server whose run id is ``run_id`` (``fresh``:
    the epoch if it starts one); its answer (the offset and the epoch)."""
    return admin.eval(
        APPEND, 2, *keys, "ch", b"t" + payload, 1000, 600, 7 * 86_400, fresh, b"h",
        "PUBLISH", message_id.to_bytes(8, "big"), run_id, CHAIN,
    )  # fmt: skip


def test_a_promoted_replica_starts_a_new_epoch_at_its_first_append(
    redis_server: RedisServer,
) -> None:
    """A failover to a replica that lagged by more than the WINDOW ids an instance
    remembers: the first APPEND on the new primary (another server's run id than the
    last append's) starts a new epoch from the offset after the last it holds, and LOOK
    then tells an instance that delivered the lost tail that what differs starts there,
    below every id it remembers, so that it delivers what was published since. Before
    another append, LOOK says the same from where the stream ends, to an instance on
    another server than the last append's (on the same one, it cannot tell)."""
    admin = redis.Redis(port=redis_server.port)
    keys = ("wsechod:{/c}:m", "wsechod:{/c}:h")
    trail = Trail(Position(0, "E"))
    for n in range(1, 101):
        assert appended(admin, keys, str(n).encode(), 1000 + n, run_id="A") == [n, b"E"]
        trail.delivered(Position(n, "E"), 1000 + n)
    lagged(admin, "/c", 20)  # 21 to 100 lost, 80 of them
    assert admin.eval(LOOK, 2, *keys, *trail.look(), "B") == [b"E", 20, 21, 1, b""]
    assert admin.eval(LOOK, 2, *keys, *trail.look(), "A") == [b"E", 20, 37, 0, b""]
    assert admin.eval(LOOK, 2, *keys, *trail.look(), "") == [b"E", 20, 37, 0, b""]
    assert appended(admin, keys, b"new", 5000, run_id="B", fresh="F") == [21, b"F"]
    assert admin.hmget(keys[0], "e", "pe", "r") == [b"F", b"E 21", b"B"]
    assert appended(admin, keys, b"next", 5001, run_id="B", fresh="X") == [22, b"F"]
    assert admin.eval(LOOK, 2, *keys, *trail.look(), "B") == [b"F", 22, 21, 1, b""]
    assert went_on(b"E 21", Position(20, "E")) and not went_on(b"E 21", Position(21, "E"))
    assert appended(admin, keys, b"?", 5002, run_id="", fresh="X") == [23, b"F"]  # no INFO
    assert admin.hget(keys[0], "r") is None  # the server is no longer known
    assert admin.eval(DIVERGE, 2, *keys, "F", 24, "G", 60, CHAIN, "C") == 1
    assert admin.hmget(keys[0], "e", "pe", "r") == [b"G", b"F 24 E 21", b"C"]


def test_a_redis_that_refuses_info_keeps_history_and_it_is_said(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """An ACL user without INFO: the instances cannot read the server's run id;
    they say so, and history works on what each remembers (LOOK)."""
    admin = redis.Redis(port=redis_server.port)
    admin.acl_setuser(
        "relay", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
        commands=["+@all", "-info"],
    )  # fmt: skip
    one, two = redis_relays(start, f"redis://relay:secret@127.0.0.1:{redis_server.port}")
    for daemon in (one, two):
        assert "info" in daemon.wait_for("redis refused INFO: history relies on LOOK")["error"]

    async def main() -> None:
        member, epoch = await fed(one, two, 3)
        async with member:
            pass
        async with await connect(f"{one.url}/feed?since=1&epoch={epoch}", subprotocols=V1) as ws:
            assert [envelope(await ws.recv())[1:] for _ in range(2)] == [
                (2, epoch, "2"),
                (3, epoch, "3"),
            ]

    asyncio.run(main())
    assert admin.hget("wsechod:{/feed}:m", "r") is None


DIFFERS = "history in redis differs from what was delivered: a new epoch"


def kill_sessions(admin: redis.Redis, daemon: Daemon) -> None:
    """Close a daemon's connections to Redis from the Redis side."""
    ports = local_ports(daemon.proc.pid)
    for client in admin.client_list():
        if int(client["addr"].rsplit(":")[1]) in ports:
            admin.client_kill_filter(_id=client["id"])


def lagged(admin: redis.Redis, channel: str, offset: int, *, promoted: bool = False) -> None:
    """The channel as a replica that had received only up to ``offset`` has it (the
    stream's last id too), promoted. ``promoted``: with the last append made on another
    primary than this one, as the hash says on a replica promoted (without: as an
    instance that cannot read the server's run id sees it)."""
    meta, stream = f"wsechod:{{{channel}}}:m", f"wsechod:{{{channel}}}:h"
    kept: Any = admin.xrange(stream, "-", f"{offset}-0")
    with admin.pipeline() as pipe:
        pipe.delete(stream)
        for entry_id, fields in kept:
            pipe.xadd(stream, fields, id=entry_id)
        pipe.hset(meta, "o", offset)
        if promoted:
            pipe.hset(meta, "r", "the old primary")
        pipe.execute()


async def fed(one: Daemon, two: Daemon, count: int) -> tuple[ClientConnection, str]:
    """A v1 member of "/feed" on two, and its epoch, once it has the ``count`` messages
    published on one."""
    member, _, epoch = await joined(f"{two.url}/feed")
    await asyncio.to_thread(subscribed, two, "/feed", 0)
    await published(f"{one.url}/feed", *(str(n) for n in range(1, count + 1)))
    got = [envelope(await asyncio.wait_for(member.recv(), 10))[1] for _ in range(count)]
    assert got == list(range(1, count + 1))
    return member, epoch


async def published_while_stopped(
    admin: redis.Redis,
    one: Daemon,
    two: Daemon,
    kept: int,
    message: str,
    *,
    promoted: bool = False,
    first: Callable[[], None] | None = None,
) -> None:
    """While instance two is stopped (SIGSTOP: it cannot look before), "/feed" fails over
    to a replica that had up to ``kept`` (``lagged``), both instances' sessions end, and
    once one is back (and ``first`` has passed) it publishes ``message``, which Redis
    numbers ``kept + 1``; then two goes on."""

    def sessions() -> int:
        return sum(e["event"] == "broker connected" for e in one.events)

    before = sessions()
    os.kill(two.proc.pid, signal.SIGSTOP)
    try:
        lagged(admin, "/feed", kept, promoted=promoted)
        kill_sessions(admin, two)
        kill_sessions(admin, one)
        await asyncio.to_thread(one.wait_for, "broker connected", 20, lambda _: sessions() > before)
        if first is not None:
            await asyncio.to_thread(first)
        await published(f"{one.url}/feed", message)
        numbered = kept + 1  # where Redis lost one, in the old epoch or a new one
        await asyncio.to_thread(
            wait_until,
            lambda: bool(admin.xrange("wsechod:{/feed}:h", numbered, numbered)),
            10,
            "one's message in the stream",
        )
    finally:
        os.kill(two.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("new_epoch_by", ["receiver", "publisher"])
def test_a_message_numbered_where_redis_lost_one_reaches_a_member_that_had_the_lost_one(
    start: Callable[..., Daemon], redis_server: RedisServer, new_epoch_by: str
) -> None:
    """A failover to a replica one message behind (Redis rolled back as it would have
    it), and instance one publishes on it before instance two looks (two is stopped
    meanwhile: the race made certain): the new message takes offset 5, where two had
    delivered the lost one. Before, two dropped it as a message it had (the counter was
    not behind: found by a loaded CI run). Now two asks Redis whether it holds the ids it
    delivered, the channel goes on in a new epoch, and two's member gets the new message,
    then the live stream; a resume from the lost message gets ``l``, one from before it
    goes on. The new epoch started by two itself, or first by instance one when it has a
    member there too (two follows)."""
    one, two = redis_relays(start, redis_server.url)
    admin = redis.Redis(port=redis_server.port)

    def started_first() -> None:  # one starts the new epoch: Redis lost its offset 5
        warned = one.wait_for(DIFFERS, 20)
        assert (warned["since"], warned["started_here"]) == (5, True)

    async def main() -> None:
        member, _, epoch = await joined(f"{two.url}/feed")
        other = (await joined(f"{one.url}/feed"))[0] if new_epoch_by == "publisher" else None
        async with member:
            await asyncio.to_thread(subscribed, two, "/feed", 0)
            if other is not None:
                await asyncio.to_thread(subscribed, one, "/feed", 0)
            await published(f"{one.url}/feed", *(str(n) for n in range(1, 6)))
            got = [envelope(await asyncio.wait_for(member.recv(), 10))[1] for _ in range(5)]
            assert got == [1, 2, 3, 4, 5]
            await published_while_stopped(
                admin, one, two, 4, "6", first=started_first if other is not None else None
            )
            warned = await asyncio.to_thread(two.wait_for, DIFFERS, 20)
            assert (warned["since"], warned["started_here"]) == (5, other is None)
            kind, offset, new, payload = envelope(await asyncio.wait_for(member.recv(), 10))
            assert (kind, offset, payload) == ("m", 5, "6") and new != epoch
            await published(f"{one.url}/feed", "after")
            assert envelope(await asyncio.wait_for(member.recv(), 10)) == ("m", 6, new, "after")
            if other is not None:
                async with other:
                    theirs = [envelope(await asyncio.wait_for(other.recv(), 10)) for _ in range(7)]
                assert theirs[5:] == [("m", 5, new, "6"), ("m", 6, new, "after")]
        # Who had 5 had the lost one: told; who had 4 goes on.
        async with await connect(f"{one.url}/feed?since=5&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("l", 6, new, "")
        async with await connect(f"{one.url}/feed?since=4&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("m", 5, new, "6")

    asyncio.run(main())


def test_a_failover_that_lost_more_than_an_instance_remembers_loses_nothing_after(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """A failover to a replica 80 messages behind (more than the WINDOW ids an instance
    remembers; Redis rolled back as it would have it, with the last append made on
    another primary), and instance one publishes on it before instance two looks (two is
    stopped meanwhile). Before, two could not tell where what differs began: it went on at
    the stream's end, past the new message, and dropped its live copy (found by a loaded
    run of the Sentinel test at 200 messages a second). Now the new primary's first
    append starts a new epoch from offset 21, two's member gets the new message there,
    then the live stream; a resume from before 21 goes on, one from the lost tail is told."""
    one, two = redis_relays(start, redis_server.url)
    admin = redis.Redis(port=redis_server.port)

    async def main() -> None:
        member, epoch = await fed(one, two, 100)
        run_id = admin.info("server")["run_id"]
        assert admin.hget("wsechod:{/feed}:m", "r") == run_id.encode()  # the last append's
        async with member:
            await published_while_stopped(admin, one, two, 20, "new", promoted=True)
            warned = await asyncio.to_thread(two.wait_for, DIFFERS, 20)
            assert (warned["since"], warned["started_here"]) == (21, False)
            kind, offset, new, payload = envelope(await asyncio.wait_for(member.recv(), 10))
            assert (kind, offset, payload) == ("m", 21, "new") and new != epoch
            await published(f"{one.url}/feed", "after")
            assert envelope(await asyncio.wait_for(member.recv(), 10)) == ("m", 22, new, "after")
        async with await connect(f"{one.url}/feed?since=20&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("m", 21, new, "new")
        async with await connect(f"{one.url}/feed?since=90&epoch={epoch}", subprotocols=V1) as ws:
            assert envelope(await ws.recv()) == ("l", 22, new, "")

    asyncio.run(main())


def test_the_api_says_503_when_redis_cannot_keep_a_message_with_history(
    start: Callable[..., Daemon], redis_server: RedisServer, key_file: Path
) -> None:
    daemon = relay(start, "--broker", redis_server.url, "--api-key-file", str(key_file))
    assert post(daemon.port, "/publish/room", b"kept", {"X-API-Key": KEY})[0] == 202
    redis_server.kill()
    daemon.wait_for("broker unreachable", 20)
    status, answer, headers = post(daemon.port, "/publish/room", b"lost", {"X-API-Key": KEY})
    assert (status, headers["Retry-After"]) == (503, "1"), answer
    assert str(answer["error"]).startswith("not published: history unavailable (redis broker")
