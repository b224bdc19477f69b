"""The syntax of single values: listen entries and their roles, networks, file modes,
broker URLs, booleans; each parser raises ValueError saying what is wrong (the schema
names the key and the source around it). Nothing here knows of the other keys."""

import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

MAX_BACKLOG = 65535
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
BROKER_SCHEMES = ("redis", "rediss", "unix")

# --- Listening addresses (listen, unix_socket_mode) ---------------------------------------

LISTEN_FORMS = "host:port, [IPv6 address]:port, :port, unix:/path or unix:@name"
# What a listener serves: WebSocket clients (public), /healthz and /metrics (ops), the
# HTTP API of the relay (api). A listener without roles serves them all.
ROLES = ("public", "ops", "api")
ALL_ROLES = frozenset(ROLES)
ROLE_SERVES = {"public": "WebSocket clients", "ops": "/healthz and /metrics", "api": "the API"}
UNIX_PATH_MAX = 107  # bytes of sun_path, less the terminating NUL


class ListenAddress(NamedTuple):
    """One ``listen`` entry: a TCP ``host`` (a name, an address, or "" for every
    interface) and ``port``, or a unix socket ``path`` ("@name": an abstract socket), and
    the ``roles`` it serves."""

    host: str = ""
    port: int = 0
    path: str = ""
    roles: frozenset[str] = ALL_ROLES


def listen_address(entry: str) -> ListenAddress:
    """Parse one ``listen`` entry, ``ADDRESS [ROLE ...]``; raises ValueError saying what
    is wrong with it."""
    where, *words = entry.split()  # a unix socket path with a space cannot be listed
    roles = listener_roles(words) if words else ALL_ROLES
    if where.startswith("unix:"):
        path = where[len("unix:") :]
        if path in ("", "@"):
            raise ValueError("expected unix:/path/to/socket or unix:@name")
        size = len(os.fsencode(path))  # an abstract name's "@" stands for its leading NUL
        if size > UNIX_PATH_MAX:
            raise ValueError(f"a unix socket address is at most {UNIX_PATH_MAX} bytes")
        return ListenAddress(path=path, roles=roles)
    if where.count(":") > 1 and not where.startswith("["):
        raise ValueError("an IPv6 address goes in brackets: [::1]:8765")
    host, port = host_port(where)
    if port is None:
        raise ValueError(f"expected {LISTEN_FORMS}, then its roles if not all")
    if not (re.fullmatch(r"[0-9]{1,5}", port) and int(port) <= 65535):
        raise ValueError(f"port {port!r} must be a number between 0 and 65535")
    return ListenAddress(host, int(port), roles=roles)


def listener_roles(words: Sequence[str]) -> frozenset[str]:
    """The roles a listener is given (ValueError for a word that is none)."""
    for word in words:
        if word not in ROLES:
            raise ValueError(f"unknown role {word!r}: a listener's roles are {', '.join(ROLES)}")
    return frozenset(words)


def roles_of_name(name: str) -> frozenset[str] | None:
    """The roles in a name systemd gives a socket (``FileDescriptorName=ops``, or
    ``public+ops``), or None if the name is not made of roles (the default ``stdin``, a
    unit's own name): such a socket serves every role."""
    words = name.split("+")
    return frozenset(words) if all(word in ROLES for word in words) else None


def describe_roles(roles: frozenset[str]) -> str:
    """How ``listen`` writes them: nothing for all roles."""
    return "" if roles == ALL_ROLES else " " + " ".join(r for r in ROLES if r in roles)


def check_listen(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Each entry valid, no address twice; unix paths made absolute (a daemon runs in /)."""
    normalized: list[str] = []
    seen: set[tuple[str, int, str]] = set()
    for given in entries:
        entry = " ".join(given.split())
        try:
            address = listen_address(entry)
            if address.path and not address.path.startswith("@"):
                path = os.path.abspath(os.path.expanduser(address.path))
                entry = "unix:" + path + describe_roles(address.roles)
                address = listen_address(entry)  # still short enough
        except ValueError as exc:  # in a list, say which entry
            raise ValueError(f"{entry!r}: {exc}" if len(entries) > 1 else str(exc)) from None
        if address[:3] in seen:
            raise ValueError(f"{entry.split()[0]!r} is listed twice")
        if address.port or address.path:  # port 0 picks a free port each time
            seen.add(address[:3])
        normalized.append(entry)
    return tuple(normalized)


def kernel_backlog() -> int:
    """The kernel's maximum listen backlog (net.core.somaxconn: listen() caps what it is
    asked for to it); the C library's SOMAXCONN where /proc/sys is hidden (systemd's
    ProcSubset=pid), which is the kernel's own default."""
    try:
        value = int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        value = socket.SOMAXCONN
    return max(1, min(value, MAX_BACKLOG))


def check_mode(mode: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", mode.strip()):
        raise ValueError("expected an octal file mode such as 0660")
    return "0" + mode.strip()[-3:]


def network(entry: str) -> str:
    """An address or a network, as ``ipaddress`` writes it (host bits set are an error:
    most likely a typo for another network), or ``unix``: peers on Unix sockets."""
    if entry.strip().lower() == "unix":
        return "unix"
    try:
        network = ipaddress.ip_network(entry.strip())
    except ValueError as exc:
        raise ValueError(f"not an address or a network ({exc})") from None
    return str(network.network_address if network.num_addresses == 1 else network)


BROKER_FORMS = "memory, redis://[user:password@]host[:port][/db], rediss://..., unix:///path[?db=N]"


def check_broker_url(value: str) -> None:
    """What redis-py would reject only when relay mode connects, or would read otherwise
    than meant (redis://host/notadb used to mean database 0), fails here."""
    if value == "memory":
        return
    scheme, sep, _ = value.partition("://")
    if not sep or scheme.lower() not in BROKER_SCHEMES:
        raise ValueError(f"expected {BROKER_FORMS}")
    parts = urllib.parse.urlsplit(value)
    if parts.fragment:
        raise ValueError("a broker URL has no #fragment")
    hostport = parts.netloc.rpartition("@")[2]
    if scheme.lower() == "unix":
        if hostport or parts.path in ("", "/"):
            raise ValueError("expected unix:///path/to/socket (three slashes, then the path)")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"} or len(query.get("db", [])) > 1:
            raise ValueError("the only query parameter is ?db=N")
        check_database(query.get("db", [""])[0] if query else None)
        return
    if parts.query:
        raise ValueError("no query parameters here: the database goes in the path (/0)")
    host, port = host_port(hostport)
    if not host:
        raise ValueError("no host: expected redis://host[:port][/db]")
    if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} must be a number between 1 and 65535")
    check_database(parts.path[1:] if parts.path not in ("", "/") else None)


def host_port(hostport: str) -> tuple[str, str | None]:
    """``host[:port]`` or ``[v6 address][:port]``, as the URL wrote them."""
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6 address] or [IPv6 address]:port")
        return host, rest[1:] if rest else None
    if hostport.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets: redis://[::1]:6379/0")
    host, colon, port = hostport.partition(":")
    return host, port if colon else None


def sentinel_address(entry: str) -> str:
    """A sentinel's ``host:port`` (``[v6]:port``): the port is not optional (sentinels
    usually listen on 26379, not Redis's 6379)."""
    host, port = host_port(entry.strip())
    if not host:
        raise ValueError(f"{entry!r}: expected host:port")
    if port is None or not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"{entry!r}: expected host:port, the port between 1 and 65535")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_database(db: str | None) -> None:
    if db is not None and not re.fullmatch(r"[0-9]{1,9}", db):
        raise ValueError(f"database {db!r} must be a number")


def boolean(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    return None


def redact_url(url: str) -> str:
    """``url`` with its password (and a user name standing alone) replaced by ``***``,
    for logs, errors and ``--check-config``: a Redis password must never reach a log.
    Works on malformed URLs too (an invalid one is shown in the error about it)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    user = user if colon else ""  # alone, redis-py takes the "user" as the password
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


# --- Keys and secrets (jwt_secret_file, jwt_public_key) ----------------------------------


def key_file(entry: str) -> str:
    """``PATH`` or ``KID=PATH``: a key file, its path made absolute (a daemon runs in /)."""
    entry = entry.strip()
    kid, sep, path = entry.partition("=")
    if not (sep and kid and "/" not in kid):
        kid, path = "", entry
    if not path:
        raise ValueError("no file named")
    path = os.path.abspath(os.path.expanduser(path))
    return f"{kid}={path}" if kid else path
