"""Listening sockets, produced in one place and handed to the server as a list.

Binding happens before the event loop exists (and, later, before the process detaches), so
"address already in use" and "permission denied" reach the operator's terminal. Whoever
produced the sockets (this module, or systemd socket activation), the server only sees a list.
"""

import socket


class BindError(Exception):
    """A listening socket could not be created; the message is one line for the operator."""


def resolve(host: str, port: int) -> list[tuple[int, str]]:
    """The (family, address) pairs ``bind`` would listen on; also what --check-config
    checks, since it must not bind (a running instance may hold the port)."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    except UnicodeError as exc:  # not a name at all (e.g. a label over 63 characters)
        reason = exc.__cause__ or exc  # "label empty or too long", not the codec's wrapper
        raise BindError(f"cannot resolve host {host!r}: {reason}") from None
    return [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]


def bind(host: str, port: int) -> list[socket.socket]:
    """Listen on every address ``host`` resolves to; with port 0 they all share one port."""
    infos = resolve(host, port)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if sockets and port == 0:
                port = sockets[0].getsockname()[1]
            sockets.append(_listen(family, address, port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(family: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = format_address((address, port))
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


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
