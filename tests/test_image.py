"""The container image (Containerfile, made by ``make image``), run by podman on the host's
network, as operators run it: echo through it with two clients, a stop with busy clients
(1001 each, exit 0 within the grace), SIGINT, workers inside (one killed from outside is
replaced, none left a zombie), the health check (healthy, then unhealthy while draining),
a relay pair through a Redis on the host, one configured by a mounted file, a read-only
root file system, and a process that is not root. ``make test`` builds the image first
(``WSECHOD_TEST_IMAGE`` names it); run alone, this module says to."""

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests import rawws
from tests.conftest import WSECHOD, Daemon
from tests.redisd import RedisServer, free_port
from tests.test_echo import http_get
from tests.test_relay import subscribed
from tests.test_workers import wait_until

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("WSECHOD_TEST_IMAGE", "localhost/wsechod:latest")
REDIS_IMAGE = os.environ.get("WSECHOD_TEST_REDIS_IMAGE", "localhost/wsechod-redis:bookworm")
PODMAN = shlex.split(
    os.environ.get("PODMAN", f"env CONTAINERS_CONF={ROOT}/container/containers.conf podman")
)
UID = 10001  # the image's user

pytestmark = pytest.mark.timeout(90)


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module", autouse=True)
def image() -> None:
    if podman("image", "exists", IMAGE).returncode != 0:
        pytest.fail(f"no image {IMAGE}: make image (or make test-image) builds it")


class Container(Daemon):
    """``podman run`` attached (its exit status is the container's), on the host's network
    at 127.0.0.1 and a free port (another one if that was taken meanwhile); the log is
    read from the container's stdout, podman's own messages kept in a file."""

    def __init__(self, *args: str, options: tuple[str, ...] = ()) -> None:
        self.args, self.options = args, options
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by kill()
        self._start()

    def _start(self) -> None:
        self.name = f"wsechod-test-{uuid.uuid4().hex[:12]}"
        self.port = free_port()
        argv = [*PODMAN, "run", "--rm", "--name", self.name, "--network", "host"]
        argv += ["--env", "WSECHOD_HOST=127.0.0.1", "--env", f"WSECHOD_PORT={self.port}"]
        argv += [*self.options, IMAGE, *self.args]
        self._spawn(argv, dict(os.environ), (), log="stdout", other=self.errors)

    def ready(self) -> "Container":
        for _ in range(3):
            try:
                self.wait_for("listening", 30)
                break
            except AssertionError:
                if self.proc.poll() is None or "in use" not in self.log.lower():
                    raise
                self._start()  # the port was taken between its choice and the bind
        self.url = f"ws://127.0.0.1:{self.port}"
        return self

    @property
    def log(self) -> str:
        self.errors.seek(0)
        return super().log + self.errors.read()

    def pid(self) -> int:
        """The container's main process, as the host sees it."""
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            podman("rm", "--force", "--time", "0", self.name)
        super().kill()
        self.errors.close()


@pytest.fixture
def run() -> Iterator[type[Container]]:
    started: list[Container] = []

    class Started(Container):
        def __init__(self, *args: str, options: tuple[str, ...] = ()) -> None:
            super().__init__(*args, options=options)
            started.append(self)

    yield Started
    for container in started:
        container.kill()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def state(pid: int) -> str:
    """A process's state letter (Z: a zombie), from /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def uid_of(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x[:4] == "Uid:")
    return int(line.split()[1])


def health(container: Container) -> tuple[int, str]:
    """``podman healthcheck run`` (the image's HEALTHCHECK, once): its exit status, and the
    container's health after it."""
    done = podman("healthcheck", "run", container.name)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", container.name)
    return done.returncode, status.stdout.strip()


def test_echo_through_the_image_with_two_clients_as_a_user_not_root(
    run: type[Container],
) -> None:
    container = run().ready()
    assert uid_of(container.pid()) == UID
    started = container.wait_for("starting")
    assert started["pid"] == 1  # wsechod is the container's init

    async def main() -> None:
        async with connect(container.url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\xff")
            assert await ws.recv() == b"\x00\xff"

    asyncio.run(main())
    sock = rawws.connect(container.port)
    sock.sendall(rawws.frame(rawws.OP_TEXT, b"raw"))
    assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"raw")
    sock.close()
    # Every line the container printed on stdout is a JSON event.
    assert container.raw and all(json.loads(line) for line in container.raw)


async def busy(url: str, stopped: asyncio.Event) -> int | None:
    """Echo round trips until the server closes; its close code."""
    async with connect(url) as ws:
        n = 0
        try:
            while True:
                n += 1
                await ws.send(str(n))
                assert await ws.recv() == str(n)
                if n == 20:
                    stopped.set()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


@pytest.mark.parametrize("how", ["stop", "sigint"])
def test_podman_stop_and_sigint_drain_busy_clients(run: type[Container], how: str) -> None:
    """``podman stop`` (SIGTERM, the image's STOPSIGNAL) or SIGINT with clients mid-echo:
    each gets 1001 and answers it (nobody cut at the drain's deadline), the container exits
    0 (not 137: podman's SIGKILL after the grace of 30 s)."""
    container = run("--drain-timeout", "20").ready()
    signal_it = ("stop", "--time", "30") if how == "stop" else ("kill", "--signal", "INT")

    async def main() -> list[int | None]:
        going = [asyncio.Event() for _ in range(4)]
        clients = [asyncio.create_task(busy(container.url, e)) for e in going]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in going)), 20)
        signalled = asyncio.create_task(asyncio.to_thread(podman, *signal_it, container.name))
        codes = await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert (await signalled).returncode == 0
        return codes

    assert asyncio.run(main()) == [1001] * 4
    assert container.wait(30) == 0
    drained = container.wait_for("drained")
    assert (drained["connections"], drained["force_closed"]) == (4, 0)


def test_a_lone_wsechod_as_init_reaps_the_orphans_of_the_container(
    run: type[Container],
) -> None:
    """Found by a review: without workers, PID 1 never waited for the orphans a container
    gets (a process started by podman exec whose parent left): they stayed zombies."""
    container = run().ready()
    main = container.pid()
    podman("exec", container.name, "sh", "-c", "sleep 1 & exec true")
    wait_until(lambda: len(children(main)) == 1, 10, "the orphan is init's child")
    wait_until(lambda: children(main) == [], 10, "reaped, not left a zombie")


def test_the_image_serves_the_files_of_the_package() -> None:
    """Found by a review: the package's data files link to etc/ and systemd/, which the
    build did not copy, and the image's wsechod had none of them."""
    unit = podman("run", "--rm", IMAGE, "--print-unit", "wsechod.service")
    assert unit.returncode == 0, unit.stderr
    assert "ExecStart=/opt/wsechod/bin/wsechod" in unit.stdout
    rotate = podman("run", "--rm", IMAGE, "--print-logrotate-sample")
    assert rotate.returncode == 0 and "postrotate" in rotate.stdout, rotate.stderr


def test_workers_in_the_image_a_killed_one_is_replaced_and_none_left_a_zombie(
    run: type[Container],
) -> None:
    container = run("--workers", "2").ready()
    main = container.pid()
    wait_until(lambda: len(children(main)) == 2, 20, "two workers")
    victim = children(main)[0]
    os.kill(victim, signal.SIGKILL)  # from outside the container's view of processes
    container.wait_for("worker exited", 20)
    # Reaped (a zombie stays listed among its parent's children) and replaced.
    wait_until(lambda: victim not in children(main) and len(children(main)) == 2, 20, "replaced")
    assert all(state(c) != "Z" for c in children(main))

    async def main_echo() -> None:
        async with connect(container.url) as ws:
            await ws.send("after")
            assert await ws.recv() == "after"

    asyncio.run(main_echo())
    assert podman("stop", "--time", "30", container.name).returncode == 0
    assert container.wait(20) == 0
    assert not Path(f"/proc/{main}").exists()  # gone, and its workers with it
    assert not Path(f"/proc/{victim}").exists()


def test_the_health_check_is_healthy_then_unhealthy_while_draining(
    run: type[Container],
) -> None:
    """The image's HEALTHCHECK (the image's Python asks /healthz): healthy while serving;
    while a client that never answers the close holds the drain, /healthz answers 503 and
    the check fails until the container is unhealthy."""
    container = run("--drain-timeout", "30", "--close-timeout", "30").ready()
    assert health(container) == (0, "healthy")
    sock = rawws.connect(container.port)  # will not answer the close frame
    assert podman("kill", "--signal", "TERM", container.name).returncode == 0
    container.wait_for("stop requested")
    assert http_get(container.port, "/healthz")[0] == 503
    assert health(container)[0] == 1
    # Unhealthy after 3 failures in a row, once the image's start period (5 s) is over.
    wait_until(lambda: health(container) == (1, "unhealthy"), 20, "unhealthy")
    assert rawws.read_frame(sock)[0] == rawws.OP_CLOSE
    sock.close()
    assert container.wait(30) == 0


def test_a_relay_pair_through_redis_one_configured_by_a_mounted_file_read_only(
    run: type[Container], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two relay containers with --read-only root file systems share a channel through a
    Redis on the host: one configured by /etc/wsechod/wsechod.toml mounted in, the other
    by WSECHOD_* variables."""
    config = tmp_path / "wsechod.toml"
    config.write_text(f'mode = "relay"\nbroker = "{redis_server.url}"\n')
    config.chmod(0o644)
    one = run(options=("--read-only", "--volume", f"{config}:/etc/wsechod/wsechod.toml:ro,Z"))
    two = run(
        "--log-level",
        "debug",  # says when it has subscribed
        options=(
            "--read-only",
            "--env",
            "WSECHOD_MODE=relay",
            "--env",
            f"WSECHOD_BROKER={redis_server.url}",
        ),
    )
    for container in (one.ready(), two.ready()):
        assert container.wait_for("listening")["mode"] == "relay"

    async def main() -> None:
        async with connect(f"{two.url}/room") as member, connect(f"{one.url}/room") as pub:
            await asyncio.to_thread(subscribed, two, "/room", 0)
            await pub.send("across")
            assert await asyncio.wait_for(member.recv(), 10) == "across"

    asyncio.run(main())
    for container in (one, two):
        assert podman("stop", "--time", "30", container.name).returncode == 0
        assert container.wait(20) == 0


def test_the_image_says_what_it_is() -> None:
    """OCI labels, the user, the stop signal, the port and the health check, as built."""
    found = podman("image", "inspect", IMAGE)
    assert found.returncode == 0, found.stderr
    inspected = json.loads(found.stdout)[0]
    config = inspected["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "wsechod"
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.version"] not in ("", "0")
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert "8765/tcp" in config["ExposedPorts"]
    assert inspected["Healthcheck"]["Test"][:2] == ["CMD", "python3"]
    assert inspected["Healthcheck"]["Retries"] == 3


@pytest.mark.timeout(180)
def test_the_compose_file_runs_a_relay_of_two_instances_sharing_redis() -> None:
    """compose.yaml under podman-compose, on two free ports, with a Redis image made here
    from Debian's redis-server (no registry serves the official one): a member on one
    instance gets what is published on the other, in order; a stop drains both (exit 0).
    """
    if podman("image", "exists", REDIS_IMAGE).returncode != 0:
        pytest.fail(f"no image {REDIS_IMAGE}: make redis-image (or make test-image) builds it")
    ports = free_port(), free_port()
    project = f"wsechod-test-{uuid.uuid4().hex[:12]}"
    conf = [word.partition("=")[2] for word in PODMAN if word.startswith("CONTAINERS_CONF=")]
    env = dict(os.environ, WSECHOD_IMAGE=IMAGE, REDIS_IMAGE=REDIS_IMAGE)
    env |= {"WSECHOD_PORT_1": str(ports[0]), "WSECHOD_PORT_2": str(ports[1])}
    env |= {"CONTAINERS_CONF": conf[0]} if conf else {}
    compose = [str(Path(WSECHOD).with_name("podman-compose")), "-p", project]
    compose += ["-f", str(ROOT / "compose.yaml")]

    def run_compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def exit_codes() -> dict[str, str]:
        listed = podman(
            "ps", "--all", "--filter", f"label=io.podman.compose.project={project}",
            "--format", "{{.Names}} {{.ExitCode}} {{.State}}",
        )  # fmt: skip
        return {line.split()[0]: line.split(maxsplit=1)[1] for line in listed.stdout.splitlines()}

    up = run_compose("up", "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr

        def serving() -> bool:
            with contextlib.suppress(OSError):
                return all(http_get(port, "/healthz")[1] == "ok\n" for port in ports)
            return False

        wait_until(serving, 60, "both instances connected to Redis")

        async def main() -> list[str | bytes]:
            member_url, publisher_url = (f"ws://127.0.0.1:{port}/room" for port in ports[::-1])
            async with connect(member_url) as member, connect(publisher_url) as publisher:
                # Until the other instance has subscribed: the first probe that arrives.
                async with asyncio.timeout(20):
                    while True:
                        await publisher.send("probe")
                        with contextlib.suppress(TimeoutError):
                            if await asyncio.wait_for(member.recv(), 0.5) == "probe":
                                break
                for n in range(5):
                    await publisher.send(f"m{n}")
                got: list[str | bytes] = []
                while len(got) < 5:  # late probes aside
                    if (message := await asyncio.wait_for(member.recv(), 10)) != "probe":
                        got.append(message)
                return got

        got = asyncio.run(main())
        assert got == [f"m{n}" for n in range(5)]
        stopped = run_compose("stop", "--timeout", "30")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        codes = exit_codes()
        relays = {name: code for name, code in codes.items() if "relay" in name}
        assert len(relays) == 2 and all(c.startswith("0 ") for c in relays.values()), codes
    finally:
        run_compose("down", "--volumes", "--timeout", "0")
