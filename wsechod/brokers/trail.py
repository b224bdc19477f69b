"""What an instance delivered in a channel with history: where it is, and the ids of the
last ``WINDOW`` messages, so that after a session with Redis starts again it can ask
whether Redis still holds those messages at their offsets (``LOOK``). A failover to a
replica that lagged loses the last few, and another instance can publish on the new
primary before this one looks: its messages then take the lost offsets, and only their
ids show that they are not the ones delivered here (the counter alone is not behind)."""

from array import array

from wsechod.brokers.format import CHAIN
from wsechod.history import Position

WINDOW = 64  # messages a channel's trail remembers: a replica that lagged more loses more


class Trail:
    """One channel: the position delivered up to, the ids of the messages up to it since
    ``start``, and the epochs this instance saw replaced at the same offsets, the newest
    first (what still arrives in them comes again from history in the new one, so it is
    dropped)."""

    __slots__ = ("at", "ids", "retired", "start")

    def __init__(self, at: Position) -> None:
        self.at = at
        self.start = at.offset + 1  # the first offset with an id
        self.ids = array("Q", bytes(8 * WINDOW))
        self.retired: tuple[str, ...] = ()

    def delivered(self, at: Position, message_id: int) -> None:
        offset, last = at[0], self.at  # indexing: cheaper than a NamedTuple's attributes
        if offset != last[0] + 1:
            self.start = offset
        elif at[1] != last[1]:  # the same offsets go on in a new epoch (a new server's)
            self.retire(last[1])
        self.ids[offset % WINDOW] = message_id
        self.at = at

    def moved(self, at: Position) -> None:
        """Now at ``at`` without having delivered it (history had lost it): no ids."""
        self.at = at
        self.start = at.offset + 1

    def retire(self, *epochs: str) -> None:
        self.retired = tuple(dict.fromkeys((*epochs, *self.retired)))[:CHAIN]

    def replaced(self, epoch: str, before: int, *, was: str) -> None:
        """The same offsets go on in ``epoch``, which replaced ``was`` (the trail's own
        epoch, or the one Redis went back to); from ``before`` on, Redis holds other
        messages than were delivered here (the ids below it stay good, those of the
        window's offsets: a slot past them may hold the id of a later offset)."""
        self.retire(self.at.epoch, was)
        at = min(self.at.offset, before - 1)
        # Moved below the window, it starts again from there (its ids come as delivered).
        self.start = min(max(self.start, self.at.offset - WINDOW + 1), at + 1)
        self.at = Position(at, epoch)

    def window(self) -> range:
        """The offsets with an id, the oldest first."""
        return range(max(self.start, self.at.offset - WINDOW + 1), self.at.offset + 1)

    def known(self) -> set[int]:
        """The ids of the messages in the window."""
        return {self.ids[offset % WINDOW] for offset in self.window()} - {0}

    def look(self) -> tuple[str, int, int, bytes, str]:
        """LOOK's arguments: the epoch, the last offset, the window's first, its ids, the
        epochs replaced."""
        window = self.window()
        ids = b"".join(self.ids[x % WINDOW].to_bytes(8, "big") for x in window)
        return self.at.epoch, self.at.offset, window.start, ids, " ".join(self.retired)
