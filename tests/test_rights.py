"""Tokens and channel rights (auth = "jwt"): real tokens made with PyJWT, keys generated
per run (HS256 secrets, RS256, ES256 and Ed25519 key pairs), real wsechod processes, two
instances through a real Redis, and three clients: websockets, raw sockets, and the
``websocket-client`` library."""

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect
from websockets.typing import Subprotocol

from tests import rawws
from tests.conftest import Daemon, clean_env, run_cli
from tests.credentials import SECRET, bearer, token
from tests.redisd import RedisServer
from tests.test_echo import http_get
from tests.test_relay import subscribed
from wsechod.auth import keys
from wsechod.auth.tokens import Refused, Verifier


def guarded(start: Callable[..., Daemon], secret_file: Path, *args: str) -> Daemon:
    return start("--auth", "jwt", "--jwt-secret-file", str(secret_file), *args)


def refusal(url: str, **kwargs: Any) -> tuple[int, str]:
    """The HTTP status and body a refused handshake gets."""
    with pytest.raises(InvalidStatus) as refused:
        sync_connect(url, open_timeout=10, **kwargs).close()
    response = refused.value.response
    return response.status_code, (response.body or b"").decode()


# --- Who may connect -------------------------------------------------------------------


def test_a_token_in_each_place_is_accepted_and_none_is_401(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file, "--access-log")
    good = token(subscribe=["/**"])
    with sync_connect(f"{daemon.url}/room", additional_headers=bearer(good)) as ws:
        ws.send("header")
        assert ws.recv(timeout=10) == "header"
    with sync_connect(
        f"{daemon.url}/room",
        subprotocols=[Subprotocol("wsechod.auth"), Subprotocol(f"bearer.{good}")],
    ) as ws:  # the browser's way: the marker is selected, never the token
        assert ws.subprotocol == "wsechod.auth"
        ws.send("subprotocol")
        assert ws.recv(timeout=10) == "subprotocol"
    with sync_connect(f"{daemon.url}/room?x=1&token={good}") as ws:
        ws.send("query")
        assert ws.recv(timeout=10) == "query"
    status, body = refusal(f"{daemon.url}/room")
    assert (status, body) == (401, "unauthorized: missing token\n")
    access = daemon.wait_for("access", where=lambda e: "token" in e["path"])
    assert access["sub"] == "alice"
    assert access["path"] == "/room?x=1&token=***"
    assert good not in daemon.log  # never in a log line, whichever way it came


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("garbage", lambda: "not-a-jwt", "invalid token"),
        ("expired", lambda: token(subscribe=["/**"], ttl=-60), "token expired"),
        ("wrong key", lambda: token(subscribe=["/**"], key=b"x" * 40), "invalid token"),
        ("no exp", lambda: jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), "invalid token"),
        ("alg none", lambda: jwt.encode({"exp": time.time() + 60}, "", algorithm="none"),
         "invalid token"),
        ("bad rights", lambda: token(subscribe="/**"), "invalid rights claim"),  # type: ignore[arg-type]
        ("partial wildcard", lambda: token(subscribe=["/room*"]), "invalid rights claim"),
        ("audience", lambda: token(subscribe=["/**"], aud="someone-else"), "wrong audience"),
    ],
)  # fmt: skip
def test_a_bad_token_is_401_with_its_reason(
    start: Callable[..., Daemon],
    secret_file: Path,
    name: str,
    make: Callable[[], str],
    reason: str,
) -> None:
    daemon = guarded(start, secret_file, "--jwt-leeway", "0")
    status, body = refusal(f"{daemon.url}/room", additional_headers=bearer(make()))
    assert (status, body) == (401, f"unauthorized: {reason}\n"), name
    daemon.wait_for("connection refused", where=lambda e: e["reason"] == reason)


def test_no_right_to_the_channel_is_403_and_rights_follow_the_patterns(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file)
    rooms = token(subscribe=["/rooms/*", "/users/alice/**"])
    for path in ("/rooms/42", "/rooms/%34%32", "/users/alice/inbox", "/users/alice/a/b"):
        with sync_connect(f"{daemon.url}{path}", additional_headers=bearer(rooms)):
            pass
    for path in ("/rooms", "/rooms/42/chat", "/users/bob/inbox", "/users/alice", "/"):
        status, body = refusal(f"{daemon.url}{path}", additional_headers=bearer(rooms))
        assert (status, body) == (403, "forbidden: no right to this channel\n"), path
    no_claim = token()  # valid, with no rights at all
    assert refusal(f"{daemon.url}/rooms/1", additional_headers=bearer(no_claim))[0] == 403


def test_two_tokens_in_one_place_are_a_bad_request(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file)
    good = token(subscribe=["/**"])
    status, body = refusal(f"{daemon.url}/r?token={good}&token={good}")
    assert (status, body) == (400, "bad request: more than one token query parameter\n")
    status, body = refusal(
        f"{daemon.url}/r",
        subprotocols=[Subprotocol(s) for s in ("wsechod.auth", f"bearer.{good}", f"bearer.{good}")],
    )
    assert status == 400
    assert "more than one bearer. entry" in body
    status, body = refusal(f"{daemon.url}/r", additional_headers={"Authorization": "Basic eA=="})
    assert status == 400
    assert "Bearer" in body


def test_rotated_keys_are_chosen_by_kid_with_each_algorithm(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """HS256 and three kinds of public keys at once, each selected by its kid; a token
    signed by one key but naming another's kid is refused."""
    private: dict[
        str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }
    args = ["--auth", "jwt"]
    for name, key in private.items():
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (tmp_path / f"{name}.pem").write_bytes(pem)
        args += ["--jwt-public-key", f"{name}={tmp_path / name}.pem"]
    (tmp_path / "old.secret").write_bytes(SECRET)
    args += ["--jwt-secret-file", f"old={tmp_path / 'old.secret'}"]
    daemon = start(*args)
    signed = {
        "rsa": ("RS256", private["rsa"]),
        "ec": ("ES256", private["ec"]),
        "ed": ("EdDSA", private["ed"]),
        "old": ("HS256", SECRET),
    }
    for kid, (algorithm, signer) in signed.items():
        good = token(subscribe=["/**"], key=signer, algorithm=algorithm, kid=kid)
        with sync_connect(f"{daemon.url}/r", additional_headers=bearer(good)) as ws:
            ws.send(kid)
            assert ws.recv(timeout=10) == kid
    forged = token(subscribe=["/**"], key=private["ec"], algorithm="ES256", kid="rsa")
    assert refusal(f"{daemon.url}/r", additional_headers=bearer(forged))[0] == 401
    confused = token(subscribe=["/**"], key=SECRET, algorithm="HS256", kid="ec")
    assert refusal(f"{daemon.url}/r", additional_headers=bearer(confused))[0] == 401
    no_kid = token(subscribe=["/**"])  # several keys: a token must say which
    assert refusal(f"{daemon.url}/r", additional_headers=bearer(no_kid))[0] == 401


# --- Browsers: close codes they can read -------------------------------------------------


def test_close_mode_opens_then_closes_with_4401_and_4403(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file, "--auth-refusal", "close")
    ws = websocket.create_connection(
        f"{daemon.url}/room", subprotocols=["wsechod.auth", "bearer.nonsense"], timeout=10
    )  # websocket-client, a second library: the 101 selected the marker, as browsers need
    assert ws.getsubprotocol() == "wsechod.auth"
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert (int.from_bytes(data[:2], "big"), data[2:].decode()) == (
        4401,
        "unauthorized: invalid token",
    )
    ws.close()
    sock = rawws.connect(daemon.port, f"/private?token={token(subscribe=['/public'])}")
    assert rawws.read_close(sock) == (4403, "forbidden: no right to this channel")
    sock.close()


# --- Rights in the relay, across two instances -------------------------------------------


def test_read_only_and_restricted_publishers_across_two_instances(
    start: Callable[..., Daemon], secret_file: Path, redis_server: RedisServer
) -> None:
    common = ("--mode", "relay", "--broker", redis_server.url, "--log-level", "debug")
    one = guarded(start, secret_file, *common)
    two = guarded(start, secret_file, *common)
    reader = token("reader", subscribe=["/rooms/*"])
    writer = token("writer", subscribe=["/rooms/42"], publish=["/rooms/42"])
    status, body = refusal(f"{one.url}/rooms/7", additional_headers=bearer(writer))
    assert (status, body) == (403, "forbidden: no right to this channel\n")

    async def main() -> tuple[list[str], tuple[int, str]]:
        since = len(one.events), len(two.events)
        async with (
            connect(f"{one.url}/rooms/42", additional_headers=bearer(reader)) as listener,
            connect(f"{two.url}/rooms/42", additional_headers=bearer(writer)) as publisher,
            connect(f"{one.url}/rooms/42", additional_headers=bearer(reader)) as tries,
        ):
            await asyncio.to_thread(subscribed, one, "/rooms/42", since[0])
            await asyncio.to_thread(subscribed, two, "/rooms/42", since[1])
            for i in range(5):
                await publisher.send(f"m{i}")
            got = [str(await asyncio.wait_for(listener.recv(), 10)) for _ in range(5)]
            await tries.send("may I?")
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # it got m0-m4 too, then its close
                    await asyncio.wait_for(tries.recv(), 10)
            assert closed.value.rcvd is not None
            return got, (closed.value.rcvd.code, closed.value.rcvd.reason)

    got, close = asyncio.run(main())
    assert got == [f"m{i}" for i in range(5)]  # the read-only member receives...
    assert close == (1008, "read-only member: no right to publish on this channel")


def test_a_token_that_expires_while_connected_closes_it_on_time(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file, "--mode", "relay", "--jwt-leeway", "0")
    ttl = 3
    short = token(subscribe=["/**"], publish=["/**"], ttl=ttl)
    expires = int(time.time() + ttl)  # the token's exp, in whole seconds as jwt writes it

    async def main() -> tuple[int, str, float]:
        async with connect(f"{daemon.url}/room", additional_headers=bearer(short)) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), ttl + 10)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason, time.time()

    code, reason, at = asyncio.run(main())
    assert (code, reason) == (4401, "token expired")
    assert at >= expires - 1  # not before its exp (jwt's exp is in whole seconds)


def test_publish_rate_paces_a_fast_member_and_loses_nothing(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file, "--mode", "relay", "--publish-rate", "10")
    both = token(subscribe=["/r"], publish=["/r"])
    count = 40  # a burst of 10 at once, then 10 a second: at least 3 s

    async def main() -> tuple[list[str], float]:
        async with (
            connect(f"{daemon.url}/r", additional_headers=bearer(both)) as listener,
            connect(f"{daemon.url}/r", additional_headers=bearer(both)) as talker,
        ):
            began = time.monotonic()
            for i in range(count):
                await talker.send(str(i))
            got = [str(await asyncio.wait_for(listener.recv(), 20)) for _ in range(count)]
            return got, time.monotonic() - began

    got, took = asyncio.run(main())
    assert got == [str(i) for i in range(count)]
    assert took >= (count - 10) / 10 - 0.5  # paced: a lower bound, which load cannot break


# --- A flood of bad tokens ---------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


@pytest.mark.timeout(180)
def test_ten_thousand_bad_tokens_cost_bounded_cpu_and_log_lines(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file, "--handshake-rate", "20")
    pid = daemon.proc.pid
    lines_before, cpu_before = len(daemon.raw), _cpu_seconds(pid)
    request = rawws.handshake_request(daemon.port, "/room?token=" + "x" * 200).decode()
    forged = token(subscribe=["/**"], key=b"y" * 40)  # a real signature, the wrong key
    statuses: dict[int, int] = {}

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        body = request if i % 2 else request.replace("x" * 200, forged)
        writer.write(body.encode())
        line = await reader.readline()
        status = int(line.split()[1])
        statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    async def flood() -> float:
        began = time.monotonic()
        limit = asyncio.Semaphore(50)

        async def bounded(i: int) -> None:
            async with limit:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(10_000)))
        return time.monotonic() - began

    took = asyncio.run(flood())
    cpu = _cpu_seconds(pid) - cpu_before
    assert set(statuses) <= {401, 429}, statuses
    assert sum(statuses.values()) == 10_000
    checked = statuses.get(401, 0)  # the ones whose token was looked at
    assert checked <= 40 + 20 * (took + 1), (checked, took)  # a burst, then the rate
    assert cpu / 10_000 < 0.002, cpu  # well under the cost of checking each signature
    lines = len(daemon.raw) - lines_before
    assert lines <= 4 * (took + 2), lines  # rate-limited: a line per reason per second
    deadline = time.monotonic() + 10
    while True:  # the address is let in again once its bucket refills (20 a second)
        try:
            with sync_connect(
                f"{daemon.url}/room", additional_headers=bearer(token(subscribe=["/**"]))
            ):
                break
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_an_oversized_token_is_refused_before_it_is_checked(
    start: Callable[..., Daemon], secret_file: Path
) -> None:
    daemon = guarded(start, secret_file)
    status, body = refusal(f"{daemon.url}/r?token={'a' * 5000}")
    assert (status, body) == (400, "bad request: token longer than 4096 characters\n")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(
            rawws.handshake_request(daemon.port, "/r")[:-2]
            + b"Authorization: Bearer "
            + b"a" * 20_000
            + b"\r\n\r\n"
        )
        assert rawws.until_eof(sock).startswith(b"HTTP/1.1 431 ")


# --- Echo mode behind a token, and the settings ---------------------------------------


def test_echo_mode_needs_a_token_too(start: Callable[..., Daemon], secret_file: Path) -> None:
    daemon = guarded(start, secret_file)
    assert refusal(f"{daemon.url}/")[0] == 401
    assert http_get(daemon.port, "/healthz")[0] == 200  # operations are not behind it
    # Its subscribe patterns cover the path; a path that names no channel is covered by
    # none (found by a hostile run: a broken escape skipped the check in echo mode).
    narrow = bearer(token(subscribe=["/only/this"]))
    with sync_connect(f"{daemon.url}/only/this", additional_headers=narrow) as ws:
        ws.send("mine")
        assert ws.recv(timeout=10) == "mine"
    assert refusal(f"{daemon.url}/other", additional_headers=narrow)[0] == 403
    status, body = refusal(f"{daemon.url}/other%zz", additional_headers=narrow)
    assert (status, body.startswith("bad request: invalid path")) == (400, True)


def test_key_settings_are_checked_at_start_and_the_secret_never_shown(
    secret_file: Path, tmp_path: Path
) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"too short")
    result = run_cli("--auth", "jwt", "--jwt-secret-file", str(short), "--check-config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"invalid jwt_secret_file '{short}'" in result.stderr
    assert "at least 32" in result.stderr
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    result = run_cli("--auth", "jwt", "--jwt-public-key", f"k1={bad_pem}", "--check-config")
    assert result.returncode == 2
    assert result.stderr.startswith(f"wsechod: error: invalid jwt_public_key 'k1={bad_pem}'")
    assert "is not a PEM public key" in result.stderr
    assert result.stderr.count("\n") == 1
    result = run_cli("--auth", "jwt", "--check-config")
    assert result.returncode == 2
    assert "no key to check tokens with" in result.stderr
    env = {"WSECHOD_JWT_SECRET": SECRET.decode(), "WSECHOD_AUTH": "jwt"}
    result = run_cli("--check-config", env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    assert 'jwt_secret = "***"' in result.stdout
    assert SECRET.decode() not in result.stdout + result.stderr
    result = run_cli("--jwt-secret", "x" * 40)
    assert result.returncode == 2  # no such flag: a command line is visible to all
    assert (
        json.dumps(str(secret_file))
        in run_cli("--jwt-secret-file", str(secret_file), "--check-config").stdout
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("named", "kid", "verdict"),
    [
        (None, None, "alice"),
        (None, "other", "unknown key id 'other'"),
        ("one", None, "alice"),
        ("one", "one", "alice"),
        ("one", "two", "unknown key id 'two'"),
    ],
)
def test_with_one_key_a_kid_if_any_must_be_its_own(
    named: str | None, kid: str | None, verdict: str
) -> None:
    """One key is tried without reading the header first; the kid is checked after."""
    verifier = Verifier([keys.secret(named, SECRET, "test")])
    try:
        said = verifier.verify(token(subscribe=["/**"], kid=kid)).sub
    except Refused as refused:
        assert refused.reason == "invalid token"
        said = refused.detail
    assert said == verdict
