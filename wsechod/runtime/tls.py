"""TLS: the server's ``ssl.SSLContext``, built from the certificate, key and CA files.

Settings validation builds one to check the files (so a wrong file fails with exit 2 before
anything starts), the lifecycle builds the one it serves with, and a reload builds a fresh
one from the same paths: renewed files at the same path are read again, and a CA that was
removed is no longer trusted (loading into the old context would only add).
"""

import os
import ssl
import stat


class TlsError(Exception):
    """A TLS file cannot be used: ``key`` is the setting to blame, ``reason`` says why."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"cannot use {key} {path!r}: {reason}")
        self.key, self.path, self.reason = key, path, reason


class _Encrypted(Exception):
    """OpenSSL asked for a password: a daemon has nobody to ask."""


def _no_password() -> bytes:
    raise _Encrypted


def server_context(cert: str, key: str = "", ca: str = "") -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, the chain after the certificate) and ``key``
    (PEM, unencrypted; '': the key is in ``cert``'s file); with ``ca``, clients must
    present a certificate signed by it (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    _readable("tls_cert", cert)
    if key:
        _readable("tls_key", key)
    try:
        # A file of certificates alone first, so that an error here is the certificate's.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise TlsError("tls_cert", cert, "not a PEM certificate" + _why(exc)) from None
    try:
        context.load_cert_chain(cert, key or None, password=_no_password)
    except _Encrypted:
        raise TlsError(
            "tls_key", key or cert, "the key is encrypted: give an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsError(
                "tls_key", key or cert, f"does not match the certificate in {cert}"
            ) from None
        if key:
            raise TlsError("tls_key", key, "not a PEM private key" + _why(exc)) from None
        raise TlsError("tls_cert", cert, "no private key in this file: set tls_key") from None
    if ca:
        _readable("tls_ca", ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TlsError("tls_ca", ca, "not a PEM certificate" + _why(exc)) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _readable(key: str, path: str) -> None:
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a pipe would hold the server
            raise TlsError(key, path, "not a regular file")
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsError(key, path, exc.strerror or str(exc)) from None


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, when it says more than "PEM lib"."""
    reason = exc.reason if isinstance(exc.reason, str) else None
    return "" if reason in (None, "PEM_LIB") else f" ({reason.lower().replace('_', ' ')})"
