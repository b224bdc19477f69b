"""TLS: wss for clients that trust the certificate, a quiet failure for those that do not
(or cannot speak TLS), mutual TLS, and certificates renewed by SIGHUP without dropping
anyone. Certificates come from trustme: a throwaway CA per test."""

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from tests import rawws
from tests.conftest import Daemon, RssPeak, clean_env, run_cli
from tests.test_protocol import of_port

# What a connection may hold over TLS, whatever the client sends (docs/security.md, Limits):
# write_limit + 2.5 x max_size + 640 KiB, for the TLS layer's read-ahead and the copies it
# makes of a message it encrypts.
TLS_BOUND_MIB = (2**15 + 2.5 * 2**20 + 640 * 1024) / 2**20


@dataclass
class Files:
    cert: Path
    key: Path
    ca: trustme.CA


def issue(directory: Path, ca: trustme.CA | None = None) -> Files:
    """A server certificate for 127.0.0.1 (chain included) and its key, in ``directory``."""
    ca = ca or trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    return Files(cert, key, ca)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def wss(daemon: Daemon) -> str:
    return f"wss://127.0.0.1:{daemon.port}/"


def tls_daemon(start: Callable[..., Daemon], files: Files, *args: str) -> Daemon:
    return start("--tls-cert", str(files.cert), "--tls-key", str(files.key), *args)


async def echo(ws: ClientConnection, message: str | bytes) -> None:
    await ws.send(message)
    assert await ws.recv() == message


def quiet(daemon: Daemon) -> None:
    """Nothing a client did shows above debug: no warning, no error, no traceback."""
    loud = [e for e in daemon.events if e.get("level") in ("warning", "error", "critical")]
    assert loud == [], loud
    assert "Traceback" not in daemon.log
    assert all(line.lstrip().startswith("{") for line in daemon.raw), daemon.log


def test_a_client_that_trusts_the_ca_is_served_wss_and_https(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    files = issue(tmp_path)
    daemon = tls_daemon(start, files, "--max-size", str(8 * 2**20))

    async def main() -> None:
        async with connect(wss(daemon), ssl=trusting(files.ca), max_size=None) as ws:
            await echo(ws, "hello over TLS")
            # Far beyond write_limit: flow control through the TLS transport.
            await echo(ws, os.urandom(4 * 2**20))
            await echo(ws, "still in order")

    asyncio.run(main())
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=trusting(files.ca))
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"ok\n")
    conn.close()
    quiet(daemon)


def test_tls_clients_at_once_each_get_exactly_their_own_echoes(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """TLS reads are decrypted into one buffer the engine lends (``readbuffer.py``): 20
    clients sending at once, messages of every size up to 300 KiB (more than the buffer
    holds), each gets back its own bytes, in order."""
    files = issue(tmp_path)
    daemon = tls_daemon(start, files)

    async def client(n: int) -> None:
        sizes = [1, 125, 126, 16_000, 70_000, 300_000, 33]
        messages = [os.urandom(size) for size in sizes] * 2
        async with connect(wss(daemon), ssl=trusting(files.ca), max_size=None) as ws:
            for message in messages:
                await ws.send(message)  # all sent before any is read: the reads pile up
            for message in messages:
                assert await ws.recv() == message, n

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(20)))

    asyncio.run(main())
    quiet(daemon)


def test_clients_that_do_not_trust_us_or_do_not_speak_tls_fail_quietly(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    files = issue(tmp_path)
    daemon = tls_daemon(start, files, "--log-level", "debug")

    async def main() -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(wss(daemon), ssl=trusting(trustme.CA()), open_timeout=5):
                pass
        with pytest.raises(InvalidMessage):  # closed at once, not left hanging
            async with connect(f"ws://127.0.0.1:{daemon.port}/", open_timeout=5):
                pass
        # After all that, a good client is served.
        async with connect(wss(daemon), ssl=trusting(files.ca)) as ws:
            await echo(ws, "fine")

    asyncio.run(main())
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x04\xff\x00\x00\x00")  # a handshake of no known type
        assert rawws.until_eof(sock) is not None
    daemon.wait_for("tls handshake failed", where=lambda _: len(failures(daemon)) >= 3)
    assert all(e["level"] == "debug" for e in failures(daemon))
    errors = {str(e["error"]) for e in failures(daemon)}
    assert "HTTP_REQUEST" in errors, errors  # what OpenSSL says of a ws:// client
    quiet(daemon)


def failures(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events if e.get("event") == "tls handshake failed"]


def test_a_client_that_never_starts_tls_is_cut_at_the_open_timeout(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = tls_daemon(start, issue(tmp_path), "--open-timeout", "0.5", "--log-level", "debug")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        assert sock.recv(1) == b""  # closed by the server, without a byte
    daemon.wait_for("tls handshake failed")
    quiet(daemon)


def test_mutual_tls_refuses_a_client_without_a_certificate(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    files = issue(tmp_path)
    clients = trustme.CA()
    ca_file = tmp_path / "clients.pem"
    clients.cert_pem.write_to_path(str(ca_file))
    daemon = tls_daemon(start, files, "--tls-ca", str(ca_file), "--log-level", "debug")

    async def main() -> None:
        # TLS 1.3: the client's handshake is over before the server has checked its
        # certificate; it learns of the refusal when it reads the HTTP response.
        with pytest.raises(InvalidMessage):  # closed instead of the HTTP response
            async with connect(wss(daemon), ssl=trusting(files.ca), open_timeout=5) as ws:
                await echo(ws, "no certificate")
        stranger = trusting(files.ca)
        trustme.CA().issue_cert("stranger@example.org").configure_cert(stranger)
        with pytest.raises(InvalidMessage):
            async with connect(wss(daemon), ssl=stranger, open_timeout=5) as ws:
                await echo(ws, "a certificate from another CA")
        member = trusting(files.ca)
        clients.issue_cert("client@example.org").configure_cert(member)
        async with connect(wss(daemon), ssl=member) as ws:
            await echo(ws, "a certificate signed by tls_ca")

    asyncio.run(main())
    daemon.wait_for("tls handshake failed", where=lambda e: "CERTIFICATE" in str(e["error"]))
    quiet(daemon)


def test_a_protocol_violation_over_tls_gets_its_close_code(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """TLS transports cannot half-close (no write_eof): the close frame still arrives."""
    files = issue(tmp_path)
    daemon = tls_daemon(start, files)
    raw = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    with trusting(files.ca).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        rawws.send_handshake(sock, daemon.port)
        rawws.read_handshake(sock)
        sock.sendall(rawws.frame(rawws.OP_TEXT, b"ok") + rawws.frame(0x3, b"reserved"))
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"ok")
        assert rawws.read_close(sock)[0] == 1002
    quiet(daemon)


def test_sighup_renews_the_certificate_and_keeps_open_connections(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    old = issue(tmp_path)
    daemon = tls_daemon(start, old)

    async def main() -> None:
        async with connect(wss(daemon), ssl=trusting(old.ca)) as before:
            await echo(before, "before")
            new = issue(tmp_path)  # same paths, another CA
            since = len(daemon.events)
            daemon.signal(signal.SIGHUP)
            await asyncio.to_thread(
                daemon.wait_for,
                "tls certificate loaded",
                where=lambda e: daemon.events.index(e) >= since,
            )
            async with connect(wss(daemon), ssl=trusting(new.ca)) as after:
                await echo(after, "the new certificate")
            with pytest.raises(ssl.SSLCertVerificationError):
                async with connect(wss(daemon), ssl=trusting(old.ca), open_timeout=5):
                    pass
            await echo(before, "the open connection is untouched")

    asyncio.run(main())
    quiet(daemon)


def test_a_renewal_that_cannot_be_used_keeps_the_old_certificate(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    files = issue(tmp_path)
    config = tmp_path / "wsechod.toml"
    config.write_text(f'tls_cert = "{files.cert}"\ntls_key = "{files.key}"\n')
    daemon = start("--config", str(config))
    other = issue(tmp_path / "other")
    files.key.write_bytes(other.key.read_bytes())  # a key that is not the certificate's
    daemon.signal(signal.SIGHUP)
    error = daemon.wait_for("settings not reloaded: the old ones stay")
    assert "tls_key" in str(error["error"]) and "does not match" in str(error["error"])

    async def main() -> None:
        async with connect(wss(daemon), ssl=trusting(files.ca)) as ws:
            await echo(ws, "the old certificate is still served")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("case", "key", "says"),
    [
        ("missing", "tls_cert", "No such file or directory"),
        ("directory", "tls_cert", "Is a directory"),
        ("not pem", "tls_cert", "not a PEM certificate"),
        ("mismatch", "tls_key", "does not match the certificate"),
        ("key alone", "tls_cert", "no private key in this file"),
        ("encrypted", "tls_key", "the key is encrypted"),
        ("ca not pem", "tls_ca", "not a PEM certificate"),
        ("ca without cert", "tls_ca", "needs tls_cert too"),
    ],
)
def test_unusable_tls_files_are_one_line_and_exit_2(
    case: str, key: str, says: str, tmp_path: Path
) -> None:
    files = issue(tmp_path)
    cert, tls_key, ca = str(files.cert), str(files.key), ""
    if case == "missing":
        cert = str(tmp_path / "nowhere.pem")
    elif case == "directory":
        cert = str(tmp_path)
    elif case == "not pem":
        cert = str(tmp_path / "junk.pem")
        Path(cert).write_text("not a certificate\n")
    elif case == "mismatch":
        tls_key = str(issue(tmp_path / "other").key)
    elif case == "key alone":
        tls_key = ""
    elif case == "encrypted":
        encrypted = tmp_path / "encrypted.pem"
        encrypted.write_bytes(encrypt(files.key))
        tls_key = str(encrypted)
    elif case == "ca not pem":
        ca = str(files.key)
    args = ["--tls-key", tls_key] if tls_key else []
    args += ["--tls-ca", ca] if ca else []
    if case == "ca without cert":
        args = ["--tls-ca", str(files.cert)]
    else:
        args = ["--tls-cert", cert, *args]
    for mode in ("--check-config", "--port=0"):
        result = run_cli("--config", "", mode, *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"wsechod: error: invalid {key} '"), lines[0]
        assert says in lines[0] and f"(from --{key.replace('_', '-')})" in lines[0]


def encrypt(key: Path) -> bytes:
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run as another user")
def test_check_config_checks_that_user_can_read_the_files() -> None:
    directory = Path(tempfile.mkdtemp())  # pytest's tmp_path is root's alone
    try:
        directory.chmod(0o755)
        files = issue(directory)
        files.key.chmod(0o600)  # root's alone
        args = ["--config", "", "--check-config", "--user", "nobody"]
        args += ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert f"cannot use tls_key '{files.key}': Permission denied" in result.stderr
        files.key.chmod(0o644)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(directory)


def test_tls_keys_from_the_environment(tmp_path: Path) -> None:
    files = issue(tmp_path)
    env = clean_env(WSECHOD_TLS_CERT=str(files.cert), WSECHOD_TLS_KEY=str(tmp_path / "no.pem"))
    result = run_cli("--config", "", "--check-config", env=env)
    assert result.returncode == 2
    assert "(from WSECHOD_TLS_KEY)" in result.stderr


class NonReader(threading.Thread):
    """A TLS client that sends ``chunk`` over and over and never reads a byte."""

    def __init__(self, port: int, context: ssl.SSLContext, chunk: bytes) -> None:
        super().__init__(daemon=True)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        rawws.send_handshake(self.sock, port)
        rawws.read_handshake(self.sock)
        self.port = self.sock.getsockname()[1]
        self.chunk = chunk
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the server closed it: what the test waits for
            while True:
                self.sock.sendall(self.chunk)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.mark.timeout(60)
def test_tls_clients_sending_1_mib_that_never_read_are_bounded_and_dropped(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    clients = 10
    files = issue(tmp_path)
    daemon = tls_daemon(
        start, files, "--ping-interval", "1", "--ping-timeout", "1", "--log-level", "debug"
    )
    rss = RssPeak(daemon.proc.pid)
    message = rawws.frame(rawws.OP_BINARY, os.urandom(2**20 - 16))
    floods = [NonReader(daemon.port, trusting(files.ca), message) for _ in range(clients)]
    try:
        for flood in floods:
            daemon.wait_for("connection closed", 30, of_port(flood.port))
    finally:
        growth = rss.stop()
        for flood in floods:
            flood.close()
    closes = [e for e in daemon.events if e["event"] == "connection closed"]
    print(f"{clients} TLS non-readers of 1 MiB messages: server RSS grew {growth:.1f} MiB")
    assert [e["code_sent"] for e in closes] == [1011] * clients
    assert growth < clients * TLS_BOUND_MIB + 4


def test_sigterm_drains_tls_clients_with_1001(start: Callable[..., Daemon], tmp_path: Path) -> None:
    files = issue(tmp_path)
    daemon = tls_daemon(start, files)

    async def main() -> int | None:
        async with connect(wss(daemon), ssl=trusting(files.ca)) as ws:
            await echo(ws, "before the stop")
            daemon.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return None if ws.close_code is None else int(ws.close_code)

    assert asyncio.run(main()) == 1001
    assert daemon.wait(10) == 0
    drained = daemon.wait_for("drained")
    assert drained["force_closed"] == 0
    quiet(daemon)


def test_turning_tls_on_or_off_needs_a_restart(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Whether the listeners speak TLS is set when they start accepting: a reload that
    would change it keeps it as it is, and says so; renewing stays live (above)."""
    files = issue(tmp_path)
    config = tmp_path / "wsechod.toml"
    config.write_text("")
    daemon = start("--config", str(config))
    config.write_text(f'tls_cert = "{files.cert}"\ntls_key = "{files.key}"\n')
    daemon.signal(signal.SIGHUP)
    warning = daemon.wait_for("setting needs a restart", where=lambda e: e["key"] == "tls_cert")
    assert warning["kept"] == ""

    async def main() -> None:
        async with connect(f"ws://127.0.0.1:{daemon.port}/") as ws:
            await echo(ws, "still plain")

    asyncio.run(main())


@pytest.mark.parametrize("how", ["close_notify", "fin", "reset"])
def test_a_client_gone_with_frames_unanswered_leaves_no_warnings(
    start: Callable[..., Daemon], tmp_path: Path, how: str
) -> None:
    """3000 small frames, then the client goes (TLS close_notify, a FIN, a reset) before
    the echoes are written: nothing more is written to it, so the TLS layer has nothing
    to warn about (it warned once per write after the close: a line per frame)."""
    files = issue(tmp_path)
    daemon = tls_daemon(start, files, "--log-level", "debug")
    raw = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock = trusting(files.ca).wrap_socket(raw, server_hostname="127.0.0.1")
    rawws.send_handshake(sock, daemon.port)
    rawws.read_handshake(sock)
    port = sock.getsockname()[1]
    sock.sendall(rawws.frame(rawws.OP_TEXT, b"x") * 3000)
    if how == "close_notify":
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.unwrap()
    elif how == "fin":
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    daemon.wait_for("connection closed", where=lambda e: e["peer"].endswith(f":{port}"))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    quiet(daemon)
