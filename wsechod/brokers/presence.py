"""Presence: who is on which channel, across every instance sharing a Redis.

Each instance (a worker process, with the broker's random id) writes what it has, not each
connection: the write volume is channels with members x instances per interval, whatever
the churn. Every ``interval`` (and within ``SETTLE`` of a join or leave) it writes, for each
channel with members here, its entry (member count and the ``sub`` of each member with a
token) with an expiry of ``TTL_INTERVALS`` x interval, and its entry in a directory of
instances (channel -> count). Expiry times come from Redis's clock (``TIME`` in the
scripts), so instances whose clocks differ agree. Readers drop the expired entries: an
instance that died (``kill -9``, a lost machine) disappears within ``TTL_INTERVALS`` x
interval; one that stops cleanly deletes its entries at once.

Keys (hash tags keep what one script touches in one Cluster slot)::

    wsechod:{<channel>}:pz   ZSET  instance -> expiry (ms)       per channel
    wsechod:{<channel>}:ph   HASH  instance -> {"n": N, "subs": {sub: connections}}
    wsechod:{presence}:iz    ZSET  instance -> expiry (ms)       the directory
    wsechod:{presence}:<id>  HASH  channel -> N                  one per instance

Counts are eventually consistent: within ``SETTLE`` (plus a write) of a join or leave on a
live instance, within the expiry of a dead one.
"""

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from wsechod.brokers.topology import Topology
from wsechod.log import get_logger
from wsechod.ratelimit import RateLimitedLog

log = get_logger("wsechod.broker")

TTL_INTERVALS = 3  # an entry outlives this many missed writes
SETTLE = 0.25  # seconds after a join or leave before the entries are written
TIMEOUT = 2.0  # seconds for any one exchange with Redis
CHUNK = 500  # directory fields per HSET

# Members of a channel here: their number, and how many connections each sub has
# ("" not included: members without a token are counted in the number only).
Members = tuple[int, Mapping[str, int]]
Snapshot = Callable[[], Mapping[str, Members]]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
WRITE = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return now
"""
)
ENROL = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return now
"""
)
READ_CHANNEL = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', KEYS[2], id) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #live == 0 then return {} end
local values = redis.call('HMGET', KEYS[2], unpack(live))
local out = {}
for i, id in ipairs(live) do out[#out + 1] = id; out[#out + 1] = values[i] or '' end
return out
"""
)
READ_DIRECTORY = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do redis.call('DEL', ARGV[1] .. id) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, id in ipairs(live) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""
)


def channel_keys(channel: str) -> tuple[str, str]:
    return f"wsechod:{{{channel}}}:pz", f"wsechod:{{{channel}}}:ph"


DIRECTORY = "wsechod:{presence}:iz"
DIRECTORY_PREFIX = "wsechod:{presence}:"


class Unavailable(Exception):
    """Redis did not answer in time, or refused: presence cannot be read now."""


class RedisPresence:
    """One instance's presence in Redis: its writer task, and the readers the API calls."""

    def __init__(self, topology: Topology, instance: str, interval: float) -> None:
        self.instance = instance
        self.interval = interval
        self._redis: Any
        self._redis, self._also = topology.client()
        self._write = self._redis.register_script(WRITE)
        self._enrol = self._redis.register_script(ENROL)
        self._read_channel = self._redis.register_script(READ_CHANNEL)
        self._read_directory = self._redis.register_script(READ_DIRECTORY)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written: dict[str, int] = {}  # what the directory holds for us
        self._snapshot: Snapshot | None = None
        self._warn = RateLimitedLog(log)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.interval * TTL_INTERVALS * 1000))

    def start(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._task = asyncio.create_task(self._run(), name="presence writer")

    def changed(self) -> None:
        """A member joined or left here: write within SETTLE."""
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.interval)
                await asyncio.sleep(SETTLE)  # a burst of joins is one write
            self._dirty.clear()
            try:
                await asyncio.wait_for(self._publish(), TIMEOUT * 2)
            except (RedisError, OSError, TimeoutError) as exc:
                self._warn.warning("presence not written", reason=type(exc).__name__)

    async def _publish(self) -> None:
        try:
            await self._write_all()
        except NoScriptError:  # a Cluster's pipeline does not load scripts: load them
            for script in (self._write, self._enrol):
                await self._redis.script_load(script.script)
            await self._write_all()

    async def _write_all(self) -> None:
        assert self._snapshot is not None
        now = dict(self._snapshot())
        ttl = self.ttl_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, (count, subs) in now.items():
                entry = json.dumps({"n": count, "subs": dict(subs)}, separators=(",", ":"))
                await self._write(
                    keys=channel_keys(channel), args=[self.instance, ttl, entry], client=pipe
                )
            for channel in self._written.keys() - now.keys():
                pz, ph = channel_keys(channel)
                pipe.zrem(pz, self.instance)
                pipe.hdel(ph, self.instance)
            mine = DIRECTORY_PREFIX + self.instance
            gone = list(self._written.keys() - now.keys())
            if gone:
                pipe.hdel(mine, *gone)
            counts = [(c, n) for c, (n, _) in now.items()]
            for start in range(0, len(counts), CHUNK):  # all of them: Redis may have lost it
                pipe.hset(mine, mapping=dict(counts[start : start + CHUNK]))
            await self._enrol(keys=[DIRECTORY, mine], args=[self.instance, ttl], client=pipe)
            await pipe.execute()
        self._written = {c: n for c, (n, _) in now.items()}

    async def close(self) -> None:
        """Stop writing, and take this instance's entries away at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel in self._written:
                        pz, ph = channel_keys(channel)
                        pipe.zrem(pz, self.instance)
                        pipe.hdel(ph, self.instance)
                    pipe.zrem(DIRECTORY, self.instance)
                    pipe.delete(DIRECTORY_PREFIX + self.instance)
                    await pipe.execute()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        if self._also is not None:
            with contextlib.suppress(Exception):
                await self._also.aclose()

    # --- reading -------------------------------------------------------------------------

    async def channels(self) -> dict[str, int]:
        """Every channel with members on a live instance, and how many."""
        raw = await self._call(self._read_directory, [DIRECTORY], [DIRECTORY_PREFIX])
        totals: dict[str, int] = {}
        for i in range(0, len(raw), 2):
            fields = raw[i + 1]
            for j in range(0, len(fields), 2):
                name = _text(fields[j])
                totals[name] = totals.get(name, 0) + int(fields[j + 1])
        return totals

    async def members(self, channel: str) -> Members:
        """The members of one channel on every live instance: their number, and the
        connections of each sub."""
        raw = await self._call(self._read_channel, list(channel_keys(channel)), [])
        count, subs = 0, dict[str, int]()
        for i in range(0, len(raw), 2):
            if not raw[i + 1]:
                continue
            entry = json.loads(raw[i + 1])
            count += int(entry["n"])
            for sub, n in entry["subs"].items():
                subs[sub] = subs.get(sub, 0) + int(n)
        return count, subs

    async def _call(self, script: Any, keys: list[str], args: list[str]) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(type(exc).__name__) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
