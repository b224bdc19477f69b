"""systemd integration without libsystemd: the notify protocol and socket activation.

Both are small, stable wire contracts (sd_notify(3), sd_listen_fds(3)): a datagram of
``KEY=value`` lines to ``$NOTIFY_SOCKET``, and listening sockets handed over as file
descriptors 3, 4, ... with ``$LISTEN_PID``/``$LISTEN_FDS``/``$LISTEN_FDNAMES``.
"""

import os
import socket
import time
from collections.abc import MutableMapping

from wsechod.log import get_logger

log = get_logger("wsechod")

LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The sockets systemd passed cannot be served; one line for the operator."""


class Notifier:
    """Sends state changes to the service manager; does nothing outside systemd."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._failing = False
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # The watchdog is ours only if systemd meant this process (sd_watchdog_enabled).
        usec = env.get("WATCHDOG_USEC", "")
        wanted_pid = env.get("WATCHDOG_PID", "")
        mine = not wanted_pid or wanted_pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else None
        )

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: object) -> None:
        """``send(READY=1, STATUS="...")``; a lost notification is logged, never fatal."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            # Never block the event loop on a manager that is not reading.
            self._socket.sendto(message.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            if not self._failing:  # once per outage, not once per ping
                log.warning("sd_notify failed", socket=self._address, error=exc.strerror)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def describe_activation(environ: MutableMapping[str, str] | None = None) -> str | None:
    """What ``listen_fds`` would take, for --check-config; None when not socket-activated."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return None
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "")
    return f"{count} socket(s) from systemd socket activation" + (f" ({names})" if names else "")


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
) -> list[tuple[socket.socket, str]] | None:
    """The listening sockets systemd passed to this process with the names it gave them
    (``FileDescriptorName=``; "" if none), or None if it passed none.

    The variables are removed afterwards, as sd_listen_fds(unset_environment=1) does, so
    that nothing this process starts believes the sockets are its own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    raw = env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not raw.isdigit() or int(raw) == 0:
        raise ActivationError(f"socket activation: invalid LISTEN_FDS={raw!r}")
    labels = names.split(":") if names else []
    sockets = []
    for i in range(int(raw)):
        fd = LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) else f"fd {fd}"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"socket activation: {name}: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ActivationError(
                f"socket activation: {name} is not a listening stream socket "
                "(use ListenStream= in the .socket unit)"
            )
        sock.setblocking(False)
        os.set_inheritable(fd, False)
        sockets.append((sock, labels[i] if i < len(labels) else ""))
    return sockets
