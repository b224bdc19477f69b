"""Real redis-server processes for the tests: started on free ports, killed at the end."""

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, port: int = 0, password: str | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is missing: `make redis` installs it", pytrace=False)
        auth = [] if self.password is None else ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), *auth],
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

    def _make(port: int = 0, password: str | None = None) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, port, password))
        return servers[-1]

    yield _make
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture
def redis_server(make_redis: Callable[..., RedisServer]) -> RedisServer:
    return make_redis()
