"""The workers' scoreboard (wsechod/process/workers/scoreboard.py): each slot is a seqlock
with a CRC, so a reader never takes a half-written slot, whoever writes it and whenever it
is read, and a writer killed in the middle of a write leaves a slot that is skipped until
written again."""

import os
import struct

import pytest

from wsechod.process.workers.scoreboard import HEADER_BYTES, Scoreboard

pytestmark = pytest.mark.unit  # in-process: make check runs it

SLOT = 0
_SEQ = struct.Struct("<Q")


def test_a_slot_reads_back_what_was_written() -> None:
    board = Scoreboard(2)
    assert board.write(SLOT, b"figures", gen=3, pid=42, state=1)
    entry = board.read(SLOT)
    assert entry is not None
    assert (entry.body, entry.gen, entry.pid, entry.state) == (b"figures", 3, 42, 1)
    assert entry.seq % 2 == 0


def test_a_write_cut_in_the_middle_is_skipped_until_the_next() -> None:
    """A writer killed mid-write leaves the sequence odd: readers skip the slot."""
    board = Scoreboard(1)
    board.write(SLOT, b"before")
    seq = board.seq(SLOT)
    _SEQ.pack_into(board._map, 0, seq + 1)  # what a writer leaves after its first store
    assert board.read(SLOT) is None
    board.write(SLOT, b"after")
    entry = board.read(SLOT)
    assert entry is not None and entry.body == b"after"


def test_a_body_that_does_not_match_its_crc_is_not_taken() -> None:
    board = Scoreboard(1)
    board.write(SLOT, b"figures")
    board._map[HEADER_BYTES] ^= 0xFF  # a byte of the body, changed behind the seqlock
    assert board.read(SLOT) is None


def test_a_body_too_big_for_its_slot_is_refused_whole() -> None:
    board = Scoreboard(1)
    board.write(SLOT, b"kept")
    assert not board.write(SLOT, bytes(10**7))
    entry = board.read(SLOT)
    assert entry is not None and entry.body == b"kept"


def test_a_reader_never_takes_a_torn_slot_while_another_process_writes() -> None:
    """A forked writer rewrites the slot as fast as it can, each body a different length
    of one repeated byte; every read is either None (being written) or one whole body."""
    board = Scoreboard(1)
    board.write(SLOT, b"\0")
    writes = 20_000
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            for i in range(writes):
                board.write(SLOT, bytes([i % 251]) * (1 + i % 997), gen=i)
        finally:
            os._exit(0)
    whole = skipped = 0
    try:
        while True:
            entry = board.read(SLOT)
            if entry is None:
                skipped += 1
            else:
                whole += 1
                body = entry.body
                assert body == bytes([body[0]]) * len(body), "a torn body"
                if entry.gen == writes - 1:
                    break
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                pid = 0
                final = board.read(SLOT)
                assert final is not None and final.gen == writes - 1
                break
    finally:
        if pid:
            os.waitpid(pid, 0)
    assert whole > 0
    print(f"{whole} whole reads, {skipped} skipped while being written")
