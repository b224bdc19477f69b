"""Where Redis is: the one server of the broker URL, the primary that Redis Sentinel names,
or the primaries of a Redis Cluster. Found again at the start of every session with Redis,
so a failover or a new cluster layout is followed by reconnecting.

Connections are redis-py's asyncio connections, used through public calls only
(``ConnectionPool.from_url``, ``get_connection``, ``send_command``, ``read_response``,
``disconnect``) and without its retries: our deadlines cover every wait.
"""

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel as SentinelManager
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from wsechod.log import get_logger
from wsechod.ratelimit import RateLimitedLog
from wsechod.settings.values import redact_url

log = get_logger("wsechod.broker")

SLOTS = 16_384  # a Cluster's hash slots
EVERY_SLOT = ((0, SLOTS - 1),)
TIMEOUT = 2.0  # seconds for a connect (TCP, AUTH, SELECT, a PING) or any one exchange
WATCH_TIMEOUT = 5.0  # seconds a sentinel may stay silent before it is pinged...
WATCH_RETRY = 1.0  # ...and between attempts when no sentinel answers


@dataclass(frozen=True)
class Node:
    """A Redis primary: the URL that reaches it (the broker URL's credentials and
    database), its address for logs and ``/healthz``, the Cluster slots it serves."""

    url: str
    address: str
    slots: tuple[tuple[int, int], ...] = EVERY_SLOT


# For redis-py's clients (presence): no retries, each exchange within TIMEOUT.
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": TIMEOUT,
    "socket_connect_timeout": TIMEOUT,
    "retry": Retry(NoBackoff(), 0),
    "protocol": 2,
}


class Clients(Protocol):
    """What ``client()`` returns besides the client, closed with it (or None)."""

    async def aclose(self) -> None: ...


class NotLocated(Exception):
    """No primary could be found (every sentinel or seed node failed): why."""


async def connect(url: str, **options: Any) -> AbstractConnection:
    """A connection that has answered a PING within TIMEOUT (raises RedisError,
    OSError or TimeoutError). Never left half open, even when cancelled."""
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        protocol=2,  # pub/sub replies as plain replies (RESP3 hands them to a hook)
        **options,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
            await conn.send_command("PING", check_health=False)
            await conn.read_response()
    except BaseException:
        with contextlib.suppress(Exception):
            await pool.disconnect()
        raise
    return conn


async def ask(conn: AbstractConnection, *command: Any) -> Any:
    """One command's answer, within TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        await conn.send_command(*command, check_health=False)
        return await conn.read_response()


async def ask_once(opened: Awaitable[AbstractConnection], *command: Any) -> Any:
    """One command on a connection of its own (being ``opened``), closed after."""
    conn: AbstractConnection | None = None
    try:
        conn = await opened
        return await ask(conn, *command)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a timeout says nothing of itself


def at_address(url: str, host: str, port: int) -> str:
    """``url`` (credentials, database, options kept) pointing at ``host:port``."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{where}" if userinfo else where
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Single:
    """One Redis server, the broker URL's."""

    sharded = False

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.address = parts.path if parts.scheme == "unix" else parts.netloc.rpartition("@")[2]

    def describe(self) -> str:
        return redact_url(self.url)

    async def locate(self) -> list[Node]:
        return [Node(self.url, self.address)]

    async def check(self, conn: AbstractConnection) -> None:
        """That the server answers (a PING): the URL names it."""
        await ask(conn, "PING")

    def client(self) -> tuple[Redis, Clients | None]:
        """A redis-py client of the server (presence)."""
        return Redis.from_url(self.url, **CLIENT_OPTIONS), None

    async def watch(self) -> str:
        """Never returns: one server does not move."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Sentinel:
    """The primary that Redis Sentinel names for ``service``. Each session asks the
    sentinels, in turn, for the primary's address and checks with ROLE that it is one
    (a sentinel may still name a primary that has been demoted); ``watch`` follows the
    sentinels' ``+switch-master`` announcements so a failover ends the session at once,
    instead of writing on to a demoted primary whose writes will be thrown away."""

    sharded = False

    def __init__(
        self, url: str, sentinels: Sequence[str], service: str, password: str = ""
    ) -> None:
        self.url = url
        self.sentinels = list(sentinels)
        self.service = service
        self._password = password or None
        self._warn = RateLimitedLog(log)

    def describe(self) -> str:
        return f"sentinel service {self.service} via {','.join(self.sentinels)}"

    async def _sentinel(self, address: str) -> AbstractConnection:
        host, _, port = address.rpartition(":")
        url = at_address("redis://", host.strip("[]"), int(port))
        return await connect(url, password=self._password)

    async def locate(self) -> list[Node]:
        errors: list[str] = []
        for i, address in enumerate(self.sentinels):
            try:
                opened = self._sentinel(address)
                found = await ask_once(opened, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(f"{address}: {_why(exc)}")
                continue
            if not found:
                errors.append(f"{address}: no primary for {self.service}")
                continue
            # the one that answered is asked first next time
            self.sentinels = [address, *self.sentinels[:i], *self.sentinels[i + 1 :]]
            host, port = found[0].decode(), int(found[1])
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return [Node(at_address(self.url, host, port), where)]
        raise NotLocated("no sentinel named a primary (" + "; ".join(errors) + ")")

    async def check(self, conn: AbstractConnection) -> None:
        """That the node is a primary now (ROLE): a sentinel may name one that has been
        demoted, and a demoted primary takes writes it will throw away."""
        role = await ask(conn, "ROLE")
        if not role or role[0] != b"master":
            raise NotLocated("the node the sentinels named is not a primary (now a replica)")

    def client(self) -> tuple[Redis, Clients | None]:
        """A redis-py client that follows the primary (presence), and its sentinels'."""
        wanted = ("username", "password", "db")
        options: dict[str, Any] = {k: v for k, v in parse_url(self.url).items() if k in wanted}
        if urllib.parse.urlsplit(self.url).scheme == "rediss":
            options["ssl"] = True
        sentinels = [
            (host.strip("[]"), int(port))
            for host, _, port in (address.rpartition(":") for address in self.sentinels)
        ]
        manager = SentinelManager(
            sentinels, sentinel_kwargs={**CLIENT_OPTIONS, "password": self._password}
        )
        return manager.master_for(self.service, **CLIENT_OPTIONS, **options), manager

    async def watch(self) -> str:
        """Return (why) when the sentinels announce a new primary for the service. A
        sentinel that fails or stays silent is left for the next one: the session with
        Redis does not depend on the sentinels being up."""
        while True:
            for address in list(self.sentinels):
                try:
                    return await self._listen(address)
                except (RedisError, OSError, TimeoutError) as exc:
                    self._warn.warning("sentinel not watched", sentinel=address, error=str(exc))
            await asyncio.sleep(WATCH_RETRY)

    async def _listen(self, address: str) -> str:
        """Subscribe to one sentinel's announcements until one is about our service. Its
        replies are read without a deadline (cancelling a read would leave redis-py to
        reconnect unsubscribed); a PING every WATCH_TIMEOUT, answered within TIMEOUT,
        says whether the sentinel is still there."""
        conn = await self._sentinel(address)
        pong = asyncio.Event()

        async def announced() -> str:
            while True:
                reply = await conn.read_response()
                if not isinstance(reply, list) or not reply:
                    continue
                if reply[0] == b"pong":
                    pong.set()
                elif reply[0] == b"message" and len(reply) == 3:
                    # "<service> <old-ip> <old-port> <new-ip> <new-port>"
                    words = reply[2].decode().split()
                    if len(words) == 5 and words[0] == self.service:
                        old, new = f"{words[1]}:{words[2]}", f"{words[3]}:{words[4]}"
                        return f"primary switched from {old} to {new}"

        async def pinged() -> str:
            while True:
                await asyncio.sleep(WATCH_TIMEOUT)
                pong.clear()
                await conn.send_command("PING", check_health=False)
                async with asyncio.timeout(TIMEOUT):
                    await pong.wait()

        tasks: list[asyncio.Task[str]] = []
        try:
            await conn.send_command("SUBSCRIBE", "+switch-master", check_health=False)
            tasks = [asyncio.create_task(announced()), asyncio.create_task(pinged())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()  # a reason, or the failure (TimeoutError...)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


class Cluster:
    """The primaries of a Redis Cluster, from ``CLUSTER SHARDS`` asked of the URL's node
    or of any node seen before. A channel lives on the shard of its hash slot; a layout
    change (a failover, slots moved) ends the session where it shows (a connection lost,
    a MOVED answer, a ``sunsubscribe`` from Redis), and the next one asks again."""

    sharded = True

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "rediss"
        self.seeds = [parts.netloc.rpartition("@")[2]]

    def describe(self) -> str:
        return f"cluster via {redact_url(self.url)}"

    async def locate(self) -> list[Node]:
        errors: list[str] = []
        for seed in list(self.seeds):
            host, _, port = seed.rpartition(":")
            try:
                opened = connect(at_address(self.url, host.strip("[]"), int(port)))
                shards = await ask_once(opened, "CLUSTER", "SHARDS")
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(f"{seed}: {_why(exc)}")
                continue
            nodes = self._primaries(shards)
            covered = sum(end - start + 1 for node in nodes for start, end in node.slots)
            if covered != SLOTS:
                errors.append(f"{seed}: {covered} of {SLOTS} slots served")
                continue
            known = [node.address for node in nodes]
            self.seeds = [*known, *(s for s in self.seeds if s not in known)]
            return nodes
        raise NotLocated("no cluster node gave a full layout (" + "; ".join(errors) + ")")

    def _primaries(self, shards: list[Any]) -> list[Node]:
        nodes: list[Node] = []
        for shard in shards:
            fields = _pairs(shard)
            slots = fields.get("slots") or []
            ranges = tuple((int(slots[i]), int(slots[i + 1])) for i in range(0, len(slots), 2))
            for entry in fields.get("nodes") or []:
                node = _pairs(entry)
                if node.get("role") != b"master" or node.get("health") != b"online" or not ranges:
                    continue
                host = (node.get("endpoint") or node.get("ip") or b"").decode()
                port = int(node.get("tls-port" if self.tls else "port") or 0)
                if host in ("", "?") or not port:
                    continue
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                nodes.append(Node(at_address(self.url, host, port), where, ranges))
        return nodes

    async def check(self, conn: AbstractConnection) -> None:
        """That the node is still a primary (ROLE): a failover in the cluster demotes it
        at once, and its connections stay open."""
        role = await ask(conn, "ROLE")
        if not role or role[0] != b"master":
            raise NotLocated("a primary of the layout is now a replica (a failover)")

    def client(self) -> tuple[RedisCluster, Clients | None]:
        """A redis-py Cluster client (presence)."""
        return RedisCluster.from_url(self.url, **CLIENT_OPTIONS), None

    async def watch(self) -> str:
        """Never returns: layout changes show on the shards' own connections."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


Topology = Single | Sentinel | Cluster
