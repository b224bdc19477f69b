"""Channel names: the request path, normalised so that one channel has one name.

Clients and proxies write the same path in several ways; RFC 3986 (6.2.2) says which
spellings are the same resource, and those are one channel here:

- percent-encoded unreserved characters are decoded (``/%72oom`` is ``/room``), and the
  hexadecimal digits of the other percent-encodings are upper case (``%2f`` is ``%2F``);
- dot-segments are removed (``/a/../room`` is ``/room``, ``/./room`` is ``/room``);
- repeated slashes are one (``//room`` is ``/room``): no channel name has an empty
  segment, which a path-based router would not tell apart either.

Everything else is significant: case (``/Room`` is not ``/room``), a trailing slash
(``/room/`` is not ``/room``), and reserved characters, encoded or not (``%2F`` is not
``/``: it is a character inside a segment). The query string is not part of the name.
"""

import re

# RFC 3986 2.3: unreserved characters, decoded wherever they were percent-encoded.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%(?P<hex>[0-9A-Fa-f]{2})|%")
_SLASHES = re.compile(r"/{2,}")


class InvalidName(ValueError):
    """A path that cannot name a channel (a ``%`` not followed by two hex digits)."""


def _decode_unreserved(match: re.Match[str]) -> str:
    digits = match.group("hex")
    if digits is None:
        raise InvalidName("'%' not followed by two hexadecimal digits")
    byte = int(digits, 16)
    return chr(byte) if byte in _UNRESERVED else f"%{digits.upper()}"


def normalize(path: str) -> str:
    """The channel a request path (query string included or not) names."""
    name = path.partition("?")[0]
    if "%" in name:
        name = _PERCENT.sub(_decode_unreserved, name)
    if "//" in name:
        name = _SLASHES.sub("/", name)
    if "/." in name:
        name = _remove_dot_segments(name)
    return name


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, on a path that starts with "/" and has no empty segment."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")  # "/a/.." is "/": the directory, with its slash
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)
