"""Settings: one frozen object built from defaults < TOML file < WSECHOD_* env < CLI flags.

Every key is declared once, on :class:`Settings`; the TOML key ``foo_bar``, the flag
``--foo-bar`` and the variable ``WSECHOD_FOO_BAR`` are all derived from that one name, so
the three sources can never drift apart. Everything that can be checked without touching
the network or the file system is checked here, so a bad value fails before anything binds
or detaches.
"""

import contextlib
import dataclasses
import difflib
import importlib
import ipaddress
import json
import math
import os
import re
import socket
import stat
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from wsechod import origins, tls

ENV_PREFIX = "WSECHOD_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
DEFAULT_CONFIG = Path("/etc/wsechod/wsechod.toml")

LOG_LEVELS = ("debug", "info", "warning", "error")
# Other spellings operators bring from syslog, Python and Go (any case): our nearest level.
# "critical" maps to error, the most severe level wsechod logs, rather than hide crashes.
LOG_LEVEL_ALIASES = {
    "warn": "warning",
    "err": "error",
    "crit": "error",
    "critical": "error",
    "fatal": "error",
}
LOG_FORMATS = ("auto", "console", "json")
COMPRESSIONS = ("none", "deflate")
MODES = ("echo", "relay")
SLOW_CONSUMER_POLICIES = ("drop", "close")
MAX_WORKERS = 1024
MAX_BACKLOG = 65535
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
BROKER_SCHEMES = ("redis", "rediss", "unix")

T = TypeVar("T")


class SettingsError(Exception):
    """A setting is wrong; the message is one line that names the key and the value."""


# --- Listening addresses (listen, unix_socket_mode) ---------------------------------------

LISTEN_FORMS = "host:port, [IPv6 address]:port, :port, unix:/path or unix:@name"
# What a listener serves: WebSocket clients (public), /healthz and /metrics (ops), the
# HTTP API of the relay (api). A listener without roles serves them all.
ROLES = ("public", "ops", "api")
ALL_ROLES = frozenset(ROLES)
ROLE_SERVES = {"public": "WebSocket clients", "ops": "/healthz and /metrics", "api": "the API"}
UNIX_PATH_MAX = 107  # bytes of sun_path, less the terminating NUL
UNIX_SOCKET_KEYS = ("unix_socket_mode", "unix_socket_owner")


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
    host, port = _host_port(where)
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


def _check_listen(entries: tuple[str, ...]) -> tuple[str, ...]:
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


def _check_mode(mode: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", mode.strip()):
        raise ValueError("expected an octal file mode such as 0660")
    return "0" + mode.strip()[-3:]


def _opt(
    default: T,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: Mapping[str, str] | None = None,
    path: tuple[str, ...] | None = None,
    url: bool = False,
    check: Callable[[Any], Any] | None = None,
    restart: bool = False,
    item: Callable[[str], str] | None = None,
    words: Mapping[str, Callable[[], Any]] | None = None,
    default_word: str | None = None,
) -> T:
    """``path``: the value is a file path, made absolute (a daemon runs in /), except for
    the words listed, which have a meaning of their own. ``aliases``: other spellings of
    the ``choices``. A ``doc`` that starts with "relay:" marks a key that only relay mode
    reads (echo mode warns that it has no effect). ``check``: validates the value and
    returns it normalized (raises ValueError). ``restart``: a reload (SIGHUP) cannot
    change it; the others take effect for new connections. ``item``: the key is a list
    (``tuple[str, ...]``) and this checks and normalises each entry (ValueError).
    ``words``: names that stand for a value computed at load time (``workers = "auto"``).
    ``default_word``: the word the default is written as where it differs from machine to
    machine (the sample config, the README, ``--help``)."""
    meta = {
        "restart": restart,
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases or {},
        "path": path,
        "url": url,
        "check": check,
        "item": item,
        "words": words or {},
        "default_word": default_word,
    }
    return field(default=default, metadata=meta)


def _network(entry: str) -> str:
    """An address or a network, as ``ipaddress`` writes it (host bits set are an error:
    most likely a typo for another network), or ``unix``: peers on Unix sockets."""
    if entry.strip().lower() == "unix":
        return "unix"
    try:
        network = ipaddress.ip_network(entry.strip())
    except ValueError as exc:
        raise ValueError(f"not an address or a network ({exc})") from None
    return str(network.network_address if network.num_addresses == 1 else network)


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration; immutable once loaded so no code path can disagree."""

    host: str = _opt(
        "127.0.0.1", "address to listen on; a name listens on all its addresses", restart=True
    )
    port: int = _opt(
        8765, "TCP port to listen on; 0 picks a free one", minimum=0, maximum=65535, restart=True
    )
    listen: tuple[str, ...] = _opt(
        (),
        f"addresses to listen on instead of host and port: {LISTEN_FORMS}; each may be "
        f"followed by the roles it serves ({', '.join(ROLES)}; default: all)",
        check=_check_listen,
        restart=True,
    )
    unix_socket_mode: str = _opt(
        "0660", "file mode of the unix sockets in listen", check=_check_mode, restart=True
    )
    unix_socket_owner: str = _opt(
        "",
        "user[:group] owning the unix sockets in listen; '': the user and group it runs as",
        restart=True,
    )
    backlog: int = _opt(
        kernel_backlog(),
        "connections each listening socket (systemd's too) holds until they are accepted; "
        "max: the kernel's maximum (net.core.somaxconn), which caps any larger value",
        minimum=1,
        maximum=MAX_BACKLOG,
        words={"max": kernel_backlog},
        default_word="max",
        restart=True,
    )
    log_level: str = _opt(
        "info", "least severe level logged", choices=LOG_LEVELS, aliases=LOG_LEVEL_ALIASES
    )
    log_format: str = _opt(
        "auto",
        "console for people, json for machines; auto: console on a TTY",
        choices=LOG_FORMATS,
        restart=True,
    )
    access_log: bool = _opt(
        False, "log one line (event access, at info) per closed WebSocket connection"
    )
    max_size: int = _opt(
        2**20,
        "largest incoming message in bytes; a bigger one closes with 1009",
        minimum=1,
        maximum=2**30,
    )
    write_limit: int = _opt(
        2**15,
        "outgoing bytes buffered per connection before reading from whoever feeds it pauses",
        minimum=1,
        maximum=2**30,
    )
    compression: str = _opt(
        "none",
        "permessage-deflate when the client offers it (costs CPU and memory)",
        choices=COMPRESSIONS,
    )
    max_connections: int = _opt(
        10_000,
        "open WebSocket connections before new ones get HTTP 503; 0: no limit",
        minimum=0,
    )
    memory_limit: int = _opt(
        0,
        "bytes buffered for clients (frames still arriving, write buffers above "
        "write_limit) per serving process before reading pauses, then the heaviest "
        "connections close with 1013; 0 or auto: a quarter of the memory the process may "
        "use (its cgroup's limit, else the machine's), divided among the workers",
        minimum=0,
        words={"auto": lambda: 0},
    )
    # --- who may connect, and how (TLS, origins, per-client limit, proxies) ---
    tls_cert: str = _opt(
        "", "TLS certificate (PEM, chain after it): the port serves wss only; '': none", path=()
    )
    tls_key: str = _opt("", "TLS private key (PEM, unencrypted); '': in tls_cert's file", path=())
    tls_ca: str = _opt(
        "", "with TLS: clients must present a certificate signed by this CA (PEM)", path=()
    )
    allowed_origins: tuple[str, ...] = _opt(
        (),
        "origins browsers may connect from (https://app.example.com, *.example.com, ...); "
        "others get HTTP 403; empty: any",
        item=origins.check,
    )
    require_origin: bool = _opt(False, "refuse (HTTP 403) handshakes without an Origin header")
    max_connections_per_ip: int = _opt(
        0, "open WebSocket connections per client address; beyond: HTTP 503; 0: no limit", minimum=0
    )
    ipv6_prefix_length: int = _opt(
        64, "IPv6 clients are counted per network of this many bits", minimum=1, maximum=128
    )
    trusted_proxies: tuple[str, ...] = _opt(
        (),
        "proxies (addresses or networks, or 'unix' for peers on Unix sockets) whose "
        "X-Forwarded-For or PROXY protocol header names the client",
        item=_network,
    )
    open_timeout: float = _opt(
        10.0, "seconds a client has to complete the opening handshake; 0: no limit", minimum=0
    )
    ping_interval: float = _opt(20.0, "seconds between keepalive pings; 0: no pings", minimum=0)
    ping_timeout: float = _opt(
        20.0, "seconds to wait for a pong before dropping the client; 0: wait forever", minimum=0
    )
    close_timeout: float = _opt(
        10.0, "seconds to wait for the client's closing handshake; 0: wait forever", minimum=0
    )
    drain_timeout: float = _opt(
        10.0,
        "seconds the shutdown waits for connections to close before cutting them",
        minimum=0,
    )
    mode: str = _opt(
        "echo",
        "echo: messages come back; relay: they go to the path's others",
        choices=MODES,
        restart=True,
    )
    relay_echo: bool = _opt(False, "relay: also send each message back to its sender")
    broker: str = _opt(
        "memory",
        "relay: 'memory' (this process only), or a Redis URL to share channels: "
        "redis://[user:password@]host[:port][/db], rediss://..., unix:///path[?db=N]",
        url=True,
        restart=True,
    )
    max_channels: int = _opt(10_000, "relay: channels (paths) at once; beyond: HTTP 503", minimum=1)
    max_channel_members: int = _opt(
        1_000, "relay: clients on one channel; beyond: HTTP 503", minimum=1
    )
    max_path_length: int = _opt(
        256, "relay: longest channel name (path); longer: HTTP 414", minimum=1, maximum=8192
    )
    slow_consumer: str = _opt(
        "drop",
        "relay: a receiver that stops reading gets its messages dropped, or closed (1008)",
        choices=SLOW_CONSUMER_POLICIES,
    )
    slow_consumer_timeout: float = _opt(
        2.0,
        "relay: seconds a receiver may stay above write_limit before it counts as slow",
        minimum=0,
    )
    # --- processes ---
    workers: int = _opt(
        1,
        "serving processes sharing the listeners, supervised by the main one; auto: one "
        "per CPU this process may use",
        minimum=1,
        maximum=MAX_WORKERS,
        words={"auto": lambda: len(os.sched_getaffinity(0))},
        restart=True,
    )
    daemon: bool = _opt(False, "detach from the terminal and run in the background", restart=True)
    pidfile: str = _opt(
        "", "write the pid here, locked while running; '': none", path=(), restart=True
    )
    log_file: str = _opt(
        "",
        "log to this file (reopened on SIGHUP) or 'syslog'; '': stderr, or syslog with daemon",
        path=("syslog",),
        restart=True,
    )
    syslog_socket: str = _opt(
        "/dev/log", "the syslog daemon's socket, for log_file = 'syslog'", path=(), restart=True
    )
    user: str = _opt("", "after binding, run as this user (start as root); '': stay", restart=True)
    group: str = _opt("", "after binding, run as this group; '': the user's group", restart=True)


KEYS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)
KEY_NAMES = tuple(f.name for f in KEYS)
_BY_NAME = {f.name: f for f in KEYS}
RELAY_KEYS = tuple(f.name for f in KEYS if str(f.metadata["doc"]).startswith("relay:"))
RESTART_KEYS = frozenset(f.name for f in KEYS if f.metadata["restart"])


def changes(old: Settings, new: Settings) -> list[str]:
    """The keys whose value differs, in declaration order."""
    return [key for key in KEY_NAMES if getattr(old, key) != getattr(new, key)]


# Kubernetes gives every pod variables for each Service of its namespace ("service links");
# a Service named wsechod (or wsechod-something) makes them start with WSECHOD_. They are
# not settings, and must not stop a pod from starting.
_SERVICE_LINK = re.compile(
    r"(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S*", re.IGNORECASE)


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


@dataclass(frozen=True, slots=True)
class Notice:
    """A warning about settings that are accepted but not what the operator may think:
    ``--check-config`` prints ``message``, a start logs ``event`` with ``fields``."""

    message: str
    event: str
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings plus where each value came from, for ``--check-config`` and error messages."""

    settings: Settings
    sources: Mapping[str, str]
    config_path: Path | None
    notices: tuple[Notice, ...] = ()


def load(
    cli: Mapping[str, str],
    environ: Mapping[str, str],
    config: str | None,
    *,
    given: Mapping[str, Any] | None = None,
    given_by: str = "",
    reloading: bool = False,
) -> Loaded:
    """Merge the sources; ``cli`` holds only the flags that were given, as strings.
    ``given``: values from a program (keyword arguments of ``given_by``, which names them
    in errors), typed and checked like the TOML file's; they win over every other source.
    ``reloading``: read again for a reload, on a running server: a config file that is not
    a regular file (a pipe, which would hold the server until someone writes to it) is
    refused; at start one may be read (``--config <(...)``).
    """
    config_path = _config_path(config, environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in KEY_NAMES}
    retired: dict[str, str] = {}

    if config_path is not None:
        where = str(config_path)
        for key, raw in _read_toml(config_path, regular_only=reloading).items():
            if key in RETIRED:
                retired[key] = where
                continue
            _check_known(key, f"in {where}")
            values[key] = _convert(key, raw, where, text=False)  # TOML values are typed
            sources[key] = _source(key, raw, where)

    ignored: list[str] = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if _is_service_link(var, raw):
            ignored.append(var)
            continue
        if key in RETIRED:
            retired[key] = var
            continue
        _check_known(key, f"from environment variable {var}")
        values[key] = _convert(key, raw, var, text=True)
        sources[key] = _source(key, raw, var)

    for key, raw in cli.items():
        if key in RETIRED:
            retired[key] = flag_name(key)
            continue
        values[key] = _convert(key, raw, flag_name(key), text=True)
        sources[key] = _source(key, raw, flag_name(key))

    for key, raw in (given or {}).items():
        if key in RETIRED:
            retired[key] = given_by
            continue
        _check_known(key, f"passed to {given_by}")
        typed = list(raw) if isinstance(raw, tuple) else raw  # a Python list may be a tuple
        values[key] = _convert(key, typed, given_by, text=False, program=True)
        sources[key] = given_by

    settings = Settings(**values)
    _check_workers(settings, sources)
    _check_broker_package(settings, sources)
    _check_tls(settings, sources)
    notices = [
        *_service_link_notice(ignored),
        *_retired_notice(retired),
        *_echo_mode_notice(settings),
        *_listen_notice(settings, sources),
    ]
    return Loaded(settings, sources, config_path, tuple(notices))


# Keys that no longer mean anything: accepted from every source (so that an existing file,
# unit or script still starts) with a notice saying why, instead of an "unknown key" stop.
RETIRED = {
    "max_queue": "the engine keeps no queue of incoming messages; memory per connection is "
    "bounded by write_limit and max_size",
}


def _retired_notice(seen: dict[str, str]) -> list[Notice]:
    return [
        Notice(
            f"{key} (from {where}) has no effect any more: {RETIRED[key]}",
            "setting has no effect any more",
            {"key": key, "source": where},
        )
        for key, where in seen.items()
    ]


def _is_service_link(var: str, raw: str) -> bool:
    """A Kubernetes service-link variable rather than one of ours (or a typo of ours)."""
    name = var[len(ENV_PREFIX) :]
    if name.lower() in _BY_NAME:
        # WSECHOD_PORT is both our port and a Service's address (tcp://10.0.0.7:8765).
        return name == "PORT" and _SERVICE_LINK_URL.fullmatch(raw.strip()) is not None
    if _SERVICE_LINK.fullmatch(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(raw.strip()) is not None


def _service_link_notice(ignored: list[str]) -> list[Notice]:
    if not ignored:
        return []
    names = ", ".join(ignored)
    return [
        Notice(
            f"ignored environment variables that Kubernetes sets for a Service: {names}",
            "kubernetes service variables ignored",
            {"variables": ignored},
        )
    ]


def _echo_mode_notice(settings: Settings) -> list[Notice]:
    if settings.mode != "echo":
        return []
    unused = [k for k in RELAY_KEYS if getattr(settings, k) != _BY_NAME[k].default]
    if not unused:
        return []
    return [
        Notice(
            f"relay settings have no effect in echo mode: {', '.join(unused)}",
            "settings have no effect in echo mode",
            {"keys": unused},
        )
    ]


def _listen_notice(settings: Settings, sources: Mapping[str, str]) -> list[Notice]:
    """``listen`` replaces host and port, and the unix socket keys apply to its unix
    socket files: setting those to no effect is most likely an oversight."""
    reasons: dict[str, str] = {}
    if settings.listen:
        reasons |= {k: "listen replaces host and port" for k in ("host", "port")}
    if not any(entry.startswith("unix:/") for entry in settings.listen):
        reasons |= {k: "no unix socket file in listen" for k in UNIX_SOCKET_KEYS}
    unused = {k: why for k, why in reasons.items() if sources[k] != "default"}
    notices = []
    if unused:
        notices.append(
            Notice(
                "settings have no effect: "
                + ", ".join(f"{k} ({why})" for k, why in unused.items()),
                "settings have no effect",
                {"keys": list(unused), "listen": list(settings.listen)},
            )
        )
    served = set().union(*(listen_address(e).roles for e in settings.listen or (":0",)))
    notices += [
        Notice(
            f"no listener has the role {role}: {ROLE_SERVES[role]} are served nowhere",
            "role served nowhere",
            {"role": role, "listen": list(settings.listen)},
        )
        for role in ("public", "ops")
        if role not in served
    ]
    return notices


def _check_tls(settings: Settings, sources: Mapping[str, str]) -> None:
    """The files are read into a context now, so a missing, unreadable or mismatched one
    stops the start (or a reload) with a line that names it."""
    for key in ("tls_key", "tls_ca"):
        if getattr(settings, key) and not settings.tls_cert:
            raise SettingsError(
                f"invalid {key} {getattr(settings, key)!r} (from {sources[key]}): "
                "needs tls_cert too"
            )
    if not settings.tls_cert:
        return
    try:
        tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except tls.TlsError as exc:
        raise SettingsError(
            f"invalid {exc.key} {exc.path!r} (from {sources[exc.key]}): {exc.reason}"
        ) from None


def _word(key: str, raw: Any) -> str | None:
    """The word ``raw`` is, if it is one of the key's ``words``."""
    words = _BY_NAME[key].metadata["words"]
    word = raw.strip().lower() if isinstance(raw, str) else None
    return word if word in words else None


def _source(key: str, raw: Any, where: str) -> str:
    """Where a value came from; a word says what it was: ``--workers (auto)``."""
    word = _word(key, raw)
    return where if word is None else f"{where} ({word})"


def _check_workers(settings: Settings, sources: Mapping[str, str]) -> None:
    """The memory broker relays within one process: with several, members of one channel
    on different workers would never hear each other."""
    if settings.workers > 1 and settings.mode == "relay" and settings.broker == "memory":
        raise SettingsError(
            f"invalid workers {settings.workers} (from {sources['workers']}): relay mode with "
            "several workers needs a broker they share (broker = redis://...); the memory "
            "broker relays within one process"
        )


def _check_broker_package(settings: Settings, sources: Mapping[str, str]) -> None:
    """The Redis broker needs redis-py, an optional extra: say so before anything starts."""
    if settings.mode != "relay" or settings.broker == "memory":
        return
    try:
        importlib.import_module("redis")
    except ImportError:
        raise SettingsError(
            f"invalid broker {redact_url(settings.broker)!r} (from {sources['broker']}): "
            "the Redis broker needs the redis package: pip install 'wsechod[redis]'"
        ) from None


def _config_path(config: str | None, environ: Mapping[str, str]) -> Path | None:
    if config is None:
        config = environ.get(CONFIG_ENV)
    if config is None:
        return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    if config == "":
        return None  # an explicit "no config file", e.g. in tests and units
    return Path(config)


def _read_toml(path: Path, *, regular_only: bool = False) -> dict[str, Any]:
    try:
        if regular_only and not stat.S_ISREG(path.stat().st_mode):
            raise SettingsError(
                f"cannot read config file {path} on a reload: not a regular file "
                "(a pipe would hold the server until something writes to it)"
            )
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"invalid TOML in {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"invalid TOML in {path}: not UTF-8 at byte {exc.start}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None


def _check_known(key: str, where: str) -> None:
    if key in _BY_NAME:
        return
    close = difflib.get_close_matches(key, KEY_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SettingsError(f"unknown key {key!r} {where}{hint}")


def _convert(key: str, raw: Any, source: str, *, text: bool, program: bool = False) -> Any:
    """Turn a TOML value (``text`` False: it must have the key's type already) or an
    env/CLI string (``text`` True: parsed) into the key's type, then check its range.
    ``program``: the value came from a Python program, whose author wants Python advice."""
    f = _BY_NAME[key]
    kind = typing.get_origin(f.type) or f.type  # tuple[str, ...]: a list of strings
    assert isinstance(kind, type)
    words = f.metadata["words"]
    word = _word(key, raw)
    try:
        try:
            if word is not None:
                value = words[word]()
            else:
                value = _typed(kind, raw) if text else _native(kind, raw, key if program else "")
        except ValueError as exc:  # not of the key's type: say which words it also takes
            also = f" (or {', '.join(words)})" if words else ""
            raise ValueError(f"{exc}{also}") from None
        return _checked(f.metadata, value)
    except ValueError as exc:
        shown = redact_url(raw) if f.metadata["url"] and isinstance(raw, str) else raw
        raise SettingsError(f"invalid {key} {shown!r} (from {source}): {exc}") from None


_INT = r"[+-]?[0-9]+"
_FLOAT = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"


def _typed(kind: type, raw: Any) -> Any:
    """A string from a flag or an environment variable, parsed as the key's type. Lists are
    comma-separated (a repeated flag arrives joined by commas)."""
    if kind is tuple:
        return tuple(e.strip() for e in raw.split(",") if e.strip())
    if kind is bool:
        value = _boolean(raw)
        if value is None:
            raise ValueError("expected true or false")
        return value
    raw = raw.strip()
    if kind is str:
        return raw
    # Plain ASCII numbers only: Python would also take "8_0" and other scripts' digits.
    if not re.fullmatch(_INT if kind is int else _FLOAT, raw):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}")
    return kind(raw)


def _native(kind: type, raw: Any, python: str = "") -> Any:
    """A TOML value, which has a type of its own: port = "8080" is a string, not a port
    (a quoted number or a "yes" is most likely a mistake that would hide another). With
    ``python`` (the key), a value from a program: the same rule, said in Python's terms."""
    if kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if kind is tuple:  # a list of strings: a TOML array
        if isinstance(raw, list) and all(isinstance(e, str) for e in raw):
            return tuple(raw)
        if python:
            hint = f" (in Python: {python}=[{raw!r}])" if isinstance(raw, str) else ""
            raise ValueError(f"expected a list of strings{hint}")
        hint = f" (TOML: write [{json.dumps(raw)}])" if isinstance(raw, str) else ""
        raise ValueError(f"expected an array of strings{hint}")
    if isinstance(raw, kind) and (kind is bool or not isinstance(raw, bool)):
        return raw
    hint = ""
    if isinstance(raw, str) and kind is not str:
        with contextlib.suppress(ValueError):
            value = _typed(kind, raw)
            if python:
                hint = f" (in Python: {python}={value!r}, without quotes)"
            else:
                hint = f" (TOML: write {json.dumps(value)} without quotes)"
    raise ValueError(f"expected {kind.__name__}, got {type(raw).__name__}{hint}")


def _checked(meta: Mapping[str, Any], value: Any) -> Any:
    if meta["item"] is not None:
        checked = []
        for entry in value:
            try:
                checked.append(meta["item"](entry))
            except ValueError as exc:
                raise ValueError(f"entry {entry!r}: {exc}") from None
        value = tuple(checked)
    if meta.get("url"):
        _check_broker_url(value)
    if meta["check"] is not None:
        value = meta["check"](value)
    if isinstance(value, tuple):
        return value
    if meta["path"] is not None and value and value not in meta["path"]:
        value = os.path.abspath(os.path.expanduser(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if meta["choices"] is not None:
        value = value.strip().lower()
        value = meta["aliases"].get(value, value)
        if value not in meta["choices"]:
            raise ValueError("must be one of " + ", ".join(meta["choices"]))
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"must be between {lo} and {hi}")
    if lo is not None and value < lo:
        raise ValueError(f"must be at least {lo}")
    return value


BROKER_FORMS = "memory, redis://[user:password@]host[:port][/db], rediss://..., unix:///path[?db=N]"


def _check_broker_url(value: str) -> None:
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
        _check_database(query.get("db", [""])[0] if query else None)
        return
    if parts.query:
        raise ValueError("no query parameters here: the database goes in the path (/0)")
    host, port = _host_port(hostport)
    if not host:
        raise ValueError("no host: expected redis://host[:port][/db]")
    if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} must be a number between 1 and 65535")
    _check_database(parts.path[1:] if parts.path not in ("", "/") else None)


def _host_port(hostport: str) -> tuple[str, str | None]:
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


def _check_database(db: str | None) -> None:
    if db is not None and not re.fullmatch(r"[0-9]{1,9}", db):
        raise ValueError(f"database {db!r} must be a number")


def _boolean(raw: Any) -> bool | None:
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


def describe(key: str) -> str:
    """One-line help for a key, shared by ``--help`` and the sample config."""
    return str(_BY_NAME[key].metadata["doc"])


def choices(key: str) -> tuple[tuple[str, ...], Mapping[str, str]] | None:
    """The values a choice key takes and its other accepted spellings, for ``--help``."""
    meta = _BY_NAME[key].metadata
    return None if meta["choices"] is None else (meta["choices"], meta["aliases"])


def default_text(key: str) -> Any:
    """A key's default as the sample config, the README and ``--help`` write it: the word
    for a default that each machine computes (``backlog = "max"``), else the value."""
    f = _BY_NAME[key]
    return f.metadata["default_word"] or f.default


def shown(key: str, value: Any) -> Any:
    """A value as it may be shown to people: with credentials masked."""
    return redact_url(value) if _BY_NAME[key].metadata["url"] else value


def render(loaded: Loaded) -> str:
    """The effective settings as TOML, each line saying where its value came from."""
    lines = [f"# config file: {loaded.config_path or 'none'}"]
    for key in KEY_NAMES:
        text = json.dumps(shown(key, getattr(loaded.settings, key)))
        lines.append(f"{key} = {text}  # {loaded.sources[key]}")
    return "\n".join(lines)
