"""What an instance delivered in a channel with history: where it is, and a digest of each
of the last ``WINDOW`` messages, so that after a session with Redis starts again it can
tell whether Redis still holds those messages at their offsets. A failover to a replica
that lagged loses the last few, and another instance can publish on the new primary before
this one looks: its messages then take the lost offsets, and only their content shows
that they are not the ones delivered here (the counter alone is not behind)."""

from array import array
from typing import Any, NamedTuple

from wsechod.brokers.format import TEXT
from wsechod.history import Position

WINDOW = 64  # messages a channel's trail remembers: a replica that lagged more loses more


def digest(payload: bytes, text: bool) -> int:
    """A message's digest, compared only within this process (Python's keyed hash)."""
    return hash(payload) ^ text


class Trail:
    """One channel: the position delivered up to, digests of the messages up to it since
    ``start``, and an epoch replaced by a renumbering (its messages come again renumbered,
    so what still arrives in it is dropped)."""

    __slots__ = ("at", "digests", "retired", "start")

    def __init__(self, at: Position) -> None:
        self.at = at
        self.start = at.offset + 1  # the first offset with a digest
        self.digests = array("q", bytes(8 * WINDOW))
        self.retired: str | None = None

    def delivered(self, at: Position, payload: bytes, text: bool) -> None:
        offset, last = at[0], self.at  # indexing: cheaper than a NamedTuple's attributes
        if offset != last[0] + 1 or at[1] != last[1]:
            self.start = offset
        self.digests[offset % WINDOW] = hash(payload) ^ text  # digest(), inlined
        self.at = at

    def moved(self, at: Position) -> None:
        """Now at ``at`` without having delivered it (history had lost it, or renumbered)."""
        self.at = at
        self.start = at.offset + 1

    def window(self) -> range:
        """The offsets with a digest, the oldest first."""
        return range(max(self.start, self.at.offset - WINDOW + 1), self.at.offset + 1)


class Look(NamedTuple):
    """The ``LOOK`` script's answer: the channel's epoch and last offset, and, read in the
    trail's epoch or in the one that renumbered it, the window's entries by offset."""

    epoch: str
    top: int
    shift: int  # added to the trail's offsets by a renumbering (0: none)
    kept: int  # the renumbering kept offsets from this one on (0: none)
    entries: dict[int, int] | None  # digests by offset; None: another epoch, unrelated


def looked(answer: Any) -> Look | None:
    """The LOOK script's answer as a Look (None: the channel's hash is gone)."""
    if not answer:
        return None
    epoch, top = answer[0].decode(), int(answer[1])
    if len(answer) == 2:
        return Look(epoch, top, 0, 0, None)
    entries = {
        int(entry_id.split(b"-")[0]): digest(fields[1][1:], fields[1][:1] == TEXT)
        for entry_id, fields in answer[4]
    }
    return Look(epoch, top, int(answer[2]), int(answer[3]), entries)


def first_difference(trail: Trail, look: Look) -> int | None:
    """The first offset of the trail's window where Redis holds another message than the
    one delivered, or none though its counter went past it (lost); None if there is none.
    Offsets a renumbering did not keep matched when it was made; trimmed ones are skipped."""
    assert look.entries is not None
    for offset in trail.window():
        if offset < look.kept:
            continue
        there = offset + look.shift
        found = look.entries.get(there)
        if found is None:
            if there > look.top:
                return offset
            continue
        if found != trail.digests[offset % WINDOW]:
            return offset
    return None
