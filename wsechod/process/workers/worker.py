"""A worker's side of the scoreboard: it publishes its figures there, and serves the whole
daemon's /metrics page and health from what the main process wrote."""

import http
import os
from collections.abc import Callable

from wsechod.engine import Application, Engine, Reply
from wsechod.log import get_logger
from wsechod.process.workers.scoreboard import (
    DRAINING,
    LISTENING,
    LOOK,
    PUBLISH_INTERVAL,
    RECYCLED,
    RECYCLING,
    SLOT_BYTES,
    STARTING,
    STOPPED,
    Daemon,
    Scoreboard,
)
from wsechod.runtime import metrics
from wsechod.runtime.metrics import CONTENT_TYPE

log = get_logger("wsechod")


class Worker:
    """This process as worker ``index`` of a daemon: publishes its figures, serves the
    daemon's ``/metrics`` page and health."""

    def __init__(
        self,
        scoreboard: Scoreboard,
        index: int,
        gen: int,
        main_pid: int,
        tick: Callable[["Worker"], None],
    ) -> None:
        self.scoreboard, self.index, self.gen = scoreboard, index, gen
        self.main_pid = main_pid
        self.pid = os.getpid()
        self.slot = scoreboard.slot_of(index, gen)
        self.state = STARTING
        self._tick_hook = tick  # called after each publication (the parent check)
        self._engine: Engine | None = None
        self._app: Application | None = None
        self._page: tuple[int, Reply] = (-1, Reply(http.HTTPStatus.OK, ""))
        self._daemon: tuple[int, Daemon] = (-1, Daemon())  # the daemon slot, as last read
        self._too_big = False

    def attach(self, engine: Engine, app: Application) -> None:
        """The engine listens: publish its figures from now on."""
        self._engine, self._app = engine, app
        self.publish()
        self._schedule()

    def listening(self) -> None:
        self.state = LISTENING
        self.publish()
        self._ask_to_look()

    def recycling(self) -> bool:
        """This worker starts its drain. True if it leaves alone: the main process says
        (now, in the daemon's slot) that it does not stop and would start another in this
        one's place at once; then this one must stop accepting, so that newcomers wait in
        the backlog for the other rather than get 503 from this one. Otherwise (the daemon
        stops, the main process is gone or cannot be read, the one this worker replaced
        still drains, the daemon is still starting) it drains as any process does."""
        if self._engine is None or self.state != LISTENING:
            return False
        self.publish()  # DRAINING, now: the main process must not stop it a second time
        if not self._parent_alive():
            return False
        daemon = self.scoreboard.read(self.scoreboard.daemon_slot)
        if daemon is None or daemon.state == DRAINING:
            return False
        if self.pid not in Daemon.from_json(daemon.body).recyclable:
            return False
        self.state = RECYCLING
        self.publish()
        self._ask_to_look()
        return True

    def daemon_draining(self) -> bool:
        """The daemon stops (not this worker alone), or its main process is gone: what
        ``/healthz`` answers."""
        return not self._parent_alive() or self._read_daemon().draining

    def stopped(self) -> None:
        """The last publication, after the drain: nothing counted is lost."""
        self.state = RECYCLED if self.state == RECYCLING else STOPPED
        self.publish()

    def _parent_alive(self) -> bool:
        return os.getppid() == self.main_pid

    def _ask_to_look(self) -> None:
        if self._parent_alive():
            os.kill(self.main_pid, LOOK)

    @property
    def draining(self) -> bool:
        return self._engine is not None and self._engine.draining

    def publish(self) -> None:
        if self._engine is None or self._app is None:
            return
        snap = metrics.snapshot(self._engine, self._app)
        state = DRAINING if self._engine.draining and self.state == LISTENING else self.state
        written = self.scoreboard.write(
            self.slot, snap.to_json(), gen=self.gen, pid=self.pid, state=state
        )
        if not written and not self._too_big:
            self._too_big = True  # cannot happen with the families there are; say it once
            log.error("figures too big to share between workers", limit=SLOT_BYTES)

    def _schedule(self) -> None:
        assert self._engine is not None
        self._engine.loop.call_later(PUBLISH_INTERVAL, self._tick)

    def _tick(self) -> None:
        try:
            self.publish()
            self._tick_hook(self)
        finally:  # whatever happens, keep publishing: a silent worker looks wedged
            self._schedule()

    def page(self) -> Reply:
        """The daemon's ``/metrics`` page, as the main process last rendered it."""
        seq = self.scoreboard.seq(self.scoreboard.page_slot)
        if seq != self._page[0]:
            entry = self.scoreboard.read(self.scoreboard.page_slot)
            if entry is not None:
                body = entry.body.decode()
                self._page = (entry.seq, Reply(http.HTTPStatus.OK, body, content_type=CONTENT_TYPE))
        return self._page[1]

    def degraded(self, app: Application) -> str | None:
        """This worker's own trouble first (fresh; not while it drains: its broker closing
        is not the daemon's trouble), else the daemon's (any worker's broker, a worker not
        running), as the main process last saw it."""
        mine = None if self.draining else app.degraded()
        if mine is not None:
            return mine
        return self._read_daemon().degraded

    def _read_daemon(self) -> "Daemon":
        """The daemon's slot as the main process last wrote it, read again only when it
        has changed (while it is being written: as read before)."""
        seq = self.scoreboard.seq(self.scoreboard.daemon_slot)
        if seq != self._daemon[0]:
            entry = self.scoreboard.read(self.scoreboard.daemon_slot)
            if entry is not None:
                self._daemon = (entry.seq, Daemon.from_json(entry.body, entry.state))
        return self._daemon[1]
