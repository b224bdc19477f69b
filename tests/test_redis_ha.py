"""Redis beyond one server, with real processes: a primary, a replica and three sentinels
(failovers ordered from a sentinel, and a primary killed), and a Cluster of three shards
(channels on each, sharded pub/sub, history and presence). Clients: websockets (asyncio)
and http.client for the API."""

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Daemon, run_cli
from tests.credentials import KEY
from tests.redisd import SERVICE, ClusterGroup, RedisServer, SentinelGroup, command
from tests.test_api import post
from tests.test_echo import http_get
from tests.test_history import V1, envelope, joined, published, redis_relays
from tests.test_presence import counts, until
from tests.test_relay import subscribed, wait_health

# The broker URL's host is not used with sentinels: they name the primary.
BEHIND_SENTINELS = "redis://primary/0"


def sentinel_args(group: SentinelGroup) -> tuple[str, ...]:
    flags = [arg for address in group.addresses for arg in ("--redis-sentinels", address)]
    return (*flags, "--redis-sentinel-service", SERVICE)


async def drain(member: ClientConnection, until_payload: str) -> list[tuple[str, int, str, str]]:
    """Envelopes until the one carrying ``until_payload``."""
    got: list[tuple[str, int, str, str]] = []
    while not got or got[-1][3] != until_payload:
        kind, offset, epoch, payload = envelope(await asyncio.wait_for(member.recv(), 20))
        assert isinstance(payload, str)
        got.append((kind, offset, epoch, payload))
    return got


def watching(group: SentinelGroup, instances: int, timeout: float = 40) -> None:
    """Wait until ``instances`` connections subscribed to a sentinel have pinged it (a
    watcher that has been through its keepalive is still subscribed)."""
    deadline = time.monotonic() + timeout
    while True:
        clients = [
            line
            for i in range(3)
            for line in group.ask("CLIENT", "LIST", sentinel=i).decode().splitlines()
        ]
        if sum(" sub=1 " in c and " cmd=ping " in c for c in clients) >= instances:
            return
        assert time.monotonic() < deadline, "\n".join(clients)
        time.sleep(0.1)


def until_metric(daemon: Daemon, line: str, timeout: float = 10) -> None:
    """Poll /metrics (rendered at most once a second) until it has ``line``."""
    deadline = time.monotonic() + timeout
    while line not in (page := http_get(daemon.port, "/metrics")[1]):
        assert time.monotonic() < deadline, page
        time.sleep(0.1)


def warnings_of(daemon: Daemon) -> list[dict[str, Any]]:
    """What a daemon logged above info: shown when a test fails."""
    return [e for e in daemon.events if e.get("level") not in ("info", "debug")]


def in_order(got: list[tuple[str, int, str, str]]) -> None:
    """Payloads (numbers) rise, each once; offsets rise within an epoch."""
    numbers = [int(payload) for kind, _, _, payload in got if kind == "m"]
    assert numbers == sorted(set(numbers)), numbers
    for (_, before, epoch, _), (_, after, next_epoch, _) in itertools.pairwise(got):
        assert next_epoch != epoch or after > before, got


@pytest.mark.timeout(120)
def test_a_sentinel_failover_under_a_publisher_is_followed_in_order(
    start: Callable[..., Daemon], sentinel_group: SentinelGroup
) -> None:
    """SENTINEL FAILOVER while a member on one instance publishes to a member on the
    other: both instances follow the new primary (log and /healthz), the member gets what
    crosses, in order and once, and everything published after the switch, also when what
    the old primary takes until the switch (up to a second, at 200 messages a second) is
    more than the 64 message ids an instance remembers (a loaded run lost the first
    message after the switch then, before the new server's run id started a new epoch)."""
    group = sentinel_group
    one, two = redis_relays(start, BEHIND_SENTINELS, *sentinel_args(group))
    old = f"127.0.0.1:{group.primary.port}"
    for daemon in (one, two):
        daemon.wait_for("broker connected", 20, lambda e: e["primaries"] == old)
    watching(group, 2)  # the failover comes after the watchers' first keepalive

    async def main() -> list[tuple[str, int, str, str]]:
        member, _, _ = await joined(f"{two.url}/feed")
        async with member, connect(f"{one.url}/feed") as pub:
            await asyncio.to_thread(subscribed, two, "/feed", 0)
            await asyncio.to_thread(subscribed, one, "/feed", 0)
            sent = 0
            last: int | None = None  # where the publisher stops, once set

            async def publisher() -> None:
                nonlocal sent
                while last is None or sent < last:
                    sent += 1
                    await pub.send(str(sent))
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(publisher())
            got = await drain(member, "5")
            group.ask("SENTINEL", "FAILOVER", SERVICE)
            new = f"127.0.0.1:{group.replica.port}"
            for daemon in (one, two):
                switched = await asyncio.to_thread(daemon.wait_for, "broker primary switched", 30)
                assert (switched["was"], switched["primaries"]) == (old, new)
            after = sent  # sent once both follow the new primary: none may be missing
            last = after + 20
            await task
            got += await drain(member, str(sent))
            numbers = {int(payload) for kind, _, _, payload in got if kind == "m"}
            missing = set(range(after + 1, sent + 1)) - numbers
            assert not missing, (missing, warnings_of(one), warnings_of(two))
            return got

    in_order(asyncio.run(main()))
    for daemon in (one, two):
        assert http_get(daemon.port, "/healthz")[1] == "ok\n"
        until_metric(daemon, "wsechod_broker_failovers_total 1.0\n")
        warned = daemon.wait_for("broker failing over")
        assert "primary switched" in warned["error"]
    assert group.primary_port() == group.replica.port


@pytest.mark.timeout(120)
def test_a_killed_primary_shows_in_healthz_and_a_resume_crosses_the_failover(
    start: Callable[..., Daemon], sentinel_group: SentinelGroup
) -> None:
    """kill -9 of the primary: /healthz says degraded until the sentinels have promoted the
    replica and the instance has followed; a member that left before resumes on the other
    instance after the failover and gets everything it missed (the replica had it all:
    WAIT), in the epoch the new primary started (the old one goes on in it), then the
    live stream."""
    group = sentinel_group
    one, two = redis_relays(start, BEHIND_SENTINELS, *sentinel_args(group))

    async def main() -> None:
        member, _, epoch = await joined(f"{two.url}/feed")
        async with member:
            await asyncio.to_thread(subscribed, two, "/feed", 0)
            await published(f"{one.url}/feed", "1", "2")
            got = [envelope(await asyncio.wait_for(member.recv(), 10)) for _ in range(2)]
            assert [(o, p) for _, o, _, p in got] == [(1, "1"), (2, "2")]
        await published(f"{one.url}/feed", "3", "4")  # missed: the member has left
        assert command(group.primary.port, "WAIT", 1, 5000) == 1  # the replica has them
        group.primary.kill()
        # unreachable for at least the sentinels' down-after (1 s), then followed
        await asyncio.to_thread(wait_health, two, "degraded: redis broker unreachable\n", 20)
        for daemon in (one, two):
            switched = await asyncio.to_thread(daemon.wait_for, "broker primary switched", 40)
            assert switched["primaries"] == f"127.0.0.1:{group.replica.port}"
            assert http_get(daemon.port, "/healthz")[1] == "ok\n"
        assert one.wait_for("broker unreachable")["url"].startswith("sentinel service")
        await published(f"{one.url}/feed", "5")
        resumed = f"{one.url}/feed?since=2&epoch={epoch}"
        async with connect(resumed, subprotocols=V1) as ws:
            got = [envelope(await asyncio.wait_for(ws.recv(), 10)) for _ in range(4)]
            new = got[0][2]  # another primary: a new epoch, the old one goes on in it
            assert new != epoch
            assert got == [
                ("m", 3, new, "3"),
                ("m", 4, new, "4"),
                ("m", 5, new, "5"),
                ("p", 5, new, ""),
            ]
            await published(f"{two.url}/feed", "6")
            assert envelope(await asyncio.wait_for(ws.recv(), 10)) == ("m", 6, new, "6")

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_a_primary_short_of_replicas_refuses_writes_and_the_session_goes_on(
    start: Callable[..., Daemon], make_redis: Callable[..., RedisServer], key_file: Path
) -> None:
    """With min-replicas-to-write, a primary whose replica is gone answers NOREPLICAS: the
    message is refused (503 from the API for a channel with history, counted as failed),
    the primary is still the primary, and the session with it goes on."""
    primary = make_redis(0, None, "--min-replicas-to-write", "1", "--min-replicas-max-lag", "1")
    replica = make_redis(0, None, "--replicaof", "127.0.0.1", str(primary.port))
    deadline = time.monotonic() + 20
    while command(primary.port, "INFO", "replication")["connected_slaves"] != 1:
        assert time.monotonic() < deadline, "the replica never connected"
        time.sleep(0.05)
    one, two = redis_relays(start, primary.url, "--api-key-file", str(key_file))
    headers = {"X-API-Key": KEY, "Content-Type": "text/plain"}
    deadline = time.monotonic() + 20
    while post(one.port, "/publish/h", b"kept", headers)[0] != 202:  # the replica's first ACK
        assert time.monotonic() < deadline, "the primary never took a write"
        time.sleep(0.1)
    replica.kill()
    deadline = time.monotonic() + 20
    while (status := post(one.port, "/publish/h", b"refused", headers)[0]) == 202:
        assert time.monotonic() < deadline, "the primary never refused a write"
        time.sleep(0.1)
    assert status == 503
    assert post(one.port, "/publish/h", b"refused again", headers)[0] == 503
    assert http_get(one.port, "/healthz")[1] == "ok\n"
    warned = one.wait_for("broker refused a message")
    assert "NOREPLICAS" in warned["error"]
    make_redis(0, None, "--replicaof", "127.0.0.1", str(primary.port))  # a replica again
    deadline = time.monotonic() + 20
    while post(one.port, "/publish/h", b"kept again", headers)[0] != 202:
        assert time.monotonic() < deadline, "the primary never took a write again"
        time.sleep(0.1)
    for daemon in (one, two):
        events = {e["event"] for e in daemon.events}
        assert not events & {"broker failing over", "broker unreachable"}, daemon.log
        assert sum(e["event"] == "broker connected" for e in daemon.events) == 1


def test_sentinel_and_cluster_settings_are_checked() -> None:
    """One line naming the key, its value and its source, exit 2."""
    cases = [
        (["--redis-sentinels", "127.0.0.1:26379"], "invalid redis_sentinels '127.0.0.1:26379'",
         "needs redis_sentinel_service"),
        (["--redis-sentinels", "127.0.0.1", "--redis-sentinel-service", "s"],
         "invalid redis_sentinels", "expected host:port"),
        (["--redis-sentinel-service", "s"], "invalid redis_sentinel_service 's'",
         "set redis_sentinels too"),
        (["--redis-cluster", "--broker", "redis://h:1/3"], "invalid redis_cluster 'true'",
         "database 0 only"),
        (["--redis-cluster", "--broker", "memory"], "invalid redis_cluster 'true'",
         "needs a redis:// or rediss:// broker URL"),
        (["--redis-cluster", "--redis-sentinels", "h:1", "--redis-sentinel-service", "s"],
         "invalid redis_sentinels 'h:1'", "exclude each other"),
    ]  # fmt: skip
    for extra, named, why in cases:
        broker = [] if "--broker" in extra else ["--broker", "redis://h:1/0"]
        result = run_cli("--config", "", "--check-config", "--mode", "relay", *broker, *extra)
        assert result.returncode == 2, (extra, result.stdout)
        assert named in result.stderr and why in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_sentinel_password_is_never_printed(tmp_path: Path) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text(
        'mode = "relay"\nbroker = "redis://primary/0"\nredis_sentinels = ["127.0.0.1:26379"]\n'
        'redis_sentinel_service = "s"\nredis_sentinel_password = "sentinel-s3cret"\n'
    )
    result = run_cli("--check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "sentinel-s3cret" not in result.stdout + result.stderr
    assert "redis_sentinel_password = '***'" in result.stdout or "***" in result.stdout


# --- Cluster ----------------------------------------------------------------------------------


def one_channel_per_node(group: ClusterGroup) -> list[str]:
    """Channel names whose keys land on each of the three nodes."""
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"/c{i}"
        node = group.node_of(f"wsechod:{{{name}}}")
        found.setdefault(node.port, name)
        if len(found) == 3:
            return list(found.values())
    raise AssertionError("no names for every node")


@pytest.mark.timeout(120)
def test_a_cluster_spreads_channels_over_its_shards_with_history_and_presence(
    start: Callable[..., Daemon], cluster_group: ClusterGroup, key_file: Path
) -> None:
    """Three channels, one on each shard: members on instance two get what is published
    on instance one (WebSocket and API) with offsets; each channel's sharded subscription
    and stream are on its own shard; presence lists them all; a resume works."""
    group = cluster_group
    names = one_channel_per_node(group)
    one, two = redis_relays(start, group.url, "--redis-cluster", "--api-key-file", str(key_file))
    assert len({key_slot(f"wsechod:{{{n}}}".encode()) for n in names}) == 3

    async def main() -> None:
        members = [await joined(f"{two.url}{name}") for name in names]
        for name in names:
            await asyncio.to_thread(subscribed, two, name, 0)
        for name in names:
            await published(f"{one.url}{name}", f"ws {name}")
            headers = {"X-API-Key": KEY, "Content-Type": "text/plain"}
            status, answer, _ = await asyncio.to_thread(
                post, one.port, f"/publish{name}", f"api {name}".encode(), headers
            )
            assert status == 202 and answer["offset"] == 2, answer
        for name, (member, _, epoch) in zip(names, members, strict=True):
            got = [envelope(await asyncio.wait_for(member.recv(), 10)) for _ in range(2)]
            assert got == [("m", 1, epoch, f"ws {name}"), ("m", 2, epoch, f"api {name}")]
            channel = f"wsechod:{{{name}}}"
            port = group.node_of(channel).port
            assert command(port, "PUBSUB", "SHARDNUMSUB", channel)[1] == 1
            assert command(port, "XLEN", f"{channel}:h") == 2
        document = await asyncio.to_thread(
            until, one.port, "/channels", lambda d: counts(d) == dict.fromkeys(names, 1)
        )
        assert len(document["channels"]) == 3
        first, _, epoch = members[0]
        await first.close()
        resumed = f"{one.url}{names[0]}?since=1&epoch={epoch}"
        async with connect(resumed, subprotocols=V1) as ws:
            got = [envelope(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
            assert [(kind, offset) for kind, offset, _, _ in got] == [("m", 2), ("p", 2)]
        for member, _, _ in members[1:]:
            await member.close()

    asyncio.run(main())
    for daemon in (one, two):
        assert http_get(daemon.port, "/healthz")[1] == "ok\n"


@pytest.mark.timeout(120)
def test_a_failover_inside_the_cluster_is_followed(
    start: Callable[..., Daemon], cluster_group: ClusterGroup
) -> None:
    """A replica of one shard takes over (CLUSTER FAILOVER): the demoted primary keeps its
    connections open, so the instances notice by ROLE, read the layout again, and what is
    published afterwards on that shard's channel crosses, none of it lost."""
    group = cluster_group
    name = one_channel_per_node(group)[0]
    old = group.node_of(f"wsechod:{{{name}}}")
    replica = group.add_replica(old)
    one, two = redis_relays(start, group.url, "--redis-cluster")

    async def main() -> None:
        member, _, _ = await joined(f"{two.url}{name}")
        async with member:
            await asyncio.to_thread(subscribed, two, name, 0)
            await published(f"{one.url}{name}", "before")
            assert envelope(await asyncio.wait_for(member.recv(), 10))[3] == "before"
            command(replica.port, "CLUSTER", "FAILOVER")
            for daemon in (one, two):
                switched = await asyncio.to_thread(daemon.wait_for, "broker primary switched", 30)
                assert f"127.0.0.1:{replica.port}" in switched["primaries"]
            ended = max(i for i, e in enumerate(two.events) if e["event"] == "broker failing over")
            await asyncio.to_thread(subscribed, two, name, ended)
            await published(f"{one.url}{name}", *(str(n) for n in range(10)))
            got = [envelope(await asyncio.wait_for(member.recv(), 10))[3] for _ in range(10)]
            assert got == [str(n) for n in range(10)]
        # one has no member there, so nothing subscribed on that shard: its check saw it
        assert "now a replica" in one.wait_for("broker failing over")["error"]
        warned = two.wait_for("broker failing over")  # or Redis unsubscribed it first
        assert "now a replica" in warned["error"] or "moved" in warned["error"], warned

    asyncio.run(main())
