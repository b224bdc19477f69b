"""The API keys of backends (``api_key_file``): one per line, ``NAME sha256:HEX`` (the
SHA-256 of the key, so that the file does not hold the keys themselves) or ``NAME KEY``;
blank lines and lines starting with ``#`` are ignored. Make a key with
``openssl rand -hex 32`` and its line with ``printf '%s' KEY | sha256sum``.

A key is compared with every key on file, each with ``hmac.compare_digest`` on the
digests: the time taken says nothing of which key, or how much of one, was right. Keys
are random and long, so a fast hash is enough (no password hashing).
"""

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

MIN_KEY = 16  # bytes of a key written in the file as it is
_HEX = re.compile(r"sha256:([0-9a-fA-F]{64})")


class BadKeyFile(ValueError):
    """The file cannot be used; the message says which line and why."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes

    def __repr__(self) -> str:
        return f"ApiKey({self.name!r})"


def load(path: str) -> tuple[ApiKey, ...]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadKeyFile(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, key = line.partition(" ")
        key = key.strip()
        if not key:
            raise BadKeyFile(f"{path} line {number}: expected NAME sha256:HEX or NAME KEY")
        if match := _HEX.fullmatch(key):
            digest = bytes.fromhex(match.group(1))
        elif len(key) < MIN_KEY:
            raise BadKeyFile(f"{path} line {number} ({name}): a key of at least {MIN_KEY} bytes")
        else:
            digest = hashlib.sha256(key.encode()).digest()
        if any(k.name == name for k in keys):
            raise BadKeyFile(f"{path} line {number}: the name {name!r} is given twice")
        keys.append(ApiKey(name, digest))
    if not keys:
        raise BadKeyFile(f"{path} holds no key")
    return tuple(keys)


def match(keys: tuple[ApiKey, ...], presented: str) -> str | None:
    """The name of the key presented, or None. Every key is compared (no early exit)."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key.name
    return found
