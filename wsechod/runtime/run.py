"""The path every server takes, the command's (``wsechod.process.runner``) and a
``serve_in_thread`` server's: a new uvloop loop, the ``Lifecycle``, ``serve`` until
stopped, leftover tasks ended, the loop closed. (``running`` serves on its caller's loop,
through ``serve`` directly.)"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import uvloop

from wsechod import ratelimit
from wsechod.engine import Listener
from wsechod.log import get_logger
from wsechod.runtime.lifecycle import DrainReport, Lifecycle, serve
from wsechod.settings import Settings

log = get_logger("wsechod")
failures = ratelimit.logger("wsechod")

FINISH_TIMEOUT = 1.0  # seconds for leftover tasks to end once the drain is over


def run(
    settings: Settings,
    listeners: list[Listener],
    *,
    handoff: bool = False,
    attach: Callable[[Lifecycle], AbstractContextManager[Callable[[], None] | None]] | None = None,
) -> DrainReport:
    """Serve ``settings`` on ``listeners`` on a new uvloop loop in this thread until the
    lifecycle is stopped; then drain, end what is left and close the loop.

    ``attach(life)`` is entered as soon as the lifecycle exists and left after the drain:
    the command captures its signals and talks to systemd there, a thread hands the
    lifecycle to whoever will stop it. What it returns on entry, if not None, is called
    once the server listens.
    """
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(_callback_failed)
    try:
        report = loop.run_until_complete(_serve(settings, listeners, handoff, attach))
        finish(loop)
    finally:
        loop.close()
    return report


def _callback_failed(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A callback on our loop raised (an application's timer, a broker's wake-up): a bug,
    but one a client may trigger over and over, so rate-limited like the engine's own
    failures; asyncio's default handler would log every occurrence."""
    exc = context.get("exception")
    if exc is None:
        reason = "no exception"
    else:  # not the message: it names the callback's object, a new one each time
        where = traceback.extract_tb(exc.__traceback__)[-1:]
        at = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
        reason = f"{type(exc).__name__}{at}"
    failures.error(
        "callback failed",
        reason=reason,
        error=str(context.get("message", ""))[:200],
        exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
    )


async def _serve(
    settings: Settings,
    listeners: list[Listener],
    handoff: bool,
    attach: Callable[[Lifecycle], AbstractContextManager[Callable[[], None] | None]] | None,
) -> DrainReport:
    life = Lifecycle(settings)
    with contextlib.nullcontext() if attach is None else attach(life) as ready:
        return await serve(listeners, life, handoff=handoff, ready=ready)


def finish(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left, but wait for it only so long: asyncio.Runner would wait forever
    for a library task that does not end when cancelled (seen: a redis-py write to a busy
    Redis), and a server that was told to stop must stop."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=FINISH_TIMEOUT))
        for task in stuck:
            log.warning("task did not stop; exiting anyway", task=task.get_name())
    loop.run_until_complete(loop.shutdown_asyncgens())
