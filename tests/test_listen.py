"""Listeners: several at once (TCP, IPv6, unix sockets, abstract ones), unix socket files
with their mode and owner, a stale file replaced, a live one refused, removed at exit."""

import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect, unix_connect

from tests.conftest import Daemon, clean_env, run_cli
from tests.test_daemon import IS_ROOT, gone, wait_for_log

pytestmark = pytest.mark.timeout(30)


def echo_over_unix(path: str, message: str = "over unix") -> object:
    """One echo through the unix socket at ``path`` ("\\0name": abstract)."""
    with unix_connect(path, uri="ws://localhost/") as ws:
        ws.send(message)
        return ws.recv(timeout=10)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that nobody can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="wsechod-test-", dir="/tmp"))
    path.chmod(0o755)
    (path / "logs").mkdir()
    os.chown(path / "logs", 65534, 65534)
    yield path
    shutil.rmtree(path)


def activation_prefix(sock: socket.socket) -> tuple[tuple[str, ...], int]:
    """A trampoline that passes ``sock`` as systemd does (fd 3, LISTEN_PID/LISTEN_FDS), as
    in test_systemd.py (not imported: that module needs systemd's tools)."""
    fd = os.dup(sock.fileno())
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    return ("bash", "-c", script, "bash"), fd


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_unix_socket_serves_echo_with_its_mode_and_is_removed_at_exit(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "run" / "ws.sock"  # the directory is made at start
    daemon = start(
        "--listen", f"unix:{path}", "--unix-socket-mode", "0640", "--log-level", "debug"
    )  # fmt: skip
    assert daemon.wait_for("listening")["addresses"] == [str(path)]
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640  # not what the umask (022) would give: 0755
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())  # nobody to give it to
    assert echo_over_unix(str(path)) == "over unix"
    opened = daemon.wait_for("connection open")
    assert opened["peer"] == str(path)  # a unix client has no address: the socket's path
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not path.exists() and not path.is_symlink()


def test_a_live_socket_is_address_in_use_and_is_left_alone(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ws.sock"
    first = start("--listen", f"unix:{path}")
    inode = path.stat().st_ino
    second = run_cli("--config", "", "--listen", f"unix:{path}")
    assert second.returncode == 1
    assert second.stderr == f"wsechod: error: cannot listen on {path}: Address already in use\n"
    assert path.stat().st_ino == inode  # the failed start removed nothing
    assert echo_over_unix(str(path)) == "over unix"  # and the first one still serves
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0


def test_a_stale_socket_left_by_a_crash_is_replaced(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ws.sock"
    crashed = start("--listen", f"unix:{path}")
    crashed.kill()  # SIGKILL: nothing is cleaned up
    assert stat.S_ISSOCK(path.stat().st_mode)  # left behind, nobody accepts on it
    daemon = start("--listen", f"unix:{path}")
    warning = daemon.wait_for("stale unix socket replaced")
    assert (warning["path"], warning["level"]) == (str(path), "warning")
    assert echo_over_unix(str(path)) == "over unix"


def test_what_is_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    result = run_cli("--config", "", "--listen", f"unix:{path}")
    assert result.returncode == 1
    assert result.stderr == (
        f"wsechod: error: cannot listen on {path}: it exists and is not a socket\n"
    )
    assert path.read_text() == "keep me"
    check = run_cli("--config", "", "--listen", f"unix:{path}", "--check-config")
    assert check.returncode == 1  # --check-config finds it too, without starting
    assert check.stderr == result.stderr


def test_a_socket_replaced_meanwhile_is_not_removed_at_exit(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """At exit only the file this process bound is removed: a successor's stays."""
    path = tmp_path / "ws.sock"
    daemon = start("--listen", f"unix:{path}")
    path.unlink()
    with socket.socket(socket.AF_UNIX) as successor:
        successor.bind(str(path))
        successor.listen()
        inode = path.stat().st_ino
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        assert path.stat().st_ino == inode  # still there...
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # ...and still the successor's


def test_several_listeners_at_once(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "ws.sock"
    abstract = f"wsechod-test-{os.getpid()}"
    entries = ["127.0.0.1:0", *(["[::1]:0"] if has_ipv6() else []), f"unix:{path}"]
    # A repeated flag, and comma-separated entries within one.
    daemon = start("--listen", ",".join(entries), "--listen", f"unix:@{abstract}")
    addresses = daemon.wait_for("listening")["addresses"]
    assert len(addresses) == len(entries) + 1
    assert addresses[0] == f"127.0.0.1:{daemon.port}"  # the order given; the first is TCP
    assert addresses[-2:] == [str(path), f"@{abstract}"]
    with connect(f"ws://127.0.0.1:{daemon.port}/") as ws:
        ws.send("v4")
        assert ws.recv(timeout=10) == "v4"
    if has_ipv6():
        port6 = int(addresses[1].rsplit(":", 1)[1])
        assert addresses[1] == f"[::1]:{port6}"
        with connect(f"ws://[::1]:{port6}/") as ws:
            ws.send("v6")
            assert ws.recv(timeout=10) == "v6"
    assert echo_over_unix(str(path)) == "over unix"
    assert echo_over_unix("\0" + abstract, "abstract") == "abstract"
    # --port 0 came from the test fixture: redundant with 127.0.0.1:0, so no warning (one
    # that listen does not have is warned of: test_host_and_port_that_listen_has_...).
    assert "settings have no effect" not in {e["event"] for e in daemon.events}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not path.exists()


def test_listeners_from_the_file_and_the_environment_in_check_config(tmp_path: Path) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text('listen = ["[::1]:8001", "unix:ws.sock"]\nunix_socket_mode = "600"\n')
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cwd = Path.cwd()  # a relative path is made absolute (a daemon runs in /)
    assert f'listen = ["[::1]:8001", "unix:{cwd}/ws.sock"]  # {config}' in lines
    assert f'unix_socket_mode = "0600"  # {config}' in lines
    assert (
        f"# listening sockets: [::1]:8001, unix:{cwd}/ws.sock "
        "(unix socket files: mode 0600, owner unchanged)"
    ) in lines
    env = clean_env(WSECHOD_LISTEN=" 127.0.0.1:8002 , :8003,unix:@name ")
    result = run_cli("--config", "", "--check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "# listening sockets: 127.0.0.1:8002, :8003, unix:@name" in result.stdout
    assert "listen = [" in result.stdout and "# WSECHOD_LISTEN" in result.stdout
    default = run_cli("--config", "", "--check-config")
    assert "# listening sockets: 127.0.0.1:8765\n" in default.stdout


def test_host_and_port_that_listen_has_are_redundant_not_ignored() -> None:
    """A container image sets host and port (0.0.0.0:8765); a listen that has that
    address (an ops listener besides) says nothing; another port is said to be ignored."""
    listen = "0.0.0.0:8765 public,0.0.0.0:9100 ops"
    image = clean_env(WSECHOD_HOST="0.0.0.0", WSECHOD_PORT="8765", WSECHOD_LISTEN=listen)
    quiet = run_cli("--config", "", "--check-config", env=image)
    assert quiet.returncode == 0 and "no effect" not in quiet.stdout + quiet.stderr
    moved = run_cli("--config", "", "--check-config", env={**image, "WSECHOD_PORT": "9000"})
    assert moved.returncode == 0
    assert "settings have no effect: host (listen replaces host and port), port" in moved.stderr


@pytest.mark.parametrize(
    ("args", "toml", "expected"),
    [
        (["--listen", "8765"], None, "invalid listen '8765' (from --listen): expected host:port"),
        (["--listen", "::1:8765"], None, "an IPv6 address goes in brackets: [::1]:8765"),
        (["--listen", "a:1,b:99999"], None, "'b:99999': port '99999' must be a number between"),
        (["--listen", "unix:"], None, "expected unix:/path/to/socket or unix:@name"),
        (["--listen", "a:1", "--listen", "a:1"], None, "'a:1' is listed twice"),
        (["--listen", "unix:/" + "x" * 120], None, "a unix socket address is at most 107 bytes"),
        ([], 'listen = ":1"', 'expected an array of strings (TOML: write [":1"])'),
        ([], "listen = [8765]", "expected an array of strings"),
        (["--unix-socket-mode", "0999"], None, "invalid unix_socket_mode '0999' (from --unix"),
        ([], "unix_socket_mode = 0o660", "expected str, got int"),
        (["--unix-socket-owner", "no-such-user"], None, "(from --unix-socket-owner): no such user"),
        (["--unix-socket-owner", ":no-such-group-here"], None, "no such group"),
    ],
)  # fmt: skip
def test_bad_listeners_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], toml: str | None, expected: str
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text(toml or "")
    result = run_cli("--config", str(config), *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.startswith("wsechod: error: invalid ")
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(not IS_ROOT, reason="giving files away and dropping privileges need root")
def test_root_gives_the_socket_to_its_owner_and_the_user_removes_it(shared_dir: Path) -> None:
    """As root with --user nobody: the directory is made for nobody, the socket file is
    created as unix_socket_owner says before anyone can connect, and the unprivileged
    daemon removes it when it stops."""
    path = shared_dir / "run" / "ws.sock"
    log = shared_dir / "logs" / "wsechod.log"
    pidfile = shared_dir / "logs" / "wsechod.pid"
    result = run_cli(
        "--config", "", "--daemon", "--user", "nobody", "--listen", f"unix:{path}",
        "--unix-socket-owner", "root:nogroup", "--log-file", str(log), "--pidfile", str(pidfile),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    try:
        assert wait_for_log(log, "listening")["addresses"] == [str(path)]
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 65534, 0o660)
        assert path.parent.stat().st_uid == 65534  # made for the user, who removes the file
        assert echo_over_unix(str(path)) == "over unix"
        os.kill(pid, signal.SIGTERM)
        assert gone(pid, 10)
    finally:
        if not gone(pid, 0):
            os.kill(pid, signal.SIGKILL)
    assert not path.exists()
    assert "cannot remove unix socket" not in log.read_text()
    # Without unix_socket_owner, the file belongs to the user the server runs as.
    check = run_cli(
        "--config", "", "--user", "nobody", "--listen", f"unix:{path}", "--check-config"
    )  # fmt: skip
    assert "(unix socket files: mode 0660, owner nobody:nogroup)" in check.stdout


def test_sockets_from_systemd_take_precedence_over_listen(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ws.sock"
    with socket.create_server(("127.0.0.1", 0)) as sock:
        prefix, fd = activation_prefix(sock)
        daemon = start("--listen", f"unix:{path}", prefix=prefix, pass_fds=(fd,))
        os.close(fd)
        assert daemon.wait_for("listening")["addresses"] == [f"127.0.0.1:{sock.getsockname()[1]}"]
        assert not path.exists()  # nothing of the configured listeners was bound
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0


def test_listeners_need_a_restart(start: Callable[..., Daemon], tmp_path: Path) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n')
    daemon = start("--config", str(config))
    path = tmp_path / "ws.sock"
    config.write_text(f'listen = ["127.0.0.1:0", "unix:{path}"]\nunix_socket_mode = "0600"\n')
    daemon.signal(signal.SIGHUP)
    kept = daemon.wait_for("setting needs a restart", where=lambda e: e["key"] == "listen")
    assert (kept["value"], kept["kept"]) == (["127.0.0.1:0", f"unix:{path}"], ["127.0.0.1:0"])
    daemon.wait_for("setting needs a restart", where=lambda e: e["key"] == "unix_socket_mode")
    assert not path.exists()
    with connect(daemon.url) as ws:  # still serving where it was
        ws.send("same place")
        assert ws.recv(timeout=10) == "same place"
