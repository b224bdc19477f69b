"""A worker, after the fork: it leaves the main process's concerns behind (systemd's
variables, the pidfile's lock, the other workers' sockets), asks to be stopped with the
main process, and runs what a single process runs (``runner.run``) on its sockets. It never
returns into the main process's stack, which would remove its pidfile and socket files."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
from typing import TYPE_CHECKING, NoReturn

from wsechod.log import get_logger
from wsechod.process import fds, logs, runner
from wsechod.process.workers.restarts import Slot
from wsechod.process.workers.worker import Worker

if TYPE_CHECKING:
    from wsechod.process.workers.supervisor import Supervisor

log = get_logger("wsechod")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def serve(supervisor: Supervisor, slot: Slot) -> NoReturn:
    """Worker ``slot`` of ``supervisor``'s, in the forked process: serve, then exit."""
    status = 1
    worker: Worker | None = None
    try:
        die_with_parent(supervisor.pid)
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # may log to the terminal
        runner.catch_early_signals()
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(key, None)  # systemd hears from the main process only
        supervisor.notifier.close()
        mine = supervisor.bound.group(slot.index)
        for sock in supervisor.bound.sockets:
            if sock not in mine:
                sock.close()
        fds.close_private()  # the pidfile's lock, the daemon launcher's pipe
        logs.tag(worker=slot.index)
        check = functools.partial(orphan_check, supervisor.pid)
        worker = Worker(supervisor.scoreboard, slot.index, slot.gen, supervisor.pid, check)
        signal.pthread_sigmask(signal.SIG_SETMASK, supervisor.mask)
        status = runner.run(
            supervisor.settings,
            supervisor.bound.listeners(slot.index),
            worker.listening,
            supervisor.handoff,
            supervisor.scoreboard.handed_down,  # a reload: what the main process read
            worker=worker,
            tls=supervisor.tls,
        )
        worker.stopped()
    except BaseException:
        log.exception("worker failed", worker=slot.index)
    finally:
        logging.shutdown()
        os._exit(status)


def orphan_check(main_pid: int, worker: Worker) -> None:
    """Each second, in a worker: the main process is gone (and PR_SET_PDEATHSIG did not
    say so): stop, as it would have."""
    if os.getppid() != main_pid and not worker.draining:
        log.warning("main process gone: stopping", main_pid=main_pid)
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent: int) -> None:
    """Be sent SIGTERM (a graceful stop) when the main process dies, even by SIGKILL; if
    it died already, go."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        error = os.strerror(ctypes.get_errno())
        log.warning("cannot ask to be stopped with the main process", error=error)
    if os.getppid() != parent:
        os._exit(0)
