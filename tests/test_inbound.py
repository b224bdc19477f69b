"""The receiving side of the Redis broker (``brokers/inbound.py``) in-process, with Redis's
answers scripted, for the orders of events a real failover makes possible but rarely:
an epoch replaced by another instance between this one's look and its read, a channel
Redis lost whole while another instance published first, this instance's own message
coming from history while its live copy is held, and a repair whose channel lost its
members. (Real Redis, real failovers: tests/test_history.py, tests/test_redis_ha.py.)"""

import asyncio
from collections import Counter
from typing import Any

import pytest
import structlog

from wsechod.brokers.format import CHAIN, DIVERGE_SHA, HEAD, LOOK_SHA, MAGIC, channel_key
from wsechod.brokers.inbound import OWN_KEPT, Inbound
from wsechod.brokers.trail import Trail
from wsechod.history import History, Position, Recovery, Stored, continued
from wsechod.ratelimit import RateLimitedLog

pytestmark = pytest.mark.unit
INSTANCE = b"ourselfs"
CHANNEL = "/c"


def envelope(n: int, epoch: str, payload: bytes, *, message_id: int, origin: int = 0) -> bytes:
    """A numbered message as Redis publishes it (from this instance when it has an origin)."""
    sender = INSTANCE if origin else b"another!"
    head = MAGIC + sender + b"t" + origin.to_bytes(8, "big") + message_id.to_bytes(8, "big")
    assert len(head) == HEAD
    return head + f"{n} {epoch}\n".encode() + payload


class Redis:
    """The scripted side: LOOK and DIVERGE answers in order, and streams by epoch."""

    def __init__(self) -> None:
        self.looks: list[list[Any]] = []
        self.diverged: list[tuple[Any, ...]] = []
        self.streams: dict[str, list[Stored]] = {}
        self.epoch = "E"
        self.after_divergence: list[Stored] = []  # the stream DIVERGE goes on with

    async def read(self, channel: str, command: tuple[Any, ...]) -> Any:
        if command[1] == LOOK_SHA:  # as scripted; not known to be the first, no chain passed
            look = self.looks.pop(0)
            return [*look, 0, b""] if len(look) == 3 else look
        assert command[1] == DIVERGE_SHA
        self.diverged.append(command[5:])
        assert command[-2:] == (CHAIN, "R")  # and the server's run id
        self.epoch = command[7]
        self.streams[self.epoch] = self.after_divergence
        return 1

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        stream = self.streams.get(self.epoch, [])
        top = Position(stream[-1].offset if stream else 0, self.epoch)
        after = [e for e in stream if since is None or e.offset > since.offset][:limit]
        return continued(since, top, after)


def receiver(redis: Redis, *, subscribed: bool = True) -> tuple[Inbound, list[tuple[Any, ...]]]:
    got: list[tuple[Any, ...]] = []
    inbound = Inbound(
        INSTANCE,
        Counter(),
        RateLimitedLog(structlog.get_logger()),
        subscribed=lambda _: subscribed,
        read=redis.read,
        recover=redis.recover,
        run_id=lambda _: "R",
    )

    def deliver(name: str, body: bytes, text: bool, at: Position | None, origin: int) -> bool:
        got.append((body.decode(), at, origin))
        return True

    inbound.deliver = deliver
    return inbound, got


def live(inbound: Inbound, n: int, epoch: str, payload: str, ids: tuple[int, int]) -> None:
    """Message ``n`` from Redis; ``ids``: its id and its origin (0: another instance's)."""
    message = envelope(n, epoch, payload.encode(), message_id=ids[0], origin=ids[1])
    inbound.received(channel_key(CHANNEL).encode(), message)


async def repaired(inbound: Inbound) -> None:
    inbound.session_started()
    inbound.session_up()
    while inbound._repairing:
        await asyncio.gather(*inbound._repairing)


def test_an_epoch_replaced_between_the_look_and_the_read_is_followed() -> None:
    """Found by a review: the look passes in E, another instance replaces E by F before the
    read, and the instance went on at F's top, dropping what F held after its position.
    (Redis's READ goes on from E into F itself when the position is before what differed:
    tests/test_history.py; here it does not, and the repair looks again.)"""
    redis = Redis()
    inbound, got = receiver(redis)
    for n in range(1, 5):
        live(inbound, n, "E", str(n), (100 + n, 0))
    redis.looks = [[b"E", 4, 0], [b"F", 6, 0]]  # as it was; then replaced, the same up to 4
    redis.epoch = "F"  # a resume from (4, E) would be told: 4 >= what differed (say 4)
    redis.streams["F"] = [Stored(n, str(n).encode(), True, 100 + n) for n in range(1, 5)]
    redis.streams["F"] += [Stored(5, b"x", True, 900), Stored(6, b"y", True, 901)]

    async def main() -> None:
        await repaired(inbound)
        live(inbound, 5, "E", "late, in E", (555, 0))  # published in E before F: comes as F's 5
        live(inbound, 7, "F", "z", (902, 0))

    asyncio.run(main())
    assert got[4:] == [
        ("x", Position(5, "F"), 0),
        ("y", Position(6, "F"), 0),
        ("z", Position(7, "F"), 0),
    ]


def test_a_channel_redis_lost_whole_is_delivered_from_its_start_once() -> None:
    """Found by a review: the hash was gone and another instance published first; the
    instance went on at the new epoch's top and never delivered G's 1 and 2."""
    redis = Redis()
    inbound, got = receiver(redis)
    for n in range(1, 4):
        live(inbound, n, "E", str(n), (100 + n, 0))
    redis.looks = [[b"G", 2]]  # an epoch unrelated to E
    redis.epoch = "G"
    redis.streams["G"] = [Stored(1, b"a", True, 200), Stored(2, b"b", True, 201)]
    asyncio.run(repaired(inbound))
    assert got[3:] == [("a", Position(1, "G"), 0), ("b", Position(2, "G"), 0)]
    # Unrelated as far as the hash remembers (replaced more than CHAIN times since), but
    # holding messages delivered here: those are known by their ids, not given again.
    redis.looks = [[b"H", 4]]
    redis.epoch = "H"
    redis.streams["H"] = [Stored(n, b"again", True, id) for n, id in ((1, 200), (2, 201))]
    redis.streams["H"] += [Stored(3, b"c", True, 202), Stored(4, b"d", True, 203)]
    asyncio.run(repaired(inbound))
    assert got[5:] == [("c", Position(3, "H"), 0), ("d", Position(4, "H"), 0)]


def test_what_differs_comes_again_in_the_new_epoch_and_own_messages_keep_their_member() -> None:
    """The look says Redis holds another message at 3: DIVERGE replaces E by a new epoch,
    and the instance delivers from 3 in it. Its own message, held while it repaired (the
    member that sent it, 7, must not get it back, the HTTP API waits for it), comes from
    history with its member; its live copy in the replaced epoch is dropped."""
    redis = Redis()
    inbound, got = receiver(redis)
    for n in range(1, 4):
        live(inbound, n, "E", str(n), (100 + n, 0))
    redis.looks = [[b"E", 4, 3]]
    redis.after_divergence = [Stored(n, str(n).encode(), True, 100 + n) for n in (1, 2)]
    redis.after_divergence += [Stored(3, b"other", True, 299), Stored(4, b"mine", True, 300)]

    async def main() -> None:
        inbound.session_started()
        inbound.published(300, 7)  # member 7 of this instance publishes
        live(inbound, 4, "E", "mine", (300, 7))  # held: the repair has not run yet
        inbound.session_up()
        while inbound._repairing:
            await asyncio.gather(*inbound._repairing)

    asyncio.run(main())
    (diverged,) = redis.diverged
    assert diverged[:2] == ("E", 3)
    new = redis.epoch
    assert got[3:] == [("other", Position(3, new), 0), ("mine", Position(4, new), 7)]


def test_a_repair_whose_channel_lost_its_members_holds_nothing_after() -> None:
    """Found by a review: the repair stopped for a channel nobody here is on any more,
    but its hold stayed, and every later message was held until the session ended."""
    redis = Redis()
    members = [True]
    inbound, got = receiver(redis)
    inbound._subscribed = lambda _: members[0]
    live(inbound, 1, "E", "1", (101, 0))
    members[0] = False
    asyncio.run(repaired(inbound))
    members[0] = True
    live(inbound, 2, "E", "2", (102, 0))
    assert [body for body, _, _ in got] == ["1", "2"]


def test_an_own_message_from_history_before_its_live_copy_keeps_its_member() -> None:
    """Found by a review: the repair's read can answer before the subscriber has passed on
    the live copy of this instance's own message (two connections, no order between
    them): from history it came without its member (the sender got it back, the HTTP API
    answered 503 for a message it had published)."""
    redis = Redis()
    inbound, got = receiver(redis)
    live(inbound, 1, "E", "1", (101, 0))
    inbound.published(300, 7)  # member 7 of this instance publishes; Redis numbers it 2
    redis.looks = [[b"E", 2, 0]]
    redis.streams["E"] = [Stored(1, b"1", True, 101), Stored(2, b"mine", True, 300)]
    asyncio.run(repaired(inbound))
    live(inbound, 2, "E", "mine", (300, 7))  # its live copy, after: had it
    assert got == [("1", Position(1, "E"), 0), ("mine", Position(2, "E"), 7)]


def test_what_is_held_for_a_channel_whose_members_came_back_is_delivered() -> None:
    """Found by a review: the last member left during a repair and a new one came; what
    was held for the channel meanwhile was dropped, and the new member missed it."""
    redis = Redis()
    inbound, got = receiver(redis)
    live(inbound, 1, "E", "1", (101, 0))

    async def main() -> None:
        inbound.session_started()
        inbound.left(CHANNEL)  # the last member leaves; a new one joins (subscribed)
        live(inbound, 2, "E", "2", (102, 0))  # held: the channel is being repaired
        inbound.session_up()
        while inbound._repairing:
            await asyncio.gather(*inbound._repairing)

    asyncio.run(main())
    assert [body for body, _, _ in got] == ["1", "2"]


def test_a_difference_at_the_first_remembered_message_tells_every_resume() -> None:
    """Found by a review: where the first message the trail remembers already differs,
    earlier ones may have too, unknown here; recorded as where resumes go on, a client
    that had them went on without being told. Recorded as 0: every resume from the old
    epoch is told."""
    redis = Redis()
    inbound, _ = receiver(redis)
    for n in range(10, 21):  # joined at 10
        live(inbound, n, "E", str(n), (100 + n, 0))
    redis.looks = [[b"E", 20, 10]]
    asyncio.run(repaired(inbound))
    (diverged,) = redis.diverged
    assert diverged[:2] == ("E", 0)


def test_a_trail_moved_back_remembers_no_id_of_a_later_offset() -> None:
    """Found by a review: moved back from 100 to 95 by a new epoch, the trail's window
    reached 32 to 36, whose slots held the ids of 96 to 100 (64 apart)."""
    trail = Trail(Position(0, "E"))
    for n in range(1, 101):
        trail.delivered(Position(n, "E"), 1000 + n)
    trail.replaced("F", 96, was="E")
    assert trail.at == Position(95, "F") and trail.retired == ("E",)
    assert trail.window() == range(37, 96)
    assert trail.known() == {1000 + n for n in range(37, 96)}


def test_a_redis_behind_what_was_delivered_counts_nothing_lost_below_zero() -> None:
    """Found by a loaded run: Redis's counter behind the position the check left the
    instance at took "lost" down by the difference (a counter that must only grow)."""
    redis = Redis()
    counts: Counter[str] = Counter()
    inbound, _ = receiver(redis)
    inbound.counts = counts
    for n in range(1, 11):
        live(inbound, n, "E", str(n), (100 + n, 0))
    redis.looks = [[b"E", 10, 0]]  # as LOOK saw it; the read finds the counter at 5
    redis.streams["E"] = [Stored(n, str(n).encode(), True, 100 + n) for n in range(1, 6)]
    asyncio.run(repaired(inbound))
    assert counts["lost"] == 0


def test_own_messages_whose_copies_never_come_back_are_remembered_up_to_a_bound() -> None:
    """This instance's messages with history are remembered until they come back from
    Redis; a session that fails after sending them loses them on the way: the oldest are
    forgotten past OWN_KEPT, and what comes back after is still known by its member."""
    inbound, got = receiver(Redis())
    for n in range(OWN_KEPT + 1000):
        inbound.published(n, 7)
    assert len(inbound._own) == OWN_KEPT
    assert 999 not in inbound._own and OWN_KEPT + 999 in inbound._own
    live(inbound, 1, "E", "mine", (OWN_KEPT + 999, 7))
    assert got == [("mine", Position(1, "E"), 7)]
