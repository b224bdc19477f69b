"""Fixtures that start the real wsechod process and watch its log."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.credentials import key_file, secret_file  # noqa: F401 - fixtures for every module
from tests.redisd import (  # noqa: F401 - fixtures for every module
    cluster_group,
    make_redis,
    redis_server,
    sentinel_group,
)

# The console script installed next to the interpreter running the tests (the .venv).
WSECHOD = str(Path(sys.executable).with_name("wsechod"))
JOURNAL_PRIORITY = re.compile(r"^<[0-7]>")


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without WSECHOD_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSECHOD_")}
    env.update(extra)
    return env


def peer_port(event: dict[str, Any]) -> int:
    """The client's port in a log event's ``peer`` ("host:port")."""
    return int(str(event["peer"]).rsplit(":", 1)[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run wsechod to completion (for commands that exit: errors, --check-config)."""
    return subprocess.run(
        [WSECHOD, *args],
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


class Daemon:
    """A running wsechod, its JSON log read line by line on a thread."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        argv = [*prefix, WSECHOD, "--config", "", "--port", "0", "--log-format", "json", *args]
        self._spawn(argv, env if env is not None else clean_env(), pass_fds)

    def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        pass_fds: tuple[int, ...],
        *,
        log: str = "stderr",
        other: IO[str] | None = None,
    ) -> None:
        """Start ``argv``, its log (JSON lines on ``log``: stderr or stdout) read on a
        thread; the other stream into ``other`` if given."""
        elsewhere = subprocess.PIPE if other is None else other
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if log == "stdout" else elsewhere,
            stderr=subprocess.PIPE if log == "stderr" else elsewhere,
            text=True,
            pass_fds=pass_fds,
        )
        self._log_pipe = self.proc.stderr if log == "stderr" else self.proc.stdout
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def ready(self) -> "Daemon":
        """Wait for the listening event and learn the port the daemon picked."""
        listening = self.wait_for("listening")
        self.address: str = listening["addresses"][0]
        # TCP "host:port"; a Unix socket (path or @name) has no port.
        self.port = int(self.address.rsplit(":", 1)[1]) if ":" in self.address else 0
        self.url = f"ws://127.0.0.1:{self.port}"
        return self

    def _read(self) -> None:
        assert self._log_pipe is not None
        for line in self._log_pipe:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # tracebacks, if any, stay in .raw
                    # Without the "<6>" priority it has for the journal, if any.
                    self.events.append(json.loads(JOURNAL_PRIORITY.sub("", line, count=1)))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self,
        event: str,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> dict[str, Any]:
        """Block until the log has ``event`` (matching ``where``); fail with the log if it
        never comes."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e.get("event") == event and where(e)), None)

        with self._cond:
            ok = self._cond.wait_for(
                lambda: found() is not None or not self._reader.is_alive(), timeout
            )
            hit = found()
        if hit is None:
            raise AssertionError(f"no {event!r} event within {timeout}s (ok={ok}):\n{self.log}")
        return hit

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self.raw)

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; return the monotonic time it was sent."""
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def start() -> Iterator[Callable[..., Daemon]]:
    """Start wsechod processes; whatever is still running at the end is killed."""
    started: list[Daemon] = []

    def _start(
        *args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> Daemon:
        """``prefix`` is a command that execs wsechod, e.g. prlimit with its options."""
        daemon = Daemon(*args, env=env, prefix=prefix, pass_fds=pass_fds)
        started.append(daemon)
        return daemon.ready()

    yield _start
    for daemon in started:
        daemon.kill()


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
