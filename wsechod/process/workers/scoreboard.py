"""What the processes of a daemon with several workers share: one block of memory.

The main process maps it (anonymous, shared) before it forks the workers, so each inherits
it. It holds two slots per worker, where the worker publishes its figures (a ``Snapshot``,
the same plain counts ``/metrics`` reads) every PUBLISH_INTERVAL from a timer on its event
loop (successive starts of a worker alternate between its two: one that drains on its own
goes on counting while its replacement serves), and two slots the main process writes
every RENDER_INTERVAL: the ``/metrics`` page of the whole daemon, rendered from the
workers' slots, and the daemon's: its health, whether it stops, and which workers may be
recycled alone (stop accepting and be replaced at once when told to stop). One more holds
the settings a reload read: the main process reads them once and every worker applies
those, so that a file changed meanwhile cannot give workers different ones. Whichever
worker a scrape or a health check lands on serves those, so every answer is the daemon's,
and one process renders: successive pages never go back, whichever worker serves them.
The price is staleness: the page is at most PUBLISH_INTERVAL + RENDER_INTERVAL old.

Each slot is a seqlock (a sequence number, odd while written) with a CRC of its body, so a
reader never takes a half-written slot, and a writer killed mid-write leaves a slot that is
skipped until it is written again. Nothing here waits: a slot that cannot be read now is
taken from the last read, or left out.
"""

import dataclasses
import json
import mmap
import signal
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsechod.log import get_logger
from wsechod.settings import KEYS, TABLE_KEYS, Loaded, Settings

log = get_logger("wsechod")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's publications
RENDER_INTERVAL = 0.5  # seconds between the main process's renders
SLOT_BYTES = 128 * 1024  # a worker's snapshot: a few KiB; each close code pair is a key
PAGE_BYTES = 1024 * 1024  # the rendered page
DAEMON_BYTES = 64 * 1024
SETTINGS_BYTES = 1024 * 1024  # a reload's settings (JSON: about 2 KiB, more with long lists)
READ_ATTEMPTS = 5

# seq (odd while written), gen (which start of the worker), pid, state, length, crc,
# monotonic time of the write
_HEADER = struct.Struct("<QQqIIId")
_SEQ = struct.Struct("<Q")
# The header after its sequence number: written apart, because struct.pack_into zeroes
# what it packs into first, and a sequence number of 0 for a moment is an even one: a
# reader would take the zeroed header for a whole, empty slot.
_FIELDS = struct.Struct("<QqIIId")
HEADER_BYTES = 64

# A worker's state, in its slot: RECYCLING and RECYCLED are a drain of its own (recycled: it
# stopped accepting, another takes its sockets), DRAINING and STOPPED any other.
STARTING, LISTENING, DRAINING, STOPPED, RECYCLING, RECYCLED = range(6)
# From a worker to the main process: look at the board (I listen, or I leave).
LOOK = signal.SIGUSR2


@dataclass(frozen=True, slots=True)
class Entry:
    """One slot as last written."""

    seq: int
    gen: int
    pid: int
    state: int
    updated: float  # time.monotonic() of the write (the same clock in every process)
    body: bytes


class Scoreboard:
    """The shared block: two slots per worker, then the page, the daemon's, the settings."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.worker_slots = 2 * workers
        self.page_slot, self.daemon_slot = self.worker_slots, self.worker_slots + 1
        self.settings_slot = self.worker_slots + 2
        self._sizes = [SLOT_BYTES] * self.worker_slots + [PAGE_BYTES, DAEMON_BYTES, SETTINGS_BYTES]
        self._offsets = [0]
        for size in self._sizes:
            self._offsets.append(self._offsets[-1] + HEADER_BYTES + size)
        # Anonymous and MAP_SHARED: children forked after this see the same pages. Only
        # the pages written are ever backed by memory.
        self._map = mmap.mmap(-1, self._offsets[-1])

    @staticmethod
    def slot_of(index: int, gen: int) -> int:
        """Where start ``gen`` of worker ``index`` publishes."""
        return 2 * index + gen % 2

    def write(self, slot: int, body: bytes, *, gen: int = 0, pid: int = 0, state: int = 0) -> bool:
        """Replace a slot; False (nothing written) if ``body`` does not fit."""
        if len(body) > self._sizes[slot]:
            return False
        at, m = self._offsets[slot], self._map
        seq = _SEQ.unpack_from(m, at)[0]
        begin = seq + 1 if seq % 2 == 0 else seq + 2  # odd: a writer died mid-write before
        _SEQ.pack_into(m, at, begin)
        start = at + HEADER_BYTES
        m[start : start + len(body)] = body
        _FIELDS.pack_into(
            m, at + _SEQ.size, gen, pid, state, len(body), zlib.crc32(body), time.monotonic()
        )
        _SEQ.pack_into(m, at, begin + 1)
        return True

    def hand_down(self, loaded: Loaded | None) -> bool:
        """The settings a reload read, for the workers (None: none to apply, the main
        process said why); False if they do not fit. As data (JSON), never code: every
        worker maps this block writable, and one must not be able to run code in the
        others through it."""
        if loaded is None:
            return self.write(self.settings_slot, b"null")
        body = {
            "settings": dataclasses.asdict(loaded.settings),
            "sources": dict(loaded.sources),
            "config_path": None if loaded.config_path is None else str(loaded.config_path),
        }
        return self.write(self.settings_slot, json.dumps(body).encode())

    def handed_down(self) -> Loaded | None:
        """What a worker applies on a reload: the settings the main process read last, or
        None (none read, none could be, or the slot cannot be read: said in the log)."""
        entry = self.read(self.settings_slot)
        if entry is None:
            log.error("settings handed down unreadable: the old ones stay")
            return None
        raw = json.loads(entry.body) if entry.body else None
        if raw is None:
            return None
        values: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in raw["settings"].items()
        }
        for key in TABLE_KEYS:  # tables came as lists of objects
            values[key] = next(f for f in KEYS if f.name == key).metadata["table"](values[key])
        path = raw["config_path"]
        return Loaded(Settings(**values), raw["sources"], None if path is None else Path(path))

    def seq(self, slot: int) -> int:
        """Changes whenever the slot is written: what a reader compares with its copy."""
        return int(_SEQ.unpack_from(self._map, self._offsets[slot])[0])

    def read(self, slot: int) -> Entry | None:
        """The slot, whole and consistent; None if it is being written (or was left half
        written by a writer that died)."""
        at, m = self._offsets[slot], self._map
        for _ in range(READ_ATTEMPTS):
            seq, gen, pid, state, length, crc, updated = _HEADER.unpack_from(m, at)
            if seq % 2 or length > self._sizes[slot]:
                time.sleep(0)  # let the writer finish
                continue
            start = at + HEADER_BYTES
            body = m[start : start + length]
            if _SEQ.unpack_from(m, at)[0] == seq and zlib.crc32(body) == crc:
                return Entry(seq, gen, pid, state, updated, body)
        return None


@dataclass(frozen=True, slots=True)
class Daemon:
    """What the main process says of the whole daemon, in its slot."""

    degraded: str | None = None  # what /healthz reports missing
    recyclable: frozenset[int] = frozenset()  # pids of the workers that may be recycled
    draining: bool = False  # the slot's state: DRAINING

    def to_json(self) -> bytes:
        body = {"degraded": self.degraded, "recyclable": sorted(self.recyclable)}
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, body: bytes, state: int = LISTENING) -> "Daemon":
        raw = json.loads(body) if body else {}
        recyclable = frozenset(raw.get("recyclable", ()))
        return cls(raw.get("degraded"), recyclable, state == DRAINING)
