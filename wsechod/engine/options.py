"""The engine's limits and deadlines: what a connection keeps from the moment it opened
(a reload changes them for new connections only)."""

import socket
import ssl
from dataclasses import dataclass

from wsechod.engine.proxy import Network


@dataclass(frozen=True, slots=True)
class Options:
    """Limits and deadlines of the engine; 0 disables a timeout (and max_connections)."""

    max_size: int = 2**20
    write_limit: int = 2**15
    open_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 10.0
    compression: bool = False
    # Whether what the server compresses may refer to earlier messages; False negotiates
    # server_no_context_takeover (RFC 7692 7.1.1.1): the relay compresses a message once
    # for all its receivers, so the client need not keep a window for it.
    compression_context: bool = True
    inflate_rate: int = 8 * 2**20  # per connection; 0: no limit (deflate.py: Budget)
    tls: ssl.SSLContext | None = None  # every connection starts with a TLS handshake
    trusted_proxies: tuple[Network, ...] = ()  # may say who the client is (proxy.py)
    trust_unix: bool = False  # so may whoever connects over a Unix socket
    ipv6_prefix_length: int = 64  # IPv6 clients are counted per network this size
    max_connections_per_ip: int = 0  # connections (pending and open) per address group
    memory_limit: int = 2**62  # bytes buffered for clients in the whole process (budget.py)
    access_log: bool = False  # one info line per closed connection
    # uvloop listens again on every socket it is given: with this, not its own 100.
    backlog: int = socket.SOMAXCONN
