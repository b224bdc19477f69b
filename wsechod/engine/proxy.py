"""Who the client is: its address behind a trusted reverse proxy, and the group of
addresses it is counted in for ``max_connections_per_ip``.

A proxy in ``trusted_proxies`` may say who the client is in two ways:

- the PROXY protocol (HAProxy's spec, versions 1 and 2), a header before anything else on
  the connection; it is detected by its first bytes, from trusted peers only (anyone else
  sending one gets 400: it is not HTTP);
- ``X-Forwarded-For``: the right-most address that is not itself a trusted proxy (each
  proxy appends the address it got the connection from, so addresses further left were
  written by whoever sent the request and cannot be believed). From an untrusted peer the
  header is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest version-1 line, CRLF included
_V2_HEAD = 16


class ProxyError(ValueError):
    """A PROXY protocol header that cannot be read."""


def address(text: str) -> Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def peer_address(sockaddr: object) -> Address | None:
    """The IP address of a transport's ``peername`` (None for Unix sockets)."""
    if isinstance(sockaddr, tuple) and sockaddr and isinstance(sockaddr[0], str):
        return address(sockaddr[0].partition("%")[0])  # without an IPv6 zone
    return None


def trusted(addr: Address | None, networks: Sequence[Network], unix: bool = False) -> bool:
    """Whether the peer may name the client: its address is in ``networks``, or it came
    over a Unix socket (no address) and ``unix`` trusts those (a proxy on this host)."""
    if addr is None:
        return unix
    return any(addr in net for net in networks)


def group(addr: Address | None, ipv6_prefix_length: int) -> str:
    """The key ``max_connections_per_ip`` counts under: an IPv4 address, or the IPv6
    network of ``ipv6_prefix_length`` bits around it (one subscriber usually has a whole
    /64); "" for no address (a Unix socket), which is never limited."""
    if addr is None:
        return ""
    if isinstance(addr, ipaddress.IPv4Address) or ipv6_prefix_length == 128:
        return str(addr)
    # Masked by hand: building an IPv6Network at each handshake costs three times more.
    mask = ((1 << ipv6_prefix_length) - 1) << (128 - ipv6_prefix_length)
    return f"{ipaddress.IPv6Address(int(addr) & mask)}/{ipv6_prefix_length}"


def forwarded_for(values: Iterable[str], networks: Sequence[Network]) -> Address | None:
    """The client in ``X-Forwarded-For`` headers sent by a trusted proxy: the right-most
    address that is not itself trusted (or the left-most, if all are). An entry that is
    not an address (``unknown``, an obfuscated name) ends the walk at the last address
    known; None if there is none."""
    entries = [entry.strip() for value in values for entry in value.split(",")]
    client = None
    for entry in reversed(entries):
        addr = _forwarded_address(entry)
        if addr is None:
            break
        client = addr
        if not trusted(addr, networks):
            break
    return client


def _forwarded_address(entry: str) -> Address | None:
    """``1.2.3.4``, ``2001:db8::1``, and the forms with a port some proxies write:
    ``1.2.3.4:5678``, ``[2001:db8::1]:5678``."""
    entry = entry.strip('"')
    if "%" in entry:  # an IPv6 zone names an interface of the proxy's host, not a client
        return None
    if entry.startswith("["):
        return address(entry[1:].partition("]")[0])
    if entry.count(":") == 1:
        entry = entry.partition(":")[0]
    return address(entry)


def is_header(data: bytes) -> bool:
    """Whether ``data`` starts like a PROXY protocol header (of either version)."""
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def parse_header(data: bytes | bytearray) -> tuple[int, tuple[Address, int] | None] | None:
    """Read a PROXY protocol header at the start of ``data``.

    Returns None while more bytes are needed to decide, ``(0, None)`` if ``data`` does not
    start with one, ``(n, source)`` for a header of ``n`` bytes: the client's address and
    port, or None when the proxy speaks for itself (v2 LOCAL, v1 UNKNOWN, other families).
    Raises ProxyError for a malformed header."""
    start = bytes(data[: len(V2_SIGNATURE)])
    if V1_PREFIX.startswith(start[: len(V1_PREFIX)]) and len(start) < len(V1_PREFIX):
        return None
    if V2_SIGNATURE.startswith(start) and len(start) < len(V2_SIGNATURE):
        return None
    if start.startswith(V1_PREFIX):
        return _v1(data)
    if start == V2_SIGNATURE:
        return _v2(data)
    return 0, None


def _v1(data: bytes | bytearray) -> tuple[int, tuple[Address, int] | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("PROXY v1 line longer than 107 bytes")
        return None
    fields = bytes(data[:end]).split(b" ")
    size = end + 2
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return size, None
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("expected PROXY TCP4|TCP6 source destination sport dport")
    try:
        texts = [f.decode("ascii") for f in fields[2:4]]
        if any("%" in text for text in texts):  # a zone: not a client's address
            raise ValueError
        source, destination = (ipaddress.ip_address(text) for text in texts)
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("invalid address in PROXY v1 line") from None
    version = 4 if fields[1] == b"TCP4" else 6
    if source.version != version or destination.version != version:
        raise ProxyError(f"{fields[1].decode()} with an address of another family")
    # A dual-stack proxy names its IPv4 clients IPv4-mapped: each counts as itself.
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    ports = fields[4:6]
    if not all(p.isdigit() and (p == b"0" or p[:1] != b"0") and int(p) < 65536 for p in ports):
        raise ProxyError("invalid port in PROXY v1 line")
    return size, (source, int(ports[0]))


def _v2(data: bytes | bytearray) -> tuple[int, tuple[Address, int] | None] | None:
    if len(data) < _V2_HEAD:
        return None
    version_command, family = data[12], data[13]
    size = _V2_HEAD + int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    if len(data) < size:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return size, None
    body = bytes(data[_V2_HEAD:size])  # addresses, then TLVs (skipped)
    kind = family >> 4
    if kind == 1:  # AF_INET: source, destination, source port, destination port
        if len(body) < 12:
            raise ProxyError("PROXY v2 IPv4 address block too short")
        return size, (ipaddress.IPv4Address(body[0:4]), int.from_bytes(body[8:10], "big"))
    if kind == 2:  # AF_INET6
        if len(body) < 36:
            raise ProxyError("PROXY v2 IPv6 address block too short")
        source = address(str(ipaddress.IPv6Address(body[0:16])))
        assert source is not None
        return size, (source, int.from_bytes(body[32:34], "big"))
    return size, None  # AF_UNSPEC, AF_UNIX: nothing to say about the client
