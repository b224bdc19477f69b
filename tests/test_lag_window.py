"""The relay's lag window (wsechod/apps/relay.py, "slow" by the second rule): each time a
channel's held publishers are released, each receiver that was behind is charged how much
longer than twice the median of the others it took to drain, into a leaky bucket; over
``slow_consumer_timeout`` it is slow. Driven here on real connections over a transport
that records, with a clock the test turns."""

import asyncio
from collections.abc import Iterator

import pytest

from tests.test_engine_units import connect
from wsechod.apps.relay import LEAK, Channel, Member, Relay
from wsechod.brokers.memory import MemoryBroker
from wsechod.engine import Engine, Options

pytestmark = pytest.mark.unit  # in-process: make check runs it

TIMEOUT = 2.0


class Room:
    """A relay with one channel: a publisher held with its message, and receivers."""

    def __init__(self, receivers: int) -> None:
        self.now = 100.0
        self.relay = Relay(MemoryBroker(), slow_consumer_timeout=TIMEOUT)
        self.relay._now = lambda: self.now
        engine = Engine(Options(ping_interval=0), self.relay)
        self.publisher: Member = connect(engine)[0].app_data
        self.receivers: list[Member] = [connect(engine)[0].app_data for _ in range(receivers)]
        self.channel: Channel = self.publisher.channel
        self.publisher.pending = (b"held", False)

    def release(self, took: dict[int, float]) -> None:
        """Everyone drained; receiver ``i`` was behind for ``took[i]`` seconds."""
        self.channel.waiting.append(self.publisher)
        self.channel.episode = {self.receivers[i]: t for i, t in took.items()}
        self.relay._settle(self.channel)
        self.channel.waiting.clear()
        self.channel.episode.clear()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def room(loop: asyncio.AbstractEventLoop, receivers: int) -> Room:
    async def make() -> Room:
        return Room(receivers)

    return loop.run_until_complete(make())


def test_a_receiver_at_half_the_others_speed_is_charged_until_slow(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = room(loop, 4)
    slow = r.receivers[0]
    rounds = 0
    while not slow.slow and rounds < 100:
        # It takes 0.5 s to drain; the others 0.1 s: 0.3 s over twice their median.
        r.release({0: 0.5, 1: 0.1, 2: 0.1, 3: 0.1})
        rounds += 1
        r.now += 0.5
    # 0.3 s a round, less what leaks in the 0.5 s between rounds, until over TIMEOUT.
    assert rounds == next(k for k in range(1, 100) if 0.3 * k - 0.5 * LEAK * (k - 1) > TIMEOUT)
    assert not any(m.slow for m in r.receivers[1:])


def test_receivers_within_twice_the_median_are_never_charged(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = room(loop, 3)
    for _ in range(1000):  # one is always a little later: farther away, bigger gulps
        r.release({0: 0.19, 1: 0.1, 2: 0.1})
        r.now += 0.2
    assert [m.debt for m in r.receivers] == [0.0, 0.0, 0.0]


def test_the_only_reader_sets_the_streams_pace(loop: asyncio.AbstractEventLoop) -> None:
    """One publisher, one reader: however slow, the reader is the stream's pace."""
    r = room(loop, 1)
    for _ in range(100):
        r.release({0: 10.0})
        r.now += 10
    assert not r.receivers[0].slow and r.receivers[0].debt == 0.0


def test_debt_leaks_at_a_tenth_of_real_time(loop: asyncio.AbstractEventLoop) -> None:
    r = room(loop, 3)
    r.release({0: 1.2, 1: 0.1, 2: 0.1})  # 1.0 over twice the median
    member = r.receivers[0]
    assert member.debt == pytest.approx(1.0)
    r.now += 4.0
    assert r.relay._leaked(member) == pytest.approx(1.0 - 4.0 * LEAK)
    r.now += 100.0
    assert r.relay._leaked(member) == 0.0  # never below nothing
