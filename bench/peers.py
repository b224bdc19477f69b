"""The servers under test: how to start each, pinned to one core, and stop it for sure."""

import collections
import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import tls, tokens

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "bench" / "node"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT = 30.0


class PeerError(RuntimeError):
    """A peer that cannot be started or measured; the others go on."""


def wsechod(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "wsechod",
        "--config",
        "",
        "--port",
        "0",
        "--log-format",
        "console",
        "--max-connections",
        "0",
        *extra,
    ]


def node(script: str, *extra: str) -> list[str]:
    if shutil.which("node") is None:
        raise PeerError("node not found: install Node.js 20 (then make bench runs npm ci)")
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        raise PeerError(f"ws not installed: run npm ci --prefix {NODE_DIR.relative_to(ROOT)}")
    return ["node", str(NODE_DIR / script), "0", *extra]


def python(module: str) -> list[str]:
    return [sys.executable, "-m", module, "0"]


@dataclass(frozen=True)
class Peer:
    name: str  # what --only selects
    label: str  # column heading
    kind: str  # "echo" or "relay"
    argv: tuple[str, ...]  # "wsechod", "node", "python" and arguments
    scrape: bool = False  # GET /metrics every second while it is measured (--scrape)
    pinned: bool = True  # on the server core; else on every core (several workers)
    auth: str | None = None  # wsechod with auth = "jwt": the tokens' algorithm
    deflate: bool = False  # relay: the subscribers offer permessage-deflate
    tls: bool = False  # served over TLS (the bench's certificate, ``tls.py``)

    def command(self, members: int) -> list[str]:
        """Its command line; ``members``: a relay channel's, at most (publishers too)."""
        how, *args = self.argv
        if self.kind == "redis":  # through the Redis the bench started
            if not REDIS_URL:
                raise PeerError("no redis-server (make redis installs it)")
            args += ["--broker", REDIS_URL[0], "--max-channel-members", str(members)]
        if how == "wsechod":
            if self.kind == "relay":
                args += ["--max-channel-members", str(members)]
            if self.auth is not None:
                args += tokens.server_args(self.auth)
            return wsechod(*args)
        if how == "node":
            return node(*args)
        return python(args[0])


HISTORY = ("--history-size", "10000", "--history-ttl", "600")
ECHO_PEERS = (
    Peer("example", "example", "echo", ("python", "bench.example")),
    Peer("example-asyncio", "ex-asyncio", "echo", ("python", "bench.baseline")),
    Peer("wsechod", "wsechod", "echo", ("wsechod",)),
    Peer("wsechod-jwt", "+jwt HS256", "echo", ("wsechod",), auth="HS256"),
    Peer("wsechod-controls", "+controls", "echo", ("wsechod", "--controls")),
    Peer("ws", "ws", "echo", ("node", "echo.mjs")),
    Peer("picows", "picows", "echo", ("python", "bench.picows_echo")),
    Peer("wsechod-tls", "wsechod TLS", "echo", ("wsechod",), tls=True),
    Peer("ws-tls", "ws TLS", "echo", ("node", "echo.mjs"), tls=True),
    Peer("picows-tls", "picows TLS", "echo", ("python", "bench.picows_echo"), tls=True),
)
RELAY_PEERS = (
    Peer("broadcast", "broadcast()", "relay", ("python", "bench.broadcast_relay")),
    Peer("wsechod", "wsechod", "relay", ("wsechod", "--mode", "relay")),
    Peer("wsechod-jwt", "+jwt HS256", "relay", ("wsechod", "--mode", "relay"), auth="HS256"),
    Peer("wsechod-history", "+history", "relay", ("wsechod", "--mode", "relay", *HISTORY)),
    Peer(
        "wsechod-deflate",
        "+deflate",
        "relay",
        ("wsechod", "--mode", "relay", "--compression", "deflate"),
        deflate=True,
    ),
    Peer("ws", "ws", "relay", ("node", "broadcast.mjs")),
    Peer("wsechod-tls", "wsechod TLS", "relay", ("wsechod", "--mode", "relay"), tls=True),
    Peer("ws-tls", "ws TLS", "relay", ("node", "broadcast.mjs"), tls=True),
)
# Fan-out between two instances through Redis: plain pub/sub, and with history.
REDIS_PEERS = (
    Peer("wsechod-redis", "pub/sub", "redis", ("wsechod", "--mode", "relay")),
    Peer("wsechod-redis-history", "+history", "redis", ("wsechod", "--mode", "relay", *HISTORY)),
)
REDIS_URL: list[str] = []  # the bench's Redis, once started


def start_redis(core: int | None) -> "subprocess.Popen[bytes]":
    """A redis-server on a free port beside the servers (no persistence), in REDIS_URL."""
    import redis  # noqa: PLC0415 - the redis extra, needed here only

    if shutil.which("redis-server") is None:
        raise PeerError("redis-server not found: make redis installs it")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [*pin([core] if core is not None else None), "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=1).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise PeerError("redis-server did not start") from None
            time.sleep(0.05)
    REDIS_URL[:] = [f"redis://127.0.0.1:{port}/0"]
    return proc


# A channel with history: resumed from its first message.
RESUME_PEERS = (
    Peer(
        "wsechod-history", "wsechod", "resume",
        ("wsechod", "--mode", "relay", *HISTORY, "--history-memory", str(2**30)),
    ),
)  # fmt: skip
# Opening handshakes: wsechod without tokens, and checking a different one each time.
HANDSHAKE_PEERS = (
    Peer("wsechod", "no token", "handshake", ("wsechod",)),
    Peer("wsechod-jwt", "HS256", "handshake", ("wsechod",), auth="HS256"),
    Peer("wsechod-es256", "ES256", "handshake", ("wsechod",), auth="ES256"),
    Peer("ws", "ws", "handshake", ("node", "echo.mjs")),
    Peer("picows", "picows", "handshake", ("python", "bench.picows_echo")),
    Peer("wsechod-tls", "wsechod TLS", "handshake", ("wsechod",), tls=True),
    Peer("ws-tls", "ws TLS", "handshake", ("node", "echo.mjs"), tls=True),
    Peer("picows-tls", "picows TLS", "handshake", ("python", "bench.picows_echo"), tls=True),
)
# With --scrape, right after wsechod: the same server, with a Prometheus-like scraper.
SCRAPED = "wsechod-scraped"
SCRAPED_PEERS = {
    "echo": Peer(SCRAPED, "scraped", "echo", ("wsechod",), scrape=True),
    "relay": Peer(SCRAPED, "scraped", "relay", ("wsechod", "--mode", "relay"), scrape=True),
}

# With --workers N (N > 1): wsechod with N worker processes, on every core.
WORKERS = "wsechod-workers"


def workers_peer(n: int) -> Peer:
    return Peer(WORKERS, f"wsechod {n}w", "echo", ("wsechod", "--workers", str(n)), pinned=False)


def deflate_peer(peer: Peer) -> Peer | None:
    """The same server with permessage-deflate on, or None if it has none (picows)."""
    if peer.name == "wsechod":
        return replace(peer, argv=(*peer.argv, "--compression", "deflate"))
    if peer.name == "ws":
        return replace(peer, argv=(*peer.argv, "deflate"))
    if peer.name in ("example", "example-asyncio"):
        return peer  # websockets compresses by default
    return None


# Every core the bench may use, before it pins itself to the client's (set by its placement):
# the workers peer runs on all of them.
ALL_CORES: list[int] = sorted(os.sched_getaffinity(0))


def pin(cores: list[int] | None) -> list[str]:
    prefix = []
    if shutil.which("setpriv"):  # killed with us, even by SIGKILL
        prefix += ["setpriv", "--pdeathsig", "KILL", "--"]
    if cores is not None and shutil.which("taskset"):
        prefix += ["taskset", "-c", ",".join(map(str, cores))]
    return prefix


LIVE: set["Server"] = set()


class Server:
    """One peer process: started on port 0, the port read from its output."""

    def __init__(self, peer: Peer, core: int | None, members: int = 1) -> None:
        self.peer = peer
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(
                [
                    *pin(([core] if core is not None else None) if peer.pinned else ALL_CORES),
                    *peer.command(members),
                ],
                cwd=ROOT,
                env=os.environ | tls.environ() if peer.tls else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise PeerError(f"cannot start {peer.label}: {exc}") from exc
        LIVE.add(self)
        ports: queue.Queue[int | None] = queue.Queue()
        threading.Thread(target=self._read, args=(ports,), daemon=True).start()
        try:
            port = ports.get(timeout=START_TIMEOUT)
        except queue.Empty:
            port = None
        if port is None:
            self.kill()
            output = "".join(self.tail).strip().splitlines()[-5:]
            raise PeerError(
                f"{peer.label} did not print its port (exit status {self.proc.poll()}): "
                + " | ".join(output)
            )
        self.port = port
        self.pid = self.proc.pid

    def _read(self, ports: "queue.Queue[int | None]") -> None:
        assert self.proc.stdout is not None
        found = False
        for line in self.proc.stdout:  # keep reading: a chatty server never blocks
            self.tail.append(line)
            # the first address that is not the broker's (redis://127.0.0.1:...)
            if not found and (match := re.search(r"(?<!redis://)127\.0\.0\.1:(\d+)", line)):
                found = True
                ports.put(int(match.group(1)))
        if not found:
            ports.put(None)

    def cpu_seconds(self) -> float:
        """User + system time of the whole process (every thread), and of its children
        (workers): those running, and those it has reaped."""
        stat = _stat(self.pid)
        ticks = sum(map(int, stat[11:15]))  # utime, stime, cutime, cstime
        for child in self.children():
            with contextlib.suppress(OSError):
                ticks += int(_stat(child)[11]) + int(_stat(child)[12])
        return ticks / CLOCK_TICKS

    def children(self) -> list[int]:
        """Its child processes (no /proc/PID/task/TID/children on every kernel: a scan)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if int(_stat(int(entry.name))[1]) == self.pid:
                        found.append(int(entry.name))
        return found

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * PAGE

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        LIVE.discard(self)


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..., utime at [11]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def kill_all() -> None:
    for server in list(LIVE):
        server.kill()
