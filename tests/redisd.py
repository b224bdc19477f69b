"""Real redis-server processes for the tests: started on free ports, killed at the end."""

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def command(port: int, *args: str | int) -> Any:
    """One command to the Redis (or sentinel) on ``port``, its answer."""
    return redis.Redis(port=port).execute_command(*args)  # type: ignore[no-untyped-call]


def bus_port() -> int:
    """A free port whose cluster bus port (10000 above) is a port, and free too."""
    while True:
        port = free_port()
        if port + 10_000 <= 65_535:
            with socket.socket() as probe, contextlib.suppress(OSError):
                probe.bind(("127.0.0.1", port + 10_000))
                return port


class RedisServer:
    def __init__(
        self, directory: Path, port: int = 0, password: str | None = None, *extra: str
    ) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.password = password
        self.extra = extra  # more redis-server options
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is missing: `make redis` installs it", pytrace=False)
        auth = [] if self.password is None else ["--requirepass", self.password]
        conf = [self.extra[0]] if self.extra and not self.extra[0].startswith("--") else []
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *conf, "--port", str(self.port), "--bind", "127.0.0.1", "--save",
             "", "--appendonly", "no", "--dir", str(self.directory), *auth,
             *self.extra[len(conf):]],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
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
        self.proc.kill()  # SIGKILL ends a stopped process too
        self.proc.wait(10)

    def pause(self) -> float:
        """SIGSTOP: Redis hangs, its connections stay open; returns when."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        return time.monotonic()

    def resume(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        return time.monotonic()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers (each on a free port unless told); all are killed at the end."""
    servers: list[RedisServer] = []

    def _make(port: int = 0, password: str | None = None, *extra: str) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, port, password, *extra))
        return servers[-1]

    yield _make
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture
def redis_server(make_redis: Callable[..., RedisServer]) -> RedisServer:
    return make_redis()


SERVICE = "wsechod-test"


class SentinelGroup:
    """A primary, a replica and three sentinels (quorum 2) that monitor them as SERVICE,
    with a short down-after so a failover takes a couple of seconds."""

    def __init__(self, make: Callable[..., RedisServer], directory: Path) -> None:
        self.primary = make()
        self.replica = make(0, None, "--replicaof", "127.0.0.1", str(self.primary.port))
        self.sentinels: list[RedisServer] = []
        for i in range(3):
            conf = directory / f"sentinel{i}.conf"  # a sentinel rewrites its file: one each
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self.sentinels.append(make(0, None, str(conf), "--sentinel"))
        deadline = time.monotonic() + 20
        while not self._settled():  # each sees the replica and the two other sentinels
            assert time.monotonic() < deadline, "the sentinels never found each other"
            time.sleep(0.1)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def ask(self, *args: str, sentinel: int = 0) -> Any:
        return command(self.sentinels[sentinel].port, *args)

    def primary_port(self) -> int:
        return int(self.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def _settled(self) -> bool:
        for i in range(3):
            replicas = self.ask("SENTINEL", "REPLICAS", SERVICE, sentinel=i)
            others = self.ask("SENTINEL", "SENTINELS", SERVICE, sentinel=i)
            if len(replicas) < 1 or len(others) < 2:
                return False
        return True

    def role(self, server: RedisServer) -> str:
        return str(command(server.port, "ROLE")[0], "ascii")


@pytest.fixture
def sentinel_group(make_redis: Callable[..., RedisServer], tmp_path: Path) -> SentinelGroup:
    return SentinelGroup(make_redis, tmp_path)


class ClusterGroup:
    """A Redis Cluster of three primaries (no replicas), every slot served."""

    def __init__(self, make: Callable[..., RedisServer]) -> None:
        self._make = make
        self.nodes = [
            make(
                bus_port(), None, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
            )
            for _ in range(3)
        ]
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not all(self._ok(n) for n in self.nodes):
            assert time.monotonic() < deadline, "the cluster never became ok"
            time.sleep(0.1)

    def add_replica(self, primary: RedisServer) -> RedisServer:
        """A new node, a replica of ``primary``, once in sync."""
        node = self._make(
            bus_port(), None, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
        )
        primary_id = command(primary.port, "CLUSTER", "MYID").decode()
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "add-node",
             f"127.0.0.1:{node.port}", f"127.0.0.1:{primary.port}", "--cluster-slave",
             "--cluster-master-id", primary_id],
            check=True, stdout=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while command(node.port, "INFO", "replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.1)
        self.nodes.append(node)
        return node

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        info = command(node.port, "CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def node_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot."""
        slot = key_slot(key.encode())
        for node in self.nodes:
            for entry in command(node.port, "CLUSTER", "SLOTS"):
                if entry[0] <= slot <= entry[1] and entry[2][1] == node.port:
                    return node
        raise AssertionError(f"no node serves slot {slot}")


@pytest.fixture
def cluster_group(make_redis: Callable[..., RedisServer]) -> ClusterGroup:
    return ClusterGroup(make_redis)
