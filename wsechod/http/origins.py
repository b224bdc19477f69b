"""Origins a browser may open WebSockets from (``allowed_origins``).

An entry is ``[scheme://]host[:port]``:

- ``https://app.example.com``: exactly that origin (the scheme's default port);
- ``https://*.example.com``: any subdomain of example.com, at any depth, but not
  example.com itself; a wildcard over a public suffix (``*.com``, ``*.co.uk``,
  ``*.github.io``: names anyone can register under) is refused, per the Public Suffix List
  (the ``publicsuffixlist`` package), except ``*.localhost``;
- without a scheme (``app.example.com``, ``*.example.com``), any scheme;
- ``http://localhost:3000``: a port other than the default must be written;
- ``*``: any origin (with ``require_origin``: any, as long as there is one);
- ``null``: the literal ``Origin: null`` of sandboxed frames and local files.

Names are compared without regard to case; international names are written in punycode
(``xn--...``), as browsers send them. Browsers send Origin on every WebSocket handshake;
other clients usually send none.
"""

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class Pattern:
    scheme: str | None  # None: any
    host: str  # without the "*." of a wildcard
    wildcard: bool  # any subdomain of host
    port: int | None  # None: the scheme's default

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        if (port or DEFAULT_PORTS.get(scheme)) != (self.port or DEFAULT_PORTS.get(scheme)):
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def check(entry: str) -> str:
    """``entry`` normalised (lower case, default port dropped), or ValueError saying
    what is wrong with it, for the settings."""
    if entry in ("*", "null"):
        return entry
    pattern = _parse(entry, pattern=True)
    scheme = "" if pattern.scheme is None else pattern.scheme + "://"
    host = ("*." if pattern.wildcard else "") + pattern.host
    default = DEFAULT_PORTS.get(pattern.scheme or "")
    port = "" if pattern.port in (None, default) else f":{pattern.port}"
    return scheme + host + port


def allowed(origin: str, entries: Sequence[str]) -> bool:
    """Whether an Origin header's value is one of ``entries`` (already checked)."""
    if "*" in entries:
        return True
    if origin == "null":
        return "null" in entries
    try:
        parsed = _parse(origin.strip().lower(), pattern=False)
    except ValueError:
        return False
    assert parsed.scheme is not None
    return any(p.matches(parsed.scheme, parsed.host, parsed.port) for p in _patterns(entries))


@functools.lru_cache(maxsize=8)
def _patterns(entries: Sequence[str]) -> tuple[Pattern, ...]:
    """Parsed once per list (the settings of the moment), not at every handshake."""
    return tuple(_parse(e, pattern=True) for e in entries if e not in ("*", "null"))


def _parse(text: str, *, pattern: bool) -> Pattern:
    """An origin (``pattern`` False: the scheme is required, no wildcard) or an entry."""
    if not text.isascii():
        raise ValueError("write international names in punycode (xn--...), as browsers send")
    text = text.lower()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not pattern:
            raise ValueError("no scheme")
        scheme, rest = "", text
    elif not _SCHEME.fullmatch(scheme):
        raise ValueError(f"invalid scheme {scheme!r}")
    if "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise ValueError("an origin is scheme://host[:port], without path, query or user")
    host, port = _origin_host_port(rest)
    wildcard = pattern and host.startswith("*.")
    if wildcard:
        host = host[2:]
    if not _valid_host(host, wildcard):
        raise ValueError(f"invalid host {host!r}")
    if wildcard and host != "localhost" and _public_suffixes().is_public(host):
        raise ValueError(
            f"*.{host} covers a public suffix: any site registered under it would be "
            "allowed; list the origins, or a wildcard under a domain of yours (*.example.com)"
        )
    return Pattern(scheme or None, host, wildcard, port)


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The Public Suffix List as the package ships it, read once (about 20 ms), when the
    first wildcard is checked."""
    return PublicSuffixList(accept_unknown=False)  # *.internal, *.lan: nobody registers there


def _origin_host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [IPv6]
        host, bracket, rest = text.partition("]")
        host += bracket
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6 address] or [IPv6 address]:port")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        port = port_text if colon else None
    if port is None:
        return host, None
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} must be a number between 1 and 65535")
    return host, int(port)


def _valid_host(host: str, wildcard: bool) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return not wildcard
    labels = host.split(".")
    return bool(host) and all(_LABEL.fullmatch(label) for label in labels)
