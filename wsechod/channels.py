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

Channel patterns, one syntax for token rights, ``[[channel]]`` tables and history: a
pattern is a channel name whose segments may be ``*`` (exactly one segment, not empty) or,
last, ``**`` (one or more segments). ``/rooms/*`` matches ``/rooms/42`` but neither ``/rooms``
nor ``/rooms/42/chat``; ``/rooms/**`` matches both of the latter but not ``/rooms``;
``/**`` matches every channel but ``/``. A ``*`` inside a segment (``/room*``) is no
wildcard and is refused, so that nobody writes one expecting a prefix match.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

# What a request path may hold (RFC 3986 3.3's pchar, and "/"); anything else is no name.
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
RESERVED = frozenset(("/healthz", "/metrics"))  # the server's own paths (the ops role's)
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


def name_of(written: str) -> str:
    """The channel a path (without its query string) names; InvalidName if none: a
    character a path may not hold, a broken percent-encoding, or the server's own paths
    (``/healthz``, ``/metrics``), however spelled."""
    if not _PATH.fullmatch(written):
        raise InvalidName("a character a path may not hold")
    name = normalize(written)
    if name in RESERVED:
        raise InvalidName(f"{name} is the server's own")
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


MAX_PATTERN = 256  # bytes of one pattern


class InvalidPattern(ValueError):
    """Not a channel pattern; the message says why."""


class Pattern:
    """One channel pattern, compiled: its segments, matched one by one."""

    __slots__ = ("_segments", "_tail", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.startswith("/"):
            raise InvalidPattern(f"a channel pattern starts with '/': {text!r}")
        if len(text) > MAX_PATTERN:
            raise InvalidPattern(f"a channel pattern has at most {MAX_PATTERN} characters")
        if "?" in text:
            raise InvalidPattern(f"a channel pattern has no query string: {text!r}")
        try:
            name = normalize(text)
        except InvalidName as exc:
            raise InvalidPattern(f"{exc}: {text!r}") from None
        segments = name[1:].split("/") if name != "/" else []
        for i, segment in enumerate(segments):
            if "*" in segment and segment not in ("*", "**"):
                raise InvalidPattern(f"'*' is a whole segment or none: {text!r}")
            if segment == "**" and i != len(segments) - 1:
                raise InvalidPattern(f"'**' may only be the last segment: {text!r}")
        self.text = name
        self._tail = bool(segments) and segments[-1] == "**"
        self._segments = tuple(segments[:-1] if self._tail else segments)

    @property
    def exact(self) -> bool:
        """Whether it names one channel (no wildcard)."""
        return not self._tail and "*" not in self._segments

    def matches(self, channel: str) -> bool:
        """Whether the normalised ``channel`` is one the pattern names."""
        names = channel[1:].split("/") if channel != "/" else []
        fixed = self._segments
        if len(names) < len(fixed) + self._tail or (not self._tail and len(names) != len(fixed)):
            return False
        if self._tail and not names[len(fixed)]:
            return False  # "**" is at least one segment, not an empty one
        return all(p == n or (p == "*" and n) for p, n in zip(fixed, names, strict=False))

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class Patterns:
    """Several patterns, any of which may match: exact names in a set, the rest tried in
    turn. Compiled once (a token, a table), then asked once per connection."""

    __slots__ = ("_exact", "_wild", "texts")

    def __init__(self, texts: Iterable[str]) -> None:
        patterns = [Pattern(text) for text in texts]
        self.texts = tuple(p.text for p in patterns)
        self._exact = frozenset(p.text for p in patterns if p.exact)
        self._wild = tuple(p for p in patterns if not p.exact)

    def matches(self, channel: str) -> bool:
        return channel in self._exact or any(p.matches(channel) for p in self._wild)

    def __bool__(self) -> bool:
        return bool(self.texts)

    def __repr__(self) -> str:
        return f"Patterns({list(self.texts)!r})"


# --- Policies per channel ([[channel]] tables) ---------------------------------------------

PUBLISHERS = ("members", "api")
SLOW_CONSUMER_POLICIES = ("drop", "close")
# The keys a [[channel]] table may set, with their types; each defaults to the global key.
RULE_KEYS: dict[str, type] = {
    "relay_echo": bool,
    "slow_consumer": str,
    "slow_consumer_timeout": float,
    "max_channel_members": int,
    "publish": str,
    "history_size": int,
    "history_ttl": float,
}


# The smallest value of each number a table may set.
LEAST = {"slow_consumer_timeout": 0, "max_channel_members": 1, "history_size": 0, "history_ttl": 0}


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[channel]]`` table: a pattern, and what differs for the channels it matches
    (None: the global setting)."""

    pattern: str
    relay_echo: bool | None = None
    slow_consumer: str | None = None
    slow_consumer_timeout: float | None = None
    max_channel_members: int | None = None
    publish: str | None = None  # "members" (and the API), or "api" alone
    history_size: int | None = None
    history_ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """What holds for one channel: its rule's values, the global settings elsewhere."""

    relay_echo: bool
    slow_consumer: str
    slow_consumer_timeout: float
    max_channel_members: int
    publish: str
    history_size: int
    history_ttl: float


def rule(table: Any) -> Rule:
    """A ``[[channel]]`` table read from TOML; ValueError says what is wrong with it."""
    if not isinstance(table, dict):
        raise ValueError("expected a table ([[channel]] with pattern = ...)")
    unknown = sorted(set(table) - {"pattern", *RULE_KEYS})
    if unknown:
        allowed = ", ".join(("pattern", *RULE_KEYS))
        raise ValueError(f"unknown key {unknown[0]!r} (a [[channel]] table takes {allowed})")
    if "pattern" not in table:
        raise ValueError("no pattern")
    pattern = Pattern(table["pattern"]).text
    values: dict[str, Any] = {}
    for key, kind in RULE_KEYS.items():
        if key not in table:
            continue
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{key} = {value!r}: expected {kind.__name__}")
        values[key] = value
    if values.get("publish", "members") not in PUBLISHERS:
        raise ValueError(f"publish = {values['publish']!r}: expected members or api")
    if values.get("slow_consumer", "drop") not in SLOW_CONSUMER_POLICIES:
        raise ValueError(f"slow_consumer = {values['slow_consumer']!r}: expected drop or close")
    for key, least in LEAST.items():
        if values.get(key, least) < least:
            raise ValueError(f"{key} = {values[key]!r}: too small")
    return Rule(pattern, **values)


def rules(tables: Any) -> tuple[Rule, ...]:
    """Every ``[[channel]]`` table, in order (ValueError names the one that is wrong)."""
    if not isinstance(tables, list | tuple):
        raise ValueError("expected [[channel]] tables")
    out = []
    for i, table in enumerate(tables, 1):
        if isinstance(table, Rule):  # handed down already made
            out.append(table)
            continue
        try:
            out.append(rule(table))
        except ValueError as exc:
            raise ValueError(f"[[channel]] number {i}: {exc}") from None
    return tuple(out)


class Policies:
    """The rules, compiled, and the global settings: a channel's policy is the first rule
    whose pattern matches it, its unset values the global ones."""

    def __init__(self, rules: tuple[Rule, ...], default: Policy) -> None:
        self._rules = [(Pattern(r.pattern), r) for r in rules]
        self.default = default

    def of(self, channel: str) -> Policy:
        for pattern, found in self._rules:
            if pattern.matches(channel):
                values = {key: getattr(found, key) for key in RULE_KEYS}
                return replace(self.default, **{k: v for k, v in values.items() if v is not None})
        return self.default
