"""Brokers carry relay messages between wsechod instances; the relay sees only this interface.

``memory`` (the default) is one process on its own. ``redis`` shares channels through Redis
pub/sub. A broker never blocks the relay: publishing queues (``writable()`` asks the relay to
pace its publishers while the queue is long and Redis healthy), and when the broker is down
the instance keeps relaying between its own clients and reports itself ``degraded``.
"""

from collections.abc import Sequence

from wsechod.brokers.base import Broker, Deliver, Members, PresenceUnavailable
from wsechod.brokers.memory import MemoryBroker

__all__ = ["Broker", "Deliver", "Members", "PresenceUnavailable", "create"]


def create(
    url: str,
    *,
    presence_interval: float = 10.0,
    history_memory: int = 64 * 2**20,
    sentinels: Sequence[str] = (),
    sentinel_service: str = "",
    sentinel_password: str = "",
    cluster: bool = False,
) -> Broker:
    """The broker ``url`` names: ``memory`` (keeping at most ``history_memory`` bytes of
    history), or a Redis URL (whose presence entries are written every
    ``presence_interval`` seconds): one server, the primary that the ``sentinels`` name
    for ``sentinel_service``, or a ``cluster`` that the URL's node belongs to."""
    if url == "memory":
        return MemoryBroker(history_memory=history_memory)
    # Imported here: redis-py is an optional extra (wsechod[redis]), needed by this broker
    # only; settings validation has already said so if it is missing.
    from wsechod.brokers.redis import RedisBroker  # noqa: PLC0415
    from wsechod.brokers.topology import Cluster, Sentinel, Single, Topology  # noqa: PLC0415

    topology: Topology = Single(url)
    if sentinels:
        topology = Sentinel(url, sentinels, sentinel_service, sentinel_password)
    elif cluster:
        topology = Cluster(url)
    return RedisBroker(url, topology=topology, presence_interval=presence_interval)
