"""The main process's wait: its signals blocked, taken one at a time with ``sigwaitinfo``,
and an interval timer (SIGALRM) for the next thing due."""

import signal

from wsechod.process import runner
from wsechod.process.workers.scoreboard import LOOK

ALARM = signal.SIGALRM  # the loop's timer: the next thing due
SIGNALS = {*runner.HANDLED_SIGNALS, signal.SIGCHLD, LOOK, ALARM}


def wait(timeout: float) -> int | None:
    """The next of SIGNALS (blocked), or None once ``timeout`` seconds have passed.

    Not ``signal.sigtimedwait``: interrupted by a stop and continue (SIGSTOP, SIGCONT)
    past its deadline, CPython 3.11's returns a siginfo that the kernel never filled
    (whatever an earlier call left there: a crash, or a signal nobody sent). Its
    ``sigwaitinfo`` retries on EINTR; the interval timer bounds the wait."""
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-6))
    try:
        signum = signal.sigwaitinfo(SIGNALS).si_signo
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None if signum == ALARM else signum  # a late alarm, left pending: a pass more


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal
        return f"signal {signum}"
