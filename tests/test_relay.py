"""Relay mode: channels by path, limits, slow consumers, and Redis between instances."""

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from tests import rawws
from tests.conftest import Daemon, run_cli
from tests.test_echo import http_get

REDIS_SERVER = shutil.which("redis-server")
if REDIS_SERVER is None:
    pytest.fail("redis-server is missing: `make redis` installs it", pytrace=False)


def relay(start: Callable[..., Daemon], *args: str) -> Daemon:
    return start("--mode", "relay", "--log-level", "debug", *args)


async def exchange(
    urls: dict[str, list[str]],
    peers: dict[str, int],
    per_client: int = 20,
    joined: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, list[object]]:
    """Connect the clients (url -> names); each sends ``per_client`` numbered messages (text
    and binary alternately), then a "done" marker, and collects what it receives until it
    has seen the markers of its ``peers[name]`` senders."""
    names = [n for group in urls.values() for n in group]
    where = {n: url for url, group in urls.items() for n in group}  # name -> url
    conns: dict[str, ClientConnection] = {}
    for name in names:
        conns[name] = await connect(where[name])
    received: dict[str, list[object]] = {n: [] for n in names}
    if joined is not None:
        await joined()  # e.g. until every instance has subscribed to the channel

    async def run(name: str, peers: int) -> None:
        ws = conns[name]
        for k in range(per_client):
            await ws.send(f"{name}:{k}" if k % 2 == 0 else f"{name}:{k}".encode())
        await ws.send(f"done:{name}")
        seen = 0
        while seen < peers:
            message = await asyncio.wait_for(ws.recv(), 10)
            received[name].append(message)
            if isinstance(message, str) and message.startswith("done:"):
                seen += 1

    await asyncio.gather(*(run(n, peers[n]) for n in names))
    for ws in conns.values():
        await ws.close()
    return received


def expected_for(name: str, senders: list[str], per_client: int = 20) -> list[object]:
    out: list[object] = []
    for s in senders:
        out += [f"{s}:{k}" if k % 2 == 0 else f"{s}:{k}".encode() for k in range(per_client)]
        out.append(f"done:{s}")
    return out


def by_sender(messages: list[object]) -> dict[str, list[object]]:
    """Split a receiver's messages per sender, keeping their order."""
    out: dict[str, list[object]] = {}
    for m in messages:
        text = m if isinstance(m, str) else m.decode()  # type: ignore[attr-defined]
        sender = text.split(":")[1] if text.startswith("done:") else text.split(":")[0]
        out.setdefault(sender, []).append(m)
    return out


def check_channels(
    received: dict[str, list[object]], groups: dict[str, list[str]], echo: bool = False
) -> None:
    for members in groups.values():
        for name in members:
            senders = [s for s in members if s != name or echo]
            got = by_sender(received[name])
            assert sorted(got) == sorted(senders), (name, sorted(got))
            for s in senders:  # everything, exactly once, in the sender's order, types kept
                assert got[s] == expected_for(name, [s]), (name, s)


def test_messages_reach_exactly_the_other_members_of_their_channel(
    start: Callable[..., Daemon],
) -> None:
    daemon = relay(start)
    groups = {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"]}
    urls = {f"{daemon.url}/{g}": members for g, members in groups.items()}
    peers = {n: len(m) - 1 for m in groups.values() for n in m}
    check_channels(asyncio.run(exchange(urls, peers)), groups)


def test_relay_echo_sends_back_to_the_sender_too(start: Callable[..., Daemon]) -> None:
    daemon = relay(start, "--relay-echo")
    groups = {"x": ["x1", "x2"]}
    received = asyncio.run(exchange({f"{daemon.url}/x": groups["x"]}, {"x1": 2, "x2": 2}))
    check_channels(received, groups, echo=True)


def test_channel_limits_get_http_errors(start: Callable[..., Daemon]) -> None:
    daemon = relay(start, "--max-channels", "2", "--max-channel-members", "2",
                   "--max-path-length", "16")  # fmt: skip

    def status(path: str) -> int:
        try:
            with sync_connect(f"{daemon.url}{path}", open_timeout=10):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert status("/" + "x" * 16) == 414
    assert status("/a%00<b>") == 400
    with sync_connect(f"{daemon.url}/one"), sync_connect(f"{daemon.url}/one"):
        assert status("/one") == 503  # the channel is full
        with sync_connect(f"{daemon.url}/two"):
            assert status("/three") == 503  # no third channel
    assert status("/three") == 101  # once the others left
    assert "Traceback" not in daemon.log


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


class RssPeak:
    """Samples a process's resident memory on a thread; ``growth_mib`` once stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = rss_kib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return (self.peak - self.baseline) / 1024


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["drop", "close"])
def test_slow_consumer_cannot_grow_memory_or_hold_up_others(
    start: Callable[..., Daemon], policy: str
) -> None:
    daemon = relay(start, "--slow-consumer", policy, "--slow-consumer-timeout", "0.5",
                   "--close-timeout", "1")  # fmt: skip
    chunk, count = 64 * 1024, 800  # 50 MiB through the channel
    url = f"{daemon.url}/firehose"
    slow = rawws.connect(daemon.port, "/firehose")  # handshakes, then never reads
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rss = RssPeak(daemon.proc.pid)

    async def main() -> list[int]:
        async with connect(url, max_size=None) as fast, connect(url) as publisher:
            got: list[int] = []

            async def read() -> None:
                while len(got) < count:
                    message = await asyncio.wait_for(fast.recv(), 30)
                    assert isinstance(message, bytes) and len(message) == chunk
                    got.append(int.from_bytes(message[:4], "big"))

            reader = asyncio.create_task(read())
            for i in range(count):
                await publisher.send(i.to_bytes(4, "big") + bytes(chunk - 4))
            await reader
            return got

    try:
        got = asyncio.run(main())
    finally:
        growth_mib = rss.stop()
        slow.close()
    print(f"slow consumer ({policy}): server RSS grew {growth_mib:.1f} MiB for 50 MiB relayed")
    assert got == list(range(count))  # the fast reader got everything, in order
    assert growth_mib < 32  # the bound the README states
    if policy == "drop":
        daemon.wait_for("slow consumer: dropping its messages")
        closed = daemon.wait_for("connection closed", where=lambda e: e["dropped"] > 0)
        print(f"the slow consumer missed {closed['dropped']} of {count} messages (counted)")
    else:
        daemon.wait_for("slow consumer: closing")
        daemon.wait_for("connection closed", where=lambda e: e["code_sent"] == 1008)


def test_sigterm_in_relay_mode_closes_every_member_with_1001(
    start: Callable[..., Daemon],
) -> None:
    daemon = relay(start)

    async def main() -> list[int]:
        conns = [await connect(f"{daemon.url}/{i % 2}") for i in range(6)]
        await conns[0].send("hi")
        assert await conns[2].recv() == "hi"
        daemon.signal(signal.SIGTERM)
        codes = []
        for ws in conns:

            async def until_closed(ws: ClientConnection = ws) -> None:
                async for _ in ws:  # what was already relayed, then the close
                    pass

            await asyncio.wait_for(until_closed(), 10)
            assert ws.protocol.close_rcvd is not None
            codes.append(ws.protocol.close_rcvd.code)
        return codes

    assert asyncio.run(main()) == [1001] * 6
    assert daemon.wait(10) == 0


def test_invalid_broker_is_a_config_error() -> None:
    result = run_cli("--config", "", "--mode", "relay", "--broker", "http://example")
    assert result.returncode == 2
    assert "invalid broker 'http://example'" in result.stderr


# --- Redis ---------------------------------------------------------------------------------


class RedisServer:
    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:  # ready when it answers PING
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def subscribed(daemon: Daemon, channel: str, since: int, timeout: float = 10) -> None:
    """Wait until the instance has subscribed to ``channel`` in Redis, after its log had
    ``since`` events (the clients joined then; pub/sub gives nobody what came before)."""
    deadline = time.monotonic() + timeout
    while True:
        subs = [e for e in daemon.events[since:] if e["event"] == "broker subscriptions"]
        if subs and channel in subs[-1]["channels"]:
            return
        assert time.monotonic() < deadline, f"never subscribed to {channel}:\n{daemon.log}"
        time.sleep(0.02)


def connected_count(daemon: Daemon) -> int:
    return sum(1 for e in daemon.events if e["event"] == "broker connected")


def test_two_instances_share_channels_through_redis_exactly_once(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    one = relay(start, "--broker", redis_server.url)
    two = relay(start, "--broker", redis_server.url)
    groups = {"room": ["p1", "p2", "q1", "q2"]}
    urls = {f"{one.url}/room": ["p1", "p2"], f"{two.url}/room": ["q1", "q2"]}
    peers = dict.fromkeys(groups["room"], 3)

    since = len(one.events), len(two.events)

    async def joined() -> None:
        await asyncio.to_thread(subscribed, one, "/room", since[0])
        await asyncio.to_thread(subscribed, two, "/room", since[1])

    check_channels(asyncio.run(exchange(urls, peers, joined=joined)), groups)


@pytest.mark.timeout(120)
def test_redis_outage_keeps_local_relay_and_resumes_without_duplicates(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    one = relay(start, "--broker", redis_server.url)
    two = relay(start, "--broker", redis_server.url)

    def health(daemon: Daemon) -> str:
        return http_get(daemon.port, "/healthz")[1]

    async def cross_instance_round() -> None:
        """p (on one) and q (on two) each send once; each must get exactly the other's."""
        since = len(one.events), len(two.events)
        async with connect(f"{one.url}/room") as p, connect(f"{two.url}/room") as q:
            await asyncio.to_thread(subscribed, one, "/room", since[0])
            await asyncio.to_thread(subscribed, two, "/room", since[1])
            await p.send("from p")
            await q.send("from q")
            assert await asyncio.wait_for(q.recv(), 10) == "from p"
            assert await asyncio.wait_for(p.recv(), 10) == "from q"
            # Nothing more arrives (a duplicate would come right behind the original).
            await p.send("fence p")
            await q.send("fence q")
            assert await asyncio.wait_for(q.recv(), 10) == "fence p"
            assert await asyncio.wait_for(p.recv(), 10) == "fence q"

    async def local_round(daemon: Daemon) -> None:
        async with connect(f"{daemon.url}/local") as a, connect(f"{daemon.url}/local") as b:
            await a.send("still relaying")
            assert await asyncio.wait_for(b.recv(), 10) == "still relaying"

    asyncio.run(cross_instance_round())
    assert health(one) == "ok\n"

    redis_server.kill()
    for daemon in (one, two):
        deadline = time.monotonic() + 10
        while health(daemon) != "degraded: redis broker unreachable\n":
            assert time.monotonic() < deadline, daemon.log
            time.sleep(0.05)
        asyncio.run(local_round(daemon))  # local members are still served
        daemon.wait_for("broker unreachable")

    before = (connected_count(one), connected_count(two))
    redis_server.start()
    deadline = time.monotonic() + 20
    while (connected_count(one), connected_count(two)) <= before or min(
        connected_count(one) - before[0], connected_count(two) - before[1]
    ) < 1:
        assert time.monotonic() < deadline, one.log + two.log
        time.sleep(0.05)
    assert health(one) == "ok\n"
    asyncio.run(cross_instance_round())  # cross-instance relay is back, exactly once
    assert "Traceback" not in one.log + two.log


@pytest.mark.timeout(60)
def test_sigterm_under_load_with_redis_exits_within_the_drain(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    daemon = relay(start, "--broker", redis_server.url, "--drain-timeout", "2")

    async def main() -> float:
        conns = [await connect(f"{daemon.url}/busy") for _ in range(3)]

        async def flood(ws: ClientConnection) -> None:
            with contextlib.suppress(Exception):
                while True:
                    await ws.send(bytes(1024))

        async def swallow(ws: ClientConnection) -> None:
            with contextlib.suppress(Exception):
                async for _ in ws:
                    pass

        tasks = [asyncio.create_task(f(ws)) for ws in conns for f in (flood, swallow)]
        await asyncio.sleep(1.0)  # a second of load through Redis
        sent_at = daemon.signal(signal.SIGTERM)
        await asyncio.wait(tasks, timeout=10)
        return sent_at

    sent_at = asyncio.run(main())
    assert daemon.wait(5) == 0, daemon.log
    assert time.monotonic() - sent_at < 2 + 2
    daemon.wait_for("stopped")
    # Nothing is left subscribed in Redis.
    assert redis.Redis(port=redis_server.port).pubsub_numsub("wsechod:/busy") == [
        (b"wsechod:/busy", 0)
    ]


def test_malformed_message_in_redis_does_not_stop_the_relay(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    one = relay(start, "--broker", redis_server.url)
    two = relay(start, "--broker", redis_server.url)

    async def main() -> None:
        since = len(one.events), len(two.events)
        async with connect(f"{one.url}/room") as p, connect(f"{two.url}/room") as q:
            await asyncio.to_thread(subscribed, one, "/room", since[0])
            await asyncio.to_thread(subscribed, two, "/room", since[1])
            poison = redis.Redis(port=redis_server.port)
            poison.publish("wsechod:/room", b"12345678t\xff")  # not UTF-8
            poison.publish("wsechod:/room", b"x")  # too short to be anybody's
            await p.send("after the poison")
            assert await asyncio.wait_for(q.recv(), 10) == "after the poison"

    asyncio.run(main())
    two.wait_for("malformed message from redis dropped")
    assert "Traceback" not in one.log + two.log


@pytest.mark.timeout(120)
def test_many_publishers_cannot_pile_up_behind_a_stopped_reader(
    start: Callable[..., Daemon],
) -> None:
    """Eight clients publish at once (and read each other, as channel members do) past a
    client that never reads; incoming buffering is kept small (max_queue 2) so that what
    is measured is the outgoing side."""
    daemon = relay(start, "--max-queue", "2", "--close-timeout", "1")
    publishers, per_publisher, chunk = 8, 8, 256 * 1024
    url = f"{daemon.url}/crowd"
    slow = rawws.connect(daemon.port, "/crowd")
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rss = RssPeak(daemon.proc.pid)

    async def main() -> dict[int, list[int]]:
        got: dict[int, list[int]] = {p: [] for p in range(publishers)}
        async with connect(url, max_size=None) as fast:
            pubs = [await connect(url, max_size=None) for _ in range(publishers)]

            async def publish(p: int) -> None:
                for i in range(per_publisher):
                    await pubs[p].send(bytes([p, i]) + bytes(chunk - 2))

            async def discard(ws: ClientConnection) -> None:  # publishers read the channel too
                with contextlib.suppress(Exception):
                    async for _ in ws:
                        pass

            async def read() -> None:
                for _ in range(publishers * per_publisher):
                    message = await asyncio.wait_for(fast.recv(), 30)
                    assert isinstance(message, bytes)
                    got[message[0]].append(message[1])

            readers = [asyncio.create_task(discard(ws)) for ws in pubs]
            await asyncio.gather(read(), *(publish(p) for p in range(publishers)))
            for ws in pubs:
                await ws.close()
            await asyncio.gather(*readers)
        return got

    try:
        got = asyncio.run(main())
    finally:
        growth_mib = rss.stop()
        slow.close()
    print(f"8 publishers, 16 MiB, one stopped reader: server RSS grew {growth_mib:.1f} MiB")
    assert got == {p: list(range(per_publisher)) for p in range(publishers)}
    assert growth_mib < 24
