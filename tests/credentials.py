"""Credentials for the tests: a JWT secret and tokens made with PyJWT, as an application's
backend makes them, and an API key; the files wsechod reads them from are fixtures."""

import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
KEY = "k" * 8 + "0123456789abcdef0123456789abcdef"  # an API key


def token(
    sub: str = "alice",
    *,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    ttl: float = 300,
    key: Any = SECRET,
    algorithm: str = "HS256",
    kid: str | None = None,
    **claims: Any,
) -> str:
    """A token with these rights, valid for ``ttl`` seconds."""
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    rights = {k: v for k, v in (("subscribe", subscribe), ("publish", publish)) if v is not None}
    if rights:
        payload["wsechod"] = rights
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Two API keys: one written as its SHA-256 (KEY), one as it is."""
    path = tmp_path / "api.keys"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(f"# backends\nbilling sha256:{digest}\nlegacy {'L' * 32}\n")
    return path
