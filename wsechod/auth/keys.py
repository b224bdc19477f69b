"""The key ring: every key that may sign a token, each bound to one algorithm when it is
loaded, so that a token's own ``alg`` header never chooses how it is checked (algorithm
confusion, ``alg: none``).

A key file is named in the settings as ``PATH`` or ``KID=PATH``: a token whose header says
``kid`` is checked with that key alone (never with every key in turn: a token costs one
check), and a token without ``kid`` with the only key, if there is one. Secrets (HS256)
are at least 32 bytes (RFC 7518 3.2); public keys are PEM files: RSA of 2048 bits or more
(RS256), EC on P-256, P-384 or P-521 (ES256, ES384, ES512), Ed25519 or Ed448 (EdDSA).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MIN_SECRET = 32  # bytes: RFC 7518 3.2, a key at least as long as the hash
MIN_RSA_BITS = 2048
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class BadKey(ValueError):
    """A key file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    algorithm: str  # fixed when loaded; a token must say the same
    key: Any  # bytes (HS256), or a cryptography public key object
    source: str  # the file, for messages

    def __repr__(self) -> str:  # never the secret
        return f"Key(kid={self.kid!r}, algorithm={self.algorithm!r}, source={self.source!r})"


def split_entry(entry: str) -> tuple[str | None, str]:
    """``KID=PATH`` or ``PATH``: the key id (None) and the path."""
    kid, sep, path = entry.partition("=")
    if sep and kid and "/" not in kid:
        return kid, path
    return None, entry


def secret(kid: str | None, value: bytes, source: str) -> Key:
    """An HS256 secret; surrounding whitespace (a file's final newline) is not part of it."""
    value = value.strip()
    if len(value) < MIN_SECRET:
        raise BadKey(
            f"the JWT secret in {source} has {len(value)} bytes; HS256 needs at least "
            f"{MIN_SECRET} (RFC 7518 3.2): make one with `openssl rand -base64 48`"
        )
    return Key(kid, "HS256", value, source)


def public_key(kid: str | None, pem: bytes, source: str) -> Key:
    """A public key from a PEM file, with the one algorithm its type allows."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        why = str(exc).split(". ")[0].rstrip(".")  # cryptography's first sentence
        raise BadKey(f"{source} is not a PEM public key ({why})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadKey(f"{source}: an RSA key of {key.key_size} bits; at least 2048")
        return Key(kid, "RS256", key, source)
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _CURVES.get(key.curve.name)
        if algorithm is None:
            raise BadKey(f"{source}: curve {key.curve.name} (P-256, P-384 or P-521)")
        return Key(kid, algorithm, key, source)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return Key(kid, "EdDSA", key, source)
    raise BadKey(f"{source}: a {type(key).__name__}; RSA, EC or Ed25519/Ed448 keys only")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadKey(f"cannot read {path}: {exc.strerror or exc}") from None


def load(kind: str, entry: str) -> Key:
    """One key of the settings: ``kind`` "secret" (jwt_secret_file) or "public"
    (jwt_public_key), ``entry`` ``PATH`` or ``KID=PATH``."""
    kid, path = split_entry(entry)
    make = secret if kind == "secret" else public_key
    return make(kid, _read(path), path)


def ring(
    secret_files: Iterable[str], public_files: Iterable[str], env_secret: str = ""
) -> tuple[Key, ...]:
    """Every key the settings name, loaded and checked. ``env_secret``: a secret given as
    a value (``jwt_secret``), without a key id."""
    keys = [secret(None, env_secret.encode(), "jwt_secret")] if env_secret else []
    keys += [load("secret", entry) for entry in secret_files]
    keys += [load("public", entry) for entry in public_files]
    kids = [k.kid for k in keys if k.kid is not None]
    twice = sorted({kid for kid in kids if kids.count(kid) > 1})
    if twice:
        raise BadKey(f"key id {twice[0]!r} names two keys")
    return tuple(keys)
