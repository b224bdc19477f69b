"""``python -m bench.timers``: is one keepalive timer per connection fine at 100,000?

No process here may hold 100,000 connections (20,000 open files at most), so this measures
the timers alone in one uvloop process: 10,000 and then 100,000 of them, each fired and
armed again at its next deadline as the keepalive does (rounded up to a tick), spread over
one interval. uvloop keeps timers in libuv's heap: arming one costs a logarithm of their
number, which from 10,000 to 100,000 is a step of 17 against 13.
"""

import asyncio
import math
import time

import uvloop

from wsechod.engine.connection import KEEPALIVE_TICK

INTERVAL = 2.0  # seconds between a timer's fires (the keepalive's default is 20)


async def measure(count: int) -> tuple[int, float]:
    """Timers fired over two intervals, and CPU seconds per fire and re-arm."""
    loop = asyncio.get_running_loop()
    fired = 0

    def arm(delay: float) -> None:
        due = math.ceil((loop.time() + delay) / KEEPALIVE_TICK) * KEEPALIVE_TICK
        loop.call_at(due, fire)

    def fire() -> None:
        nonlocal fired
        fired += 1
        arm(INTERVAL)

    for i in range(count):
        arm(INTERVAL * i / count)
    await asyncio.sleep(INTERVAL)  # one round to settle
    cpu0, fired0 = time.process_time(), fired
    await asyncio.sleep(2 * INTERVAL)
    fires = fired - fired0
    return fires, (time.process_time() - cpu0) / max(fires, 1)


def main() -> None:
    for count in (10_000, 100_000):
        fires, cpu = uvloop.run(measure(count))
        print(f"{count:>7} timers: {fires} fired, {cpu * 1e6:.2f} µs of CPU per fire and re-arm")


if __name__ == "__main__":
    main()
