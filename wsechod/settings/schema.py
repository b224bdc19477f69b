"""Every key, declared once: its type, default, one-line help (``--help``), the note the
sample config and the reference page show, its section, its checks, and whether a reload
applies it. The TOML key ``foo_bar``, the flag ``--foo-bar`` and the variable
``WSECHOD_FOO_BAR`` all derive from the one name, so the sources can never drift apart."""

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wsechod import channels
from wsechod.http import origins
from wsechod.settings import values

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
UNIX_SOCKET_KEYS = ("unix_socket_mode", "unix_socket_owner")
T = TypeVar("T")


# Sections, in the order the sample config and the reference page show them.
LISTENING = "Listening"
LOGGING = "Logging"
LIMITS = "Limits (per connection unless said otherwise)"
ADMISSION = "Who may connect: TLS, origins, per-client limit, proxies"
AUTH = "Tokens and rights (auth)"
TIMEOUTS = "Timeouts (seconds; 0 disables the ones that say so)"
RELAY = "Relay mode"
PROCESS = "Process"
# Last: in TOML, the keys after a [[table]] belong to it.
CHANNELS = "Policies per channel (relay; tables come last in the file)"
SECTIONS = (LISTENING, LOGGING, LIMITS, ADMISSION, AUTH, TIMEOUTS, RELAY, PROCESS, CHANNELS)
AUTH_MODES = ("none", "jwt")
AUTH_REFUSALS = ("status", "close")


class SettingsError(Exception):
    """A setting is wrong; the message is one line that names the key and the value."""


def _opt(
    default: T,
    doc: str,
    *,
    section: str,
    note: str = "",
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
    secret: bool = False,
    table: Callable[[Any], Any] | None = None,
) -> T:
    """A key: ``doc``, one line for ``--help``; ``note``, what the sample config and the
    reference page say of it (paragraphs split by a newline; a key that shares the note of
    the one before it has none); ``section``, where they show it. ``path``: the value is a
    file path, made absolute (a daemon runs in /), except for the words listed, which have
    a meaning of their own. ``aliases``: other spellings of the ``choices``. A ``doc`` that
    starts with "relay:" marks a key that only relay mode reads (echo mode warns that it
    has no effect). ``check``: validates the value and returns it normalized (raises
    ValueError). ``restart``: a reload (SIGHUP) cannot change it; the others take effect
    for new connections. ``item``: the key is a list (``tuple[str, ...]``) and this checks
    and normalises each entry (ValueError). ``words``: names that stand for a value
    computed at load time (``workers = "auto"``). ``default_word``: the word the default
    is written as where it differs from machine to machine. ``secret``: never shown
    (masked wherever settings are printed or logged) and no command-line flag (a command
    line is visible to every user of the machine). ``table``: the key is an array of TOML
    tables (``[[channel]]``), set in the config file only; this turns them into values."""
    meta = {
        "restart": restart,
        "doc": doc,
        "section": section,
        "note": note,
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
        "secret": secret,
        "table": table,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration; immutable once loaded so no code path can disagree."""

    host: str = _opt(
        "127.0.0.1",
        "address to listen on; a name listens on all its addresses",
        restart=True,
        section=LISTENING,
        note=(
            "Address to listen on. A host name listens on every address it resolves to; "
            '"0.0.0.0" is every IPv4 interface, "::" every IPv6 one, "" both.'
        ),
    )
    port: int = _opt(
        8765,
        "TCP port to listen on; 0 picks a free one",
        minimum=0,
        maximum=65535,
        restart=True,
        section=LISTENING,
        note=('TCP port; 0 lets the kernel pick a free one (the "listening" log line says which).'),
    )
    listen: tuple[str, ...] = _opt(
        (),
        f"addresses to listen on instead of host and port: {values.LISTEN_FORMS}; each may be "
        f"followed by the roles it serves ({', '.join(values.ROLES)}; default: all)",
        check=values.check_listen,
        restart=True,
        section=LISTENING,
        note=(
            "Several listeners at once, instead of host and port (which are then ignored): "
            'TCP "host:port", "[::1]:port", ":port" (every interface), unix sockets '
            '"unix:/path" and abstract ones "unix:@name". Sockets systemd passes (socket '
            "activation) replace them all.\n"
            'For example: listen = ["127.0.0.1:8765", "[::1]:8765", '
            '"unix:/run/wsechod/ws.sock"]\n'
            "An entry may be followed by the roles its listener serves (default: all): "
            "public (WebSocket clients), ops (/healthz, /metrics), api (the HTTP API); "
            "others get 404.\n"
            'For example: listen = ["0.0.0.0:8765 public", "127.0.0.1:9100 ops"]'
        ),
    )
    unix_socket_mode: str = _opt(
        "0660",
        "file mode of the unix sockets in listen",
        check=values.check_mode,
        restart=True,
        section=LISTENING,
        note=(
            'Unix socket files are created with this mode and owner ("user[:group]"; "" is '
            "the user and group wsechod runs as, see user/group below), before anyone can "
            "connect. A socket file left by a crash is replaced; one something still "
            'accepts on is "address in use". The file is removed at exit. Abstract sockets '
            "have no file, mode or owner."
        ),
    )
    unix_socket_owner: str = _opt(
        "",
        "user[:group] owning the unix sockets in listen; '': the user and group it runs as",
        restart=True,
        section=LISTENING,
    )
    backlog: int = _opt(
        values.kernel_backlog(),
        "connections each listening socket (systemd's too) holds until they are accepted; "
        "max: the kernel's maximum (net.core.somaxconn), which caps any larger value",
        minimum=1,
        maximum=values.MAX_BACKLOG,
        words={"max": values.kernel_backlog},
        default_word="max",
        restart=True,
        section=LISTENING,
        note=(
            "Listen backlog: connections the kernel has accepted (TCP handshake done) and "
            "holds on each listening socket until wsechod takes them. When it is full, a "
            "new client's SYN is dropped and its connect waits for a retransmission (1 s, "
            'then 2 s, ...). "max": the kernel\'s maximum (net.core.somaxconn), which also '
            "caps any larger number. It applies to the sockets systemd passes too (wsechod "
            "listens on them again, and cannot read what their Backlog= was): keep the two "
            "the same. Needs a restart to change."
        ),
    )
    log_level: str = _opt(
        "info",
        "least severe level logged",
        choices=LOG_LEVELS,
        aliases=LOG_LEVEL_ALIASES,
        section=LOGGING,
        note=("debug | info | warning | error. At debug, every connection open/close is logged."),
    )
    log_format: str = _opt(
        "auto",
        "console for people, json for machines; auto: console on a TTY",
        choices=LOG_FORMATS,
        restart=True,
        section=LOGGING,
        note=(
            "auto | console | json. auto: coloured console lines on a terminal, JSON lines "
            "otherwise."
        ),
    )
    access_log: bool = _opt(
        False,
        "log one line (event access, at info) per closed WebSocket connection",
        section=LOGGING,
        note=(
            'One line per closed WebSocket connection (event "access", at info): peer, '
            "path, duration, messages and bytes in and out, close codes sent and received, "
            "who closed first. Clients decide how many lines that is: one per connection, "
            "by design."
        ),
    )
    max_size: int = _opt(
        2**20,
        "largest incoming message in bytes; a bigger one closes with 1009",
        minimum=1,
        maximum=2**30,
        section=LIMITS,
        note=(
            "Largest incoming message in bytes, whatever the number of fragments. A larger "
            "one closes the connection with 1009 (as soon as a frame header announces too "
            "much)."
        ),
    )
    write_limit: int = _opt(
        2**15,
        "outgoing bytes buffered per connection before reading from whoever feeds it pauses",
        minimum=1,
        maximum=2**30,
        section=LIMITS,
        note=(
            "Outgoing bytes buffered per connection before the server stops reading from "
            "whoever feeds it: the client itself in echo mode (echoes and pongs), the "
            "publishers in relay mode. Reading resumes below a quarter of it. Worst case "
            "memory per connection, whatever the client sends: about write_limit + max_size "
            "+ 256 KiB (one read)."
        ),
    )
    compression: str = _opt(
        "none",
        "permessage-deflate when the client offers it (costs CPU and memory)",
        choices=COMPRESSIONS,
        section=LIMITS,
        note=(
            "none | deflate. deflate negotiates permessage-deflate when the client offers "
            "it; it trades CPU and memory per connection for bandwidth. In relay mode the "
            "server compresses each message once for all its receivers (once per window "
            "size asked for) and negotiates server_no_context_takeover, so receivers need "
            "no window for what it sends."
        ),
    )
    inflate_rate: int = _opt(
        8 * 2**20,
        "with compression: bytes a second a client's messages may inflate to beyond 32 "
        "times their compressed size before reading it is paced; 0: no limit",
        minimum=0,
        section=LIMITS,
        note=(
            "With deflate: bytes a second that a client's messages may inflate to beyond 32 "
            'times their compressed size (a few KiB/s of "zip bombs" could otherwise keep '
            "a core busy). Over it, the server stops reading that client until it is back "
            "under (pacing, no close); ordinary data (text, JSON: 3 to 10 times) is never "
            "paced. One second's worth may come at once. 0 means no limit."
        ),
    )
    max_connections: int = _opt(
        10_000,
        "open WebSocket connections before new ones get HTTP 503; 0: no limit",
        minimum=0,
        section=LIMITS,
        note=(
            "Open WebSocket connections, for the whole server. Beyond it, new clients get "
            "HTTP 503. 0 means no limit (then the open-files limit, `ulimit -n`, is the "
            "limit)."
        ),
    )
    memory_limit: int = _opt(
        0,
        "bytes buffered for clients (frames still arriving, write buffers above "
        "write_limit) per serving process before reading pauses, then the heaviest "
        "connections close with 1013; 0 or auto: a quarter of the memory the process may "
        "use (its cgroup's limit, else the machine's), divided among the workers",
        minimum=0,
        words={"auto": lambda: 0},
        section=LIMITS,
        note=(
            "Bytes buffered for clients in one serving process: frames still arriving, and "
            "the write buffers of clients above write_limit. Over it, reading pauses on "
            "connections that hold part of a frame; if it persists a second, the heaviest "
            'are closed with 1013. 0 or "auto": a quarter of the memory the process may use '
            "(its cgroup's limit, else the machine's), divided among the workers."
        ),
    )
    tls_cert: str = _opt(
        "",
        "TLS certificate (PEM, chain after it): the port serves wss only; '': none",
        path=(),
        section=ADMISSION,
        note=(
            "TLS: with a certificate, the port serves wss:// (and https:// for /healthz) "
            "only. PEM files: the certificate followed by its chain, and the unencrypted "
            'key ("": the key is in the certificate\'s file). With tls_ca, clients must '
            "present a certificate signed by that CA (mutual TLS). SIGHUP reads the files "
            "again: renewed certificates apply to new connections, open ones are kept. The "
            "files must be readable by `user`."
        ),
    )
    tls_key: str = _opt(
        "",
        "TLS private key (PEM, unencrypted); '': in tls_cert's file",
        path=(),
        section=ADMISSION,
    )
    tls_ca: str = _opt(
        "",
        "with TLS: clients must present a certificate signed by this CA (PEM)",
        path=(),
        section=ADMISSION,
    )
    allowed_origins: tuple[str, ...] = _opt(
        (),
        "origins browsers may connect from (https://app.example.com, *.example.com, ...); "
        "others get HTTP 403; empty: any",
        item=origins.check,
        section=ADMISSION,
        note=(
            "Origins browsers may open WebSockets from; others get HTTP 403. Exact origins "
            '("https://app.example.com", "http://localhost:3000"), any subdomain '
            '("https://*.example.com"), any scheme when none is written ("*.example.com"). '
            "Empty: any origin. A handshake without Origin (non-browser clients) is "
            "accepted, unless require_origin is true."
        ),
    )
    subprotocols: tuple[str, ...] = _opt(
        (),
        "subprotocols the server may select, the first a client offers",
        section=ADMISSION,
        note=(
            "Subprotocols the server selects when a client offers them (the first it "
            "offers that is listed here); a client that offers none of them is served "
            "without one, unless require_subprotocol is true: then a client that offers "
            "subprotocols, none of them listed, is refused with 400 (one that offers none "
            "is served without one)."
        ),
    )
    require_subprotocol: bool = _opt(
        False,
        "refuse (400) a client whose offered subprotocols are all unlisted",
        section=ADMISSION,
    )
    require_origin: bool = _opt(
        False,
        "refuse (HTTP 403) handshakes without an Origin header",
        section=ADMISSION,
    )
    max_connections_per_ip: int = _opt(
        0,
        "open WebSocket connections per client address; beyond: HTTP 503; 0: no limit",
        minimum=0,
        section=ADMISSION,
        note=(
            "Open WebSocket connections from one client address; the next gets HTTP 503 "
            "with Retry-After. IPv6 clients are counted per network of ipv6_prefix_length "
            "bits (one subscriber usually has a whole /64). 0: no limit."
        ),
    )
    ipv6_prefix_length: int = _opt(
        64,
        "IPv6 clients are counted per network of this many bits",
        minimum=1,
        maximum=128,
        section=ADMISSION,
    )
    trusted_proxies: tuple[str, ...] = _opt(
        (),
        "proxies (addresses or networks, or 'unix' for peers on Unix sockets) whose "
        "X-Forwarded-For or PROXY protocol header names the client",
        item=values.network,
        section=ADMISSION,
        note=(
            'Reverse proxies (addresses or networks, e.g. ["10.0.0.0/8", "::1"], and "unix" '
            "for one on this host connecting over a Unix socket) trusted to say who the "
            "client is: with X-Forwarded-For (its right-most address not itself a proxy), "
            "or with a PROXY protocol header (v1 or v2, detected by its first bytes; not "
            "with TLS). From any other peer X-Forwarded-For is ignored and a PROXY header "
            "gets HTTP 400."
        ),
    )
    auth: str = _opt(
        "none",
        "none: anyone may connect; jwt: a signed token is required (jwt_* keys)",
        choices=AUTH_MODES,
        section=AUTH,
        note=(
            'none: anyone who can reach a public listener may connect. "jwt": every '
            "WebSocket client presents a signed token (JWT) that says who it is (sub), until "
            "when (exp, required) and which channels it may subscribe and publish to; see "
            "the Relay rights page. The token comes in an Authorization: Bearer header, a "
            "bearer.<token> entry of Sec-WebSocket-Protocol (browsers), or the token query "
            "parameter, in that order of preference. A connection closes when its token "
            "expires (4401)."
        ),
    )
    jwt_secret_file: tuple[str, ...] = _opt(
        (),
        "files holding HS256 secrets (at least 32 bytes), each KID=PATH or PATH",
        item=values.key_file,
        section=AUTH,
        note=(
            "Keys that may sign tokens: files each holding an HS256 secret of at least 32 "
            "bytes (jwt_secret_file), or a PEM public key (jwt_public_key: RSA of 2048 bits "
            "or more for RS256, EC P-256/384/521 for ES256/384/512, Ed25519 or Ed448 for "
            'EdDSA). Name a key "KID=PATH" to select it by the token header\'s kid, so that '
            "old and new keys work side by side while tokens are rotated; with one key, a "
            "token needs no kid. Each key checks tokens of its own algorithm only. SIGHUP "
            "reads the files again."
        ),
    )
    jwt_public_key: tuple[str, ...] = _opt(
        (),
        "PEM public keys (RS256, ES256/384/512, EdDSA), each KID=PATH or PATH",
        item=values.key_file,
        section=AUTH,
    )
    jwt_secret: str = _opt(
        "",
        "an HS256 secret (at least 32 bytes) from the environment or the file; never printed",
        secret=True,
        section=AUTH,
        note=(
            "An HS256 secret given as a value (WSECHOD_JWT_SECRET, for containers) rather "
            "than a file; it has no command-line flag and is never printed."
        ),
    )
    jwt_audience: str = _opt(
        "",
        "tokens must carry this aud; '': tokens must carry none",
        section=AUTH,
        note=(
            'When set, tokens must name this audience (aud) and this issuer (iss); "": '
            "not checked (a token that carries an aud is then refused: RFC 7519 4.1.3)."
        ),
    )
    jwt_issuer: str = _opt("", "tokens must carry this iss; '': not checked", section=AUTH)
    jwt_leeway: float = _opt(
        10.0,
        "seconds of clock difference allowed in exp, nbf and iat",
        minimum=0,
        maximum=600,
        section=AUTH,
        note="Clock difference allowed when exp, nbf and iat are checked.",
    )
    jwt_rights_claim: str = _opt(
        "wsechod",
        "the claim holding {subscribe: [...], publish: [...]} channel patterns",
        section=AUTH,
        note=(
            'The private claim that holds the rights: {"subscribe": [patterns], "publish": '
            "[patterns]}, channel patterns where * is one path segment and ** the rest "
            '("/rooms/*", "/users/alice/**"). A token without it has no rights.'
        ),
    )
    auth_refusal: str = _opt(
        "status",
        "status: refuse with HTTP 401/403; close: open, then close with 4401/4403",
        choices=AUTH_REFUSALS,
        section=AUTH,
        note=(
            '"status": a client without a valid token gets HTTP 401, one without the right '
            'to this channel 403, before the WebSocket opens. "close": the WebSocket opens '
            "and is closed at once with 4401 or 4403 and the reason, which a browser's "
            "script can read (it sees no HTTP status, only 1006)."
        ),
    )
    api_key_file: str = _opt(
        "",
        "relay: the HTTP API's keys, one 'NAME sha256:HEX' (or 'NAME KEY') per line",
        path=(),
        section=AUTH,
        note=(
            "relay: the keys of the HTTP API (POST /publish/<channel>, GET /channels), one "
            'per line: "NAME sha256:HEX", the SHA-256 of the key (printf %s KEY | '
            'sha256sum), or "NAME KEY". A backend sends its key as X-API-Key; a token with '
            "the publish right works too. SIGHUP reads the file again."
        ),
    )
    handshake_rate: float = _opt(
        20.0,
        "with auth: WebSocket handshakes per second per client address; beyond: 429; 0: any",
        minimum=0,
        section=AUTH,
        note=(
            "With auth: opening handshakes per second from one client address (a burst of "
            "twice as many is allowed); beyond, HTTP 429 with Retry-After, before any token "
            "is checked, so that a flood of bad tokens costs little. 0: no limit."
        ),
    )
    publish_rate: float = _opt(
        0.0,
        "relay: messages per second one member may publish; faster ones are paced; 0: any",
        minimum=0,
        section=AUTH,
        note=(
            "relay: messages per second one member may send (a burst of one second's worth "
            "is allowed); a faster member is paced (the server reads from it more slowly), "
            "nothing is dropped. 0: no limit."
        ),
    )
    open_timeout: float = _opt(
        10.0,
        "seconds a client has to complete the opening handshake; 0: no limit",
        minimum=0,
        section=TIMEOUTS,
        note=("Time a client has to complete the opening handshake. 0: no limit."),
    )
    ping_interval: float = _opt(
        20.0,
        "seconds between keepalive pings; 0: no pings",
        minimum=0,
        section=TIMEOUTS,
        note=(
            "Keepalive: a ping every ping_interval; no pong within ping_timeout closes with "
            "1011. Both deadlines are rounded up to a quarter of a second (a sixteenth of "
            "ping_interval if that is shorter), so that connections due together are "
            "pinged in one pass of the event loop. Each ping costs a system call each way: at "
            "20 s, 100,000 connections cost about a third of a core (see Many connections)."
        ),
    )
    ping_timeout: float = _opt(
        20.0,
        "seconds to wait for a pong before dropping the client; 0: wait forever",
        minimum=0,
        section=TIMEOUTS,
    )
    close_timeout: float = _opt(
        10.0,
        "seconds to wait for the client's closing handshake; 0: wait forever",
        minimum=0,
        section=TIMEOUTS,
        note=(
            "Time to wait for the client's reply to our close frame before cutting the TCP "
            "connection."
        ),
    )
    drain_timeout: float = _opt(
        10.0,
        "seconds the shutdown waits for connections to close before cutting them",
        minimum=0,
        section=TIMEOUTS,
        note=(
            "On SIGTERM/SIGINT: time open connections get to finish their closing handshake "
            "(1001) before the rest are cut and the process exits. A second signal cuts it "
            "short."
        ),
    )
    mode: str = _opt(
        "echo",
        "echo: messages come back; relay: they go to the path's others",
        choices=MODES,
        restart=True,
        section=RELAY,
        note=(
            "echo: every message comes back to its sender. relay: clients on the same URL "
            "path form a channel, and what one sends goes to the others."
        ),
    )
    controls: bool = _opt(
        False,
        "the test peer's controls in the query string (close=, delay=, drop=...)",
        restart=True,
        section=RELAY,
        note=(
            "Obey the test peer's controls in each upgrade request's query string "
            "(status=, accept_delay=, subprotocol=, delay=, fragment=, close=, drop=, "
            "violate=, no_close_reply=, ping=, no_pong=, send=, throttle=, headers=, "
            "compress=; see the Test peer page): a client's test suite can then make the "
            "server misbehave on purpose. Off by default: a public echo must not let "
            "strangers make it stall. In relay mode those that act on the connection "
            "(not delay=, fragment=, send=)."
        ),
    )
    console: bool = _opt(
        False,
        "serve a page at /console to try the server from a browser",
        section=LISTENING,
        note=(
            "Serve a self-contained page at /console (on listeners with the public role) "
            "to try the server from a browser: connect to any path with test peer "
            "controls, send text or binary, see every message and close, close with a "
            "code. Off: /console answers 404."
        ),
    )
    relay_echo: bool = _opt(
        False,
        "relay: also send each message back to its sender",
        section=RELAY,
        note=("relay: also send each message back to its sender."),
    )
    broker: str = _opt(
        "memory",
        "relay: 'memory' (this process only), or a Redis URL to share channels: "
        "redis://[user:password@]host[:port][/db], rediss://..., unix:///path[?db=N]",
        url=True,
        restart=True,
        section=RELAY,
        note=(
            'relay: "memory" relays within this process; "redis://host:6379/0" (or '
            "rediss://, unix:///path) shares channels with every wsechod using the same "
            "Redis."
        ),
    )
    redis_sentinels: tuple[str, ...] = _opt(
        (),
        "relay: Redis Sentinel addresses (host:port); the broker URL then gives the "
        "credentials and database, and the sentinels the primary",
        item=values.sentinel_address,
        restart=True,
        section=RELAY,
        note=(
            "relay with Redis Sentinel: the sentinels to ask for the primary of "
            "redis_sentinel_service (host:port each); the broker URL then gives the scheme, "
            "credentials and database, and its host is not used. On a failover the "
            "instance follows the new primary (see the History page for what is kept). "
            "redis_sentinel_password: the sentinels' own password, if they have one "
            "(WSECHOD_REDIS_SENTINEL_PASSWORD; never printed). redis_cluster = true: the "
            "broker URL names a node of a Redis Cluster (7.0 or later), and channels spread "
            "over its shards with sharded pub/sub."
        ),
    )
    redis_sentinel_service: str = _opt(
        "",
        "relay: the service name the sentinels monitor (their sentinel monitor line)",
        restart=True,
        section=RELAY,
    )
    redis_sentinel_password: str = _opt(
        "",
        "relay: the sentinels' password, from the environment or the file; never printed",
        secret=True,
        restart=True,
        section=RELAY,
    )
    redis_cluster: bool = _opt(
        False,
        "relay: the broker URL names a node of a Redis Cluster; sharded pub/sub",
        restart=True,
        section=RELAY,
    )
    presence_interval: float = _opt(
        10.0,
        "relay: seconds between writes of this instance's presence to Redis",
        minimum=0.1,
        maximum=3600,
        restart=True,
        section=RELAY,
        note=(
            "relay with Redis: how often each instance writes who is on its channels "
            "(GET /channels), and within a quarter second of a join or leave. An instance "
            "that dies disappears from presence within three times this; one that stops "
            "cleanly, at once."
        ),
    )
    max_channels: int = _opt(
        10_000,
        "relay: channels (paths) at once; beyond: HTTP 503",
        minimum=1,
        section=RELAY,
        note=(
            "relay: limits, each refused with an HTTP error before the WebSocket opens: "
            "channels at once (503), clients per channel (503), channel name length (414). "
            "A channel name may use only URL path characters (else 400)."
        ),
    )
    max_channel_members: int = _opt(
        1_000,
        "relay: clients on one channel; beyond: HTTP 503",
        minimum=1,
        section=RELAY,
    )
    max_path_length: int = _opt(
        256,
        "relay: longest channel name (path); longer: HTTP 414",
        minimum=1,
        maximum=8192,
        section=RELAY,
    )
    slow_consumer: str = _opt(
        "drop",
        "relay: a receiver that stops reading gets its messages dropped, or closed (1008)",
        choices=SLOW_CONSUMER_POLICIES,
        section=RELAY,
        note=(
            "relay: while a receiver has more than write_limit waiting, the channel's "
            "publishers wait. A receiver that stays so for slow_consumer_timeout seconds, "
            "or that alone holds its channel back more than a tenth of the time, is slow: "
            '"drop" skips what does not fit (counted) until it has caught up; "close" '
            "closes it with 1008. A slow reader holds neither memory nor its channel for "
            "long."
        ),
    )
    slow_consumer_timeout: float = _opt(
        2.0,
        "relay: seconds a receiver may stay above write_limit before it counts as slow",
        minimum=0,
        section=RELAY,
    )
    history_size: int = _opt(
        0,
        "relay: messages kept per channel, for clients that resume (wsechod.v1); 0: none",
        minimum=0,
        maximum=1_000_000,
        section=RELAY,
        note=(
            "relay: history. Each channel keeps its last history_size messages, each for "
            "history_ttl seconds; both 0 (the default): no history, and no cost. With "
            "history, messages are numbered (offsets, in an epoch), clients that negotiate "
            "the wsechod.v1 subprotocol get them in envelopes and may resume with "
            "?since=OFFSET&epoch=EPOCH (see the Recovery page). Settable per channel in "
            "[[channel]] tables."
        ),
    )
    history_ttl: float = _opt(
        0.0,
        "relay: seconds a message stays in its channel's history; 0: none",
        minimum=0,
        maximum=30 * 86400,
        section=RELAY,
    )
    history_memory: int = _opt(
        64 * 2**20,
        "relay, memory broker: bytes of history this process keeps in all; beyond, the "
        "least recently published channel's oldest messages go first",
        minimum=2**16,
        maximum=2**40,
        restart=True,
        section=RELAY,
        note=(
            "relay with the memory broker: the bytes of history the process keeps, every "
            "channel together (each message counts its payload and about 100 bytes); "
            "beyond, the oldest messages of the channel published to least recently go "
            "first. (With Redis, Redis keeps history: its maxmemory bounds it.)"
        ),
    )
    workers: int = _opt(
        1,
        "serving processes sharing the listeners, supervised by the main one; auto: one "
        "per CPU this process may use",
        minimum=1,
        maximum=MAX_WORKERS,
        words={"auto": lambda: len(os.sched_getaffinity(0))},
        restart=True,
        section=PROCESS,
        note=(
            "Serving processes: N workers share the listeners (each TCP listener is bound "
            "once per worker with SO_REUSEPORT, so the kernel spreads connections over "
            "them; unix sockets and systemd's sockets are shared), supervised by the main "
            'process, which restarts a worker that dies and forwards signals. "auto": one '
            "per CPU this process may use. /metrics and /healthz answer for the whole "
            "daemon (at most 1.5 s behind); limits such as max_connections apply per "
            "worker. Relay mode with several workers needs Redis (broker). Needs a restart "
            "to change."
        ),
    )
    daemon: bool = _opt(
        False,
        "detach from the terminal and run in the background",
        restart=True,
        section=PROCESS,
        note=(
            "Detach from the terminal (double fork, new session, cwd /, umask 022, stdio to "
            "/dev/null). The command returns only once the daemon listens and its pidfile "
            "is written; if the daemon fails to start, the command prints why and exits 1."
        ),
    )
    pidfile: str = _opt(
        "",
        "write the pid here, locked while running; '': none",
        path=(),
        restart=True,
        section=PROCESS,
        note=(
            "Write the pid here, locked (flock) for the life of the process and removed on "
            "a clean exit. A pidfile left by a crash is taken over with a warning; one held "
            'by a running wsechod makes the start fail with "already running (pid N)". "" '
            "means no pidfile."
        ),
    )
    log_file: str = _opt(
        "",
        "log to this file (reopened on SIGHUP) or 'syslog'; '': stderr, or syslog with daemon",
        path=("syslog",),
        restart=True,
        section=PROCESS,
        note=(
            "Log to this file instead of stderr (JSON unless log_format says otherwise); "
            'SIGHUP reopens it, for logrotate. "syslog" logs to syslog_socket. With daemon '
            "= true and no log_file, logs go to syslog: a daemon never logs to a terminal "
            "it has left."
        ),
    )
    syslog_socket: str = _opt(
        "/dev/log",
        "the syslog daemon's socket, for log_file = 'syslog'",
        path=(),
        restart=True,
        section=PROCESS,
    )
    user: str = _opt(
        "",
        "after binding, run as this user (start as root); '': stay",
        restart=True,
        section=PROCESS,
        note=(
            "When started as root: bind, create the pidfile's directory (owned by this "
            'user), then run as this user and group. "" keeps the current identity; group '
            "defaults to the user's primary group."
        ),
    )
    group: str = _opt(
        "",
        "after binding, run as this group; '': the user's group",
        restart=True,
        section=PROCESS,
    )
    channel: tuple[channels.Rule, ...] = _opt(
        (),
        "relay: per-channel policies ([[channel]] tables: pattern, relay_echo, "
        "slow_consumer, slow_consumer_timeout, max_channel_members, publish, history_size, "
        "history_ttl), in the config file only",
        table=channels.rules,
        section=CHANNELS,
        note=(
            "relay: policies for the channels a pattern matches, in [[channel]] tables (in "
            "the config file only): relay_echo, slow_consumer, slow_consumer_timeout, "
            "max_channel_members, history_size and history_ttl override the keys above; "
            'publish = "api" lets only the '
            "HTTP API publish (members are read-only, whatever their tokens say). The first "
            "table whose pattern matches a channel applies. A reload applies them to every "
            "channel, open ones included; publish to members that join from then on. "
            "For example:\n"
            "    [[channel]]\n"
            '    pattern = "/announcements/**"\n'
            '    publish = "api"\n'
            "    [[channel]]\n"
            '    pattern = "/rooms/*"\n'
            "    relay_echo = true\n"
            "    max_channel_members = 50\n"
            "    history_size = 100\n"
            "    history_ttl = 300.0"
        ),
    )


KEYS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)
KEY_NAMES = tuple(f.name for f in KEYS)
BY_NAME = {f.name: f for f in KEYS}
RELAY_KEYS = tuple(f.name for f in KEYS if str(f.metadata["doc"]).startswith("relay:"))
RESTART_KEYS = frozenset(f.name for f in KEYS if f.metadata["restart"])
TABLE_KEYS = tuple(f.name for f in KEYS if f.metadata["table"])  # [[channel]]: the file only
SECRET_KEYS = tuple(f.name for f in KEYS if f.metadata["secret"])


def changes(old: Settings, new: Settings) -> list[str]:
    """The keys whose value differs, in declaration order."""
    return [key for key in KEY_NAMES if getattr(old, key) != getattr(new, key)]


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


# Keys that no longer mean anything: accepted from every source (so that an existing file,
# unit or script still starts) with a notice saying why, instead of an "unknown key" stop.
RETIRED = {
    "max_queue": "the engine keeps no queue of incoming messages; memory per connection is "
    "bounded by write_limit and max_size",
}
