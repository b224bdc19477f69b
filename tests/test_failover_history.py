"""Relay history across failovers and restarts, with instances in-process (the broker's
receiving side, ``Inbound``) on a real Redis running the real scripts; pub/sub is
stood in for (an APPEND's envelope goes to every instance whose session is up), and a
failover or a restart from an older copy is the channel's keys put back as the replica
or the snapshot had them (DUMP and RESTORE), on a server with another run id. The orders
of events a review found: Redis that refuses INFO, a second restart from the same
snapshot, instances publishing alternately, a trail without ids. (Real failovers:
tests/test_redis_ha.py; real daemons: tests/test_history.py.)"""

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from tests.redisd import RedisServer
from tests.test_workers import wait_until
from wsechod.brokers.format import (
    APPEND,
    CHAIN,
    DIVERGE,
    DIVERGE_SHA,
    LOOK,
    LOOK_SHA,
    MAGIC,
    META_TTL,
    READ,
    READ_SHA,
    TEXT,
    channel_key,
    history_keys,
    went_on,
)
from wsechod.brokers.inbound import Inbound
from wsechod.brokers.trail import Trail
from wsechod.history import History, Position, Recovery, Stored, continued, new_epoch
from wsechod.ratelimit import RateLimitedLog

CHANNEL = "/c"
KEYS = history_keys(CHANNEL)
SCRIPTS = {LOOK_SHA: LOOK, DIVERGE_SHA: DIVERGE, READ_SHA: READ}
Copy = dict[str, Any]


class Instance:
    """One relay instance's receiving side, on the server whose run id it holds."""

    def __init__(self, port: int, name: bytes, run_id: str, *, member: bool = True) -> None:
        self.redis = aredis.Redis(port=port)
        self.name, self.run_id, self.up = name, run_id, True
        self.got: list[tuple[int, str, str]] = []  # offset, epoch, payload
        self.warned: list[str] = []
        self.sent = 0

        class Log:  # what the instance logs, kept
            def warning(self, event: str, **_: Any) -> None:
                warned.append(event)

        warned = self.warned
        self.inbound = Inbound(
            name, Counter(), RateLimitedLog(Log()),
            subscribed=lambda _: member, read=self.read, recover=self.recover,
            run_id=lambda _: self.run_id,
        )  # fmt: skip
        self.inbound.deliver = self.deliver

    def deliver(self, name: str, body: bytes, text: bool, at: Position | None, _: int) -> bool:
        assert at is not None
        self.got.append((at.offset, at.epoch, body.decode()))
        return True

    async def read(self, channel: str, command: tuple[Any, ...]) -> Any:
        if not self.up:
            raise ConnectionError("no session")
        _, sha, keys, *args = command
        return await self.redis.eval(SCRIPTS[sha], keys, *args)

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        """As RedisBroker.recover."""
        after = "" if since is None else str(since.offset)
        command = ("EVALSHA", READ_SHA, 2, *KEYS, new_epoch(), META_TTL, after, limit)
        epoch, top, found, replaced = await self.read(channel, command)
        entries = []
        for entry_id, fields in found:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            offset = int(entry_id.split(b"-")[0])
            message_id = int.from_bytes(values[b"i"], "big")
            entries.append(Stored(offset, values[b"d"][1:], True, message_id))
        now = Position(int(top), epoch.decode())
        if since is not None and since.epoch != now.epoch and went_on(replaced, since):
            since = Position(since.offset, now.epoch)
        return continued(since, now, entries)

    async def publish(self, payload: str, everyone: list["Instance"]) -> Position:
        self.sent += 1
        message_id = (int.from_bytes(self.name[-4:], "big") << 32 | self.sent).to_bytes(8, "big")
        head = MAGIC + self.name + TEXT + bytes(8) + message_id
        offset, epoch = await self.redis.eval(
            APPEND, 2, *KEYS, channel_key(CHANNEL), TEXT + payload.encode(), 1000, 600,
            META_TTL, new_epoch(), head, "PUBLISH", message_id, self.run_id, CHAIN,
        )  # fmt: skip
        envelope = head + f"{offset} {epoch.decode()}\n{payload}".encode()
        for instance in everyone:
            if instance.up:
                instance.inbound.received(channel_key(CHANNEL).encode(), envelope)
        return Position(offset, epoch.decode())

    def down(self) -> None:
        self.up = False
        self.inbound.session_ended()

    async def back(self, run_id: str) -> None:
        """A new session, with the server whose run id is ``run_id``; repaired."""
        self.run_id, self.up = run_id, True
        self.inbound.session_started()
        self.inbound.session_up()
        while self.inbound._repairing:
            await asyncio.gather(*self.inbound._repairing)

    async def resumed(self, since: Position) -> list[str] | None:
        """What a client resuming from ``since`` gets here (None: ``l``)."""
        found = await self.recover(CHANNEL, since, 1000, History(1, 1.0))
        return None if found.entries is None else [e.payload.decode() for e in found.entries]


def copy(port: int) -> Copy:
    """The channel's keys, as a replica or a snapshot holds them."""
    admin = redis.Redis(port=port)
    return {key: admin.dump(key) for key in KEYS}


def restored(port: int, keys: Copy) -> None:
    """Redis now holds the channel as ``keys`` had it (a failover, a restart)."""
    admin = redis.Redis(port=port)
    for key, value in keys.items():
        admin.delete(key)
        if value is not None:
            admin.restore(key, 0, value)


def payloads(instance: Instance) -> list[str]:
    return [payload for _, _, payload in instance.got]


@pytest.fixture
def port(redis_server: RedisServer) -> int:
    return redis_server.port


def test_without_info_a_resume_from_the_lost_tail_is_told(port: int) -> None:
    """Found by a review: with INFO refused (no run id), 80 lost and a message published
    before the member's instance looks, LOOK took what differs to start after the
    stream's end, and a client that had the lost 21 resumed past the new 21 untold. The
    instance cannot tell where what differs begins: every resume from the old epoch is
    told. (Its member misses the new 21: what the run id prevents.)"""
    two = Instance(port, b"instTWO_", "")
    one = Instance(port, b"instONE_", "", member=False)

    async def main() -> None:
        kept: Copy = {}
        for n in range(1, 101):
            at = await one.publish(str(n), [one, two])
            if n == 20:
                kept = copy(port)
        two.down()
        restored(port, kept)  # 21 to 100 lost
        await one.publish("new", [one, two])
        await two.back("")
        await one.publish("after", [one, two])
        assert await two.resumed(Position(21, at.epoch)) is None
        assert await two.resumed(Position(5, at.epoch)) is None

    asyncio.run(main())
    assert payloads(two)[100:] == ["after"]


@pytest.mark.parametrize("publish_first", [True, False])
def test_a_second_restart_from_the_same_snapshot_delivers_nothing_twice(
    port: int, publish_first: bool
) -> None:
    """Found by a review: a restart that lost nothing starts a new epoch at the first
    publish (another run id); a second restart from the same snapshot brings back the
    epoch before it, which the member's instance took for an unrelated one: it delivered
    the channel from its start again (100 messages twice, out of order). Now the epochs an
    instance saw replaced count as its own, and its member gets only the new message."""
    two = Instance(port, b"instTWO_", "A")
    one = Instance(port, b"instONE_", "A", member=False)

    async def main() -> None:
        for n in range(1, 101):
            await one.publish(str(n), [one, two])
        snapshot = copy(port)
        for instance in (one, two):  # restart 1: nothing lost
            instance.down()
        await one.back("B")
        await two.back("B")
        for n in range(101, 111):
            await one.publish(str(n), [one, two])
        for instance in (one, two):  # restart 2, from the snapshot: 101 to 110 lost
            instance.down()
        restored(port, snapshot)
        await one.back("C")
        if publish_first:
            await one.publish("new", [one, two])
        await two.back("C")
        if not publish_first:
            await one.publish("new", [one, two])

    asyncio.run(main())
    assert payloads(two) == [str(n) for n in range(1, 111)] + ["new"]
    assert [offset for offset, _, _ in two.got] == [*range(1, 111), 101]  # a new epoch


def test_the_run_id_stays_when_the_replication_id_changes(
    make_redis: Callable[..., RedisServer],
) -> None:
    """Found by a review of the first version, which used the replication id: a primary
    whose replicas have been gone for repl-backlog-ttl takes a new one, and instances that
    had read it before and after then started a new epoch at every message. The run id
    is the server's for its life: instances that read it at either time keep one epoch."""
    primary = make_redis(0, None, "--repl-backlog-ttl", "1")
    replica = make_redis(0, None, "--replicaof", "127.0.0.1", str(primary.port))
    admin = redis.Redis(port=primary.port)
    wait_until(lambda: admin.info("replication")["connected_slaves"] == 1, 20, "a replica")
    before = admin.info("server")["run_id"], admin.info("replication")["master_replid"]
    replica.kill()
    wait_until(lambda: admin.info("replication")["master_replid"] != before[1], 30, "a new replid")
    now = admin.info("server")["run_id"]
    assert now == before[0]
    one = Instance(primary.port, b"instONE_", before[0], member=False)
    two = Instance(primary.port, b"instTWO_", now, member=False)
    three = Instance(primary.port, b"instTRE_", now)

    async def main() -> None:
        for n in range(1, 31):
            await (one if n % 2 else two).publish(str(n), [one, two, three])

    asyncio.run(main())
    assert len({epoch for _, epoch, _ in three.got}) == 1
    assert payloads(three) == [str(n) for n in range(1, 31)]


def test_a_trail_without_ids_follows_the_chain(port: int) -> None:
    """Found by a review: an instance at 100 in E without ids (history could not fill a
    gap) looks after a failover whose new server started E2 at 21: LOOK used the chain
    only when the last id differed, and the instance went on at 100, past E2's 21 to 100
    (new messages). Now what differs starts at 21 for it too."""
    admin = redis.Redis(port=port)
    for n in range(1, 111):
        message_id = (1000 + n if n < 21 else 9000 + n).to_bytes(8, "big")
        admin.xadd(KEYS[1], {"d": b"t" + str(n).encode(), "i": message_id}, id=f"{n}-0")
    admin.hset(KEYS[0], mapping={"e": "E2", "o": 110, "pe": "E 21", "r": "B"})
    trail = Trail(Position(0, "E"))
    trail.moved(Position(100, "E"))
    assert admin.eval(LOOK, 2, *KEYS, *trail.look(), "B") == [b"E2", 110, 21]
    two = Instance(port, b"instTWO_", "B")
    two.inbound._trails[CHANNEL] = trail
    asyncio.run(two.back("B"))
    assert [offset for offset, _, _ in two.got] == list(range(21, 111))
