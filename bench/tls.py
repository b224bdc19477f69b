"""TLS for the bench's TLS columns: a self-signed certificate for 127.0.0.1, made once per
run with ``cryptography`` (PyJWT's ES256 already needs it), and the client's context that
trusts it. Servers are told where it is by the environment (``environ``): wsechod reads
its own ``WSECHOD_TLS_*`` settings, the Node and picows peers ``BENCH_TLS_*``."""

import atexit
import datetime
import functools
import ipaddress
import shutil
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@functools.cache
def files() -> tuple[Path, Path]:
    """The certificate and its key (P-256, as a server would have), in a directory that
    lasts as long as the bench."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder = Path(tempfile.mkdtemp(prefix="wsechod-bench-tls-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def environ() -> dict[str, str]:
    cert, key = files()
    return {
        "WSECHOD_TLS_CERT": str(cert),
        "WSECHOD_TLS_KEY": str(key),
        "BENCH_TLS_CERT": str(cert),
        "BENCH_TLS_KEY": str(key),
    }


@functools.cache
def client_context() -> ssl.SSLContext:
    """Trusts the bench's certificate, and checks it as a client would."""
    return ssl.create_default_context(cafile=str(files()[0]))
