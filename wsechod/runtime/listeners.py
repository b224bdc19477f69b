"""Listening sockets, produced in one place and handed to the server as a list.

Binding happens before the event loop exists (and, later, before the process detaches), so
"address already in use" and "permission denied" reach the operator's terminal. Whoever
produced the sockets (this module, or systemd socket activation), the server only sees a list.

Unix socket files are created here with their mode and owner before anyone can connect,
and remembered (device and inode) so that the process that served removes them at exit
only if they are still its own.
"""

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from wsechod.engine import Listener
from wsechod.engine.addresses import format_address
from wsechod.settings import (
    ALL_ROLES,
    ListenAddress,
    Settings,
    describe_roles,
    listen_address,
    roles_of_name,
)


class BindError(Exception):
    """A listening socket could not be created; the message is one line for the operator."""


def addresses(settings: Settings) -> list[ListenAddress]:
    """What to listen on: the ``listen`` entries, else ``host`` and ``port``."""
    if settings.listen:
        return [listen_address(entry) for entry in settings.listen]
    return [ListenAddress(settings.host, settings.port)]


def describe(address: ListenAddress) -> str:
    """An address as ``listen`` writes it, with its roles if not all."""
    roles = describe_roles(address.roles)
    if address.path:
        return f"unix:{address.path}{roles}"
    where = format_address((address.host, address.port)) if address.host else f":{address.port}"
    return where + roles


@dataclass(frozen=True, slots=True)
class SocketFile:
    """A unix socket file this process created."""

    path: str
    dev: int
    ino: int

    def remove(self) -> str | None:
        """Unlink the file if it is still the one bound (a successor may have replaced it
        by now); returns why it could not, or None."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return exc.strerror or str(exc)
        return None


@dataclass(slots=True)
class Bound:
    """The listening sockets, the unix socket files made for them (removed at exit), and
    the stale ones replaced (for a warning in the log). With several workers, ``groups``
    holds each one's sockets: its own copy of each TCP listener, and the shared ones; and
    ``reuseport`` each TCP address's copies (a reuseport group: worker ``i``'s is the
    ``i``-th to listen, the kernel's number for it in the group)."""

    sockets: list[socket.socket] = field(default_factory=list)
    files: list[SocketFile] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    groups: list[list[socket.socket]] = field(default_factory=list)
    reuseport: list[list[socket.socket]] = field(default_factory=list)
    roles: dict[socket.socket, frozenset[str]] = field(default_factory=dict)  # if not all

    def group(self, worker: int) -> list[socket.socket]:
        """What worker ``worker`` serves: all the sockets, if they are not per worker."""
        return self.groups[worker] if self.groups else self.sockets

    def listeners(self, worker: int | None = None) -> list[Listener]:
        """The sockets (of ``worker``, if given) with the roles each serves."""
        sockets = self.sockets if worker is None else self.group(worker)
        return [Listener(sock, self.roles.get(sock, ALL_ROLES)) for sock in sockets]

    @classmethod
    def inherited(cls, named: list[tuple[socket.socket, str]]) -> "Bound":
        """Sockets systemd passed, with the names it gave them: a name made of roles
        (``FileDescriptorName=ops``) gives the socket those roles."""
        bound = cls([sock for sock, _ in named])
        for sock, name in named:
            roles = roles_of_name(name)
            if roles is not None:
                bound.roles[sock] = roles
        return bound

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def remove_files(self) -> list[tuple[str, str]]:
        """Remove the socket files that are still ours; (path, reason) of each failure."""
        failed = [(f.path, why) for f in self.files if (why := f.remove()) is not None]
        self.files.clear()
        return failed


def bind(
    where: Sequence[ListenAddress],
    *,
    mode: int = 0o660,
    owner: tuple[int, int] | None = None,
    copies: int = 1,
    backlog: int = socket.SOMAXCONN,
) -> Bound:
    """Listen on every address, with ``backlog``; unix socket files get ``mode`` and
    ``owner`` (uid, gid).

    ``copies`` > 1 (workers): each TCP address is bound that many times with SO_REUSEPORT,
    so that the kernel spreads the connections over the workers' sockets; a unix socket
    is one, shared (the workers take turns accepting on it)."""
    bound = Bound()
    groups: list[list[socket.socket]] = [[] for _ in range(copies)] if copies > 1 else []
    try:
        for address in where:
            made = len(bound.sockets)
            if address.path:
                sock = _listen_unix(address.path, mode, owner, bound, backlog)
                bound.sockets.append(sock)
                for group in groups:
                    group.append(sock)
            elif groups:
                copied = _bind_tcp_copies(address.host, address.port, copies, backlog)
                for i, sock in enumerate(copied):
                    bound.sockets.append(sock)
                    groups[i % copies].append(sock)
                for i in range(0, len(copied), copies):
                    bound.reuseport.append(copied[i : i + copies])
            else:
                bound.sockets += _bind_tcp(address.host, address.port, backlog)
            if address.roles != ALL_ROLES:
                for sock in bound.sockets[made:]:
                    bound.roles[sock] = address.roles
        bound.groups = groups
    except BaseException:
        bound.close()
        bound.remove_files()
        raise
    return bound


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


def _bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
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
            sockets.append(_listen(family, address, port, backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_tcp_copies(host: str, port: int, copies: int, backlog: int) -> list[socket.socket]:
    """``copies`` sockets for each address ``host`` resolves to, in that order per address,
    all on one port with SO_REUSEPORT.

    SO_REUSEPORT would also let these join the sockets of another process of the same user
    that has it set (another wsechod with workers): each address is first bound alone,
    without it, so that a port in use is "Address already in use" as with one worker."""
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, address in resolve(host, port):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if sockets and port == 0:
                port = sockets[0].getsockname()[1]
            port = _probe(family, address, port)
            sockets += [
                _listen(family, address, port, backlog, reuseport=True) for _ in range(copies)
            ]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _probe(family: int, address: str, port: int) -> int:
    """Bind (not listen) without SO_REUSEPORT: fails if anything listens there; returns
    the port (the one the kernel picked, for port 0)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind((address, port))
        except OSError as exc:
            where = format_address((address, port))
            raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        return int(probe.getsockname()[1])


def _listen(
    family: int, address: str, port: int, backlog: int, *, reuseport: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = format_address((address, port))
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def _listen_unix(
    path: str, mode: int, owner: tuple[int, int] | None, bound: Bound, backlog: int
) -> socket.socket:
    abstract = path.startswith("@")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            _bind_unix(sock, path, mode)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or abstract or not _stale(path):
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            _bind_unix(sock, path, mode)
            bound.replaced.append(path)
        if not abstract:
            st = os.lstat(path)
            bound.files.append(SocketFile(path, st.st_dev, st.st_ino))
            if owner is not None:
                try:
                    os.chown(path, *owner, follow_symlinks=False)
                except OSError as exc:
                    who = f"{owner[0]}:{owner[1]}"
                    raise BindError(
                        f"cannot give unix socket {path} to {who}: {exc.strerror}"
                    ) from None
        sock.listen(backlog)  # only now may clients connect: mode and owner are set
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(sock: socket.socket, path: str, mode: int) -> None:
    """Bind with the file created in ``mode`` at once (no window with a wider one): the
    umask decides a socket file's mode. Start-up is single-threaded, so it is ours."""
    if path.startswith("@"):
        sock.bind("\0" + path[1:])
        return
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)


def _stale(path: str) -> bool:
    """Whether the unix socket at ``path`` was left by a process that is gone (nobody
    accepts on it): then it may be replaced. What is not a socket never is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True  # gone meanwhile
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"cannot listen on {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a live server with a full backlog answers EAGAIN
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False
