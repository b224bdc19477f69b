"""How the engine names a socket's address in logs and ``listening``: one small leaf, so
that the engine needs nothing of the listeners' module (nor of settings) to say it."""


def format_address(sockaddr: object) -> str:
    """``host:port`` (brackets around IPv6 hosts, as in URLs), a Unix socket's path, or
    ``@name`` for an abstract one (systemd may pass any of them)."""
    if isinstance(sockaddr, bytes):  # abstract Unix socket: leading NUL
        return "@" + sockaddr.lstrip(b"\0").decode(errors="replace")
    if isinstance(sockaddr, str):
        return sockaddr or "(unnamed unix socket)"
    assert isinstance(sockaddr, tuple)
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
