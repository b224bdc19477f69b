"""Real tokens for the benchmark's ``auth = "jwt"`` runs: a secret and an EC key made for
each run, tokens signed with them by PyJWT, each token different (so that the server
checks every one: it remembers verdicts)."""

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHMS = ("HS256", "ES256")
RIGHTS = {"subscribe": ["/", "/**"], "publish": ["/", "/**"]}


@cache
def _keys() -> tuple[Path, bytes, Path, ec.EllipticCurvePrivateKey]:
    """Made once per run, in a directory removed at exit."""
    where = Path(tempfile.mkdtemp(prefix="wsechod-bench-"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    secret = uuid.uuid4().hex.encode() + uuid.uuid4().hex.encode()  # 64 bytes
    (where / "jwt.secret").write_bytes(secret)
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (where / "es256.pem").write_bytes(public)
    return where / "jwt.secret", secret, where / "es256.pem", private


def server_args(algorithm: str) -> list[str]:
    """wsechod's flags to check tokens of ``algorithm`` (no handshake rate: one address)."""
    secret_file, _, public_file, _ = _keys()
    key = ["--jwt-secret-file", str(secret_file)] if algorithm == "HS256" else [
        "--jwt-public-key", str(public_file)
    ]  # fmt: skip
    return ["--auth", "jwt", *key, "--handshake-rate", "0"]


def tokens(algorithm: str, count: int) -> Iterator[str]:
    """``count`` different tokens, valid for an hour, with every right."""
    _, secret, _, private = _keys()
    key = secret if algorithm == "HS256" else private
    expires = int(time.time()) + 3600
    for _ in range(count):
        claims = {"sub": "bench", "exp": expires, "jti": uuid.uuid4().hex, "wsechod": RIGHTS}
        yield jwt.encode(claims, key, algorithm=algorithm)
