"""Signed tokens (JWT): checked once per connection, never per message.

A token carries who the client is (``sub``), until when (``exp``, required) and its
rights, in a private claim (``wsechod`` unless ``jwt_rights_claim`` says otherwise)::

    {"sub": "alice", "exp": 1767225600,
     "wsechod": {"subscribe": ["/rooms/*"], "publish": ["/rooms/42"]}}

``subscribe``: the channels it may join (receive); ``publish``: those it may send to.
Patterns as ``wsechod.channels`` says (``*`` one segment, ``**`` the rest). A token without
the claim has no rights; a claim that is not as above makes the whole token invalid (no
partial acceptance). The reasons given to clients are short and fixed; the log says more.
"""

import functools
import hashlib
import http
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from wsechod.auth.keys import Key
from wsechod.channels import InvalidPattern, Patterns

MAX_PATTERNS = 64  # per list in a token
CACHE = 4096  # tokens remembered, valid and invalid: a reconnect storm costs no check


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token says."""

    sub: str
    expires: float  # ``exp``: seconds since the epoch
    subscribe: Patterns
    publish: Patterns


class Refused(Exception):
    """A token that admits nobody: ``status`` 401 (no valid token) or 403 (valid, no
    right), ``reason`` for the client, ``detail`` for the log."""

    def __init__(self, status: http.HTTPStatus, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


def unauthorized(reason: str, detail: str = "") -> Refused:
    return Refused(http.HTTPStatus.UNAUTHORIZED, reason, detail)


# PyJWT's failures, as the few reasons a client is told (Mercure's advice: say little).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.MissingRequiredClaimError, "invalid token"),
)


@functools.lru_cache(maxsize=256)
def _compiled(texts: tuple[str, ...]) -> Patterns:
    """Patterns, compiled once for the many tokens that grant the same."""
    return Patterns(texts)


class Verifier:
    """Checks tokens against the key ring, remembering the last ``CACHE`` verdicts (the
    SHA-256 of a token is its key: a flood of one bad token costs one check)."""

    def __init__(
        self,
        keys: Sequence[Key],
        *,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
        rights_claim: str = "wsechod",
    ) -> None:
        self._by_kid = {key.kid: key for key in keys if key.kid is not None}
        self._only = keys[0] if len(keys) == 1 else None
        self._audience = audience or None
        self._issuer = issuer or None
        self.leeway = leeway
        self._claim = rights_claim
        self._seen: OrderedDict[bytes, Claims | Refused] = OrderedDict()

    def verify(self, token: str) -> Claims:
        """The token's claims, or ``Refused`` (401) saying why not."""
        digest = hashlib.sha256(token.encode()).digest()
        seen = self._seen.get(digest)
        if seen is not None:
            self._seen.move_to_end(digest)
            if isinstance(seen, Refused):
                raise seen
            if seen.expires + self.leeway > time.time():
                return seen
            del self._seen[digest]
        try:
            verdict: Claims | Refused = self._check(token)
        except Refused as refused:
            verdict = refused
        if not (isinstance(verdict, Refused) and verdict.reason == "token not yet valid"):
            self._seen[digest] = verdict  # a token not yet valid will be, so not that one
            if len(self._seen) > CACHE:
                self._seen.popitem(last=False)
        if isinstance(verdict, Refused):
            raise verdict
        return verdict

    def _check(self, token: str) -> Claims:
        key = self._only
        if key is None:  # the header's kid chooses (read twice: PyJWT parses it again)
            try:
                key = self._key(jwt.get_unverified_header(token).get("kid"))
            except jwt.PyJWTError as exc:
                raise unauthorized("invalid token", f"not a JWT: {exc}") from None
        try:
            whole = jwt.decode_complete(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), "invalid token")
            raise unauthorized(reason, f"{type(exc).__name__}: {exc}") from None
        if key is self._only:  # one key: its kid, if the token names one, must be its
            self._key(whole["header"].get("kid"))
        payload = whole["payload"]
        subscribe, publish = self._rights(payload.get(self._claim))
        sub = payload.get("sub", "")
        return Claims(str(sub), float(payload["exp"]), subscribe, publish)

    def _key(self, kid: Any) -> Key:
        """The key a token's ``kid`` names (none: the only key), or Refused."""
        key = self._by_kid.get(kid) if kid is not None else self._only
        if key is None:
            detail = f"unknown key id {kid!r}" if kid is not None else "no key id"
            raise unauthorized("invalid token", detail)
        return key

    def _rights(self, claim: Any) -> tuple[Patterns, Patterns]:
        if claim is None:
            return Patterns(()), Patterns(())
        if not isinstance(claim, dict) or set(claim) - {"subscribe", "publish"}:
            raise unauthorized("invalid rights claim", f"{self._claim!r} is not as documented")
        lists = []
        for name in ("subscribe", "publish"):
            texts = claim.get(name, [])
            if (
                not isinstance(texts, list)
                or len(texts) > MAX_PATTERNS
                or not all(isinstance(t, str) for t in texts)
            ):
                detail = f"{self._claim}.{name}: a list of at most {MAX_PATTERNS} patterns"
                raise unauthorized("invalid rights claim", detail)
            try:
                lists.append(_compiled(tuple(texts)))
            except InvalidPattern as exc:
                raise unauthorized("invalid rights claim", str(exc)) from None
        return lists[0], lists[1]
