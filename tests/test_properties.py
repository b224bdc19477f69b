"""Properties of the frame parser and the streaming UTF-8 check, tried by Hypothesis on
inputs no hand-written case would think of: the engine in-process, on a transport that
records what it is given (as tests/test_engine_units.py), fed the client's bytes split at
every byte boundary Hypothesis chooses.

- Any sequence of valid frames, made by websockets' own Sans-I/O framing and split
  anywhere, gives the same messages, and a pong for each ping, in order.
- Any byte string gives messages or exactly one close frame with a code a server may
  send, never an exception, and nothing after the close frame.
- A text message is refused (1007) exactly when Python's decoder refuses its bytes,
  however it is fragmented and however its frames arrive.
"""

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from tests.test_engine_units import Transport
from wsechod.engine import Connection, Engine, Family, Figures, Options, Request
from wsechod.engine.connection import WebSocket
from wsechod.engine.frames import valid_peer_code

pytestmark = pytest.mark.unit  # in-process: make check runs it

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_SIZE = 4096
LOOP = asyncio.new_event_loop()  # one for every example: a loop each would be most of the time


class Recorder:
    """An application that keeps what it is given, frame by frame."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool, bool, bool]] = []

    def admit(self, request: Request) -> None:
        return None

    def opened(self, conn: Connection) -> None:
        pass

    def data(self, conn: Connection, payload: bytes, text: bool, first: bool, last: bool) -> None:
        self.frames.append((payload, text, first, last))

    def blocked(self, conn: Connection) -> None:
        pass

    def unblocked(self, conn: Connection) -> None:
        pass

    def closed(self, conn: Connection) -> None:
        pass

    def degraded(self) -> str | None:
        return None

    def families(self) -> tuple[Family, ...]:
        return ()

    def figures(self) -> Figures:
        return Figures()

    def messages(self) -> list[tuple[bytes, bool]]:
        """The whole messages, put together from their frames."""
        out: list[tuple[bytes, bool]] = []
        parts: list[bytes] = []
        for payload, text, first, last in self.frames:
            if first:
                parts = []
            parts.append(payload)
            if last:
                out.append((b"".join(parts), text))
        return out


class Wire(Transport):
    """Also keeps the bytes written, to read the server's frames back."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.high = 2**30  # never full: this is about parsing, not flow control

    def write(self, data: bytes) -> None:
        self.out += data
        super().write(data)

    def frames(self) -> list[tuple[int, bool, bytes]]:
        """The server's frames: (opcode, fin, payload); servers do not mask."""
        out, data, pos = [], bytes(self.out), 0
        while pos < len(data):
            b0, b1 = data[pos], data[pos + 1]
            assert not b1 & 0x80, "the server masked a frame"
            n, pos = b1 & 0x7F, pos + 2
            if n == 126:
                n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
            elif n == 127:
                n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
            out.append((b0 & 0x0F, bool(b0 & 0x80), data[pos : pos + n]))
            pos += n
        return out


def feed(data: bytes, cuts: list[int]) -> tuple[Recorder, Wire]:
    """``data`` from the client in reads cut at ``cuts``; what the application got and
    what the server wrote."""
    app, wire = Recorder(), Wire()

    async def main() -> None:
        engine = Engine(Options(ping_interval=0, max_size=MAX_SIZE), app)
        ws = WebSocket(engine, wire, "/", "peer", None)  # type: ignore[arg-type]
        wire.protocol = ws
        engine.opened(ws)
        at = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            if cut > at:
                ws.data_received(data[at:cut])
                engine.uncork()  # the turn's end: its corked writes go out
                at = cut

    LOOP.run_until_complete(main())
    return app, wire


def pieces(draw: Callable[..., Any], payload: bytes) -> list[bytes]:
    """``payload`` cut into the payloads of a message's frames (at least one)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    bounds = [0, *cuts, len(payload)]
    return [payload[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def conversations(draw: Callable[..., Any]) -> tuple[bytes, list[tuple[bytes, bool]], list[bytes]]:
    """Valid frames from a client (masked, by websockets), the messages they carry, and
    the pings among them, in order."""
    stream, messages, pings = bytearray(), [], []
    for _ in range(draw(st.integers(0, 6))):
        text = draw(st.booleans())
        payload = draw(st.text(max_size=300)).encode() if text else draw(st.binary(max_size=300))
        for i, part in enumerate(parts := pieces(draw, payload)):
            opcode = (Opcode.TEXT if text else Opcode.BINARY) if i == 0 else Opcode.CONT
            stream += Frame(opcode, part, fin=i == len(parts) - 1).serialize(mask=True)
            if draw(st.integers(0, 3)) == 0:  # a ping between fragments, or after
                ping = draw(st.binary(max_size=125))
                stream += Frame(Opcode.PING, ping).serialize(mask=True)
                pings.append(ping)
        messages.append((payload, text))
    return bytes(stream), messages, pings


@SETTINGS
@given(conversations(), st.lists(st.integers(0, 4000), max_size=40))
def test_valid_frames_split_anywhere_give_the_same_messages(
    conversation: tuple[bytes, list[tuple[bytes, bool]], list[bytes]], cuts: list[int]
) -> None:
    stream, messages, pings = conversation
    app, wire = feed(stream, cuts)
    assert app.messages() == messages
    sent = wire.frames()
    assert [payload for opcode, _, payload in sent if opcode == Opcode.PONG] == pings
    assert all(opcode == Opcode.PONG for opcode, _, _ in sent)  # no close, nothing else


@SETTINGS
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=30))
def test_any_bytes_give_messages_or_one_close_never_an_exception(
    data: bytes, cuts: list[int]
) -> None:
    _, wire = feed(data, cuts)  # an exception would fail the test here
    sent = wire.frames()
    closes = [i for i, (opcode, _, _) in enumerate(sent) if opcode == Opcode.CLOSE]
    assert len(closes) <= 1
    if closes:
        assert closes[0] == len(sent) - 1, "frames after the close frame"
        payload = sent[closes[0]][2]
        if payload:  # none: the client's own close without a code, answered so
            assert valid_peer_code(int.from_bytes(payload[:2], "big")), payload


def utf8_like() -> st.SearchStrategy[bytes]:
    """Valid UTF-8, arbitrary bytes, and valid text with a few bytes changed: where
    the interesting cases (truncated and overlong sequences, surrogates) lie."""

    @st.composite
    def damaged(draw: Callable[..., Any]) -> bytes:
        data = bytearray(draw(st.text(min_size=1, max_size=200)).encode())
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0x80, 0xFF))
        return bytes(data)

    return st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200), damaged())


@st.composite
def text_messages(draw: Callable[..., Any]) -> tuple[bytes, bytes]:
    """A text message's payload, and the client's frames carrying it."""
    payload = draw(utf8_like())
    parts = pieces(draw, payload)
    stream = b"".join(
        Frame(Opcode.TEXT if i == 0 else Opcode.CONT, part, fin=i == len(parts) - 1).serialize(
            mask=True
        )
        for i, part in enumerate(parts)
    )
    return payload, stream


@SETTINGS
@given(text_messages(), st.lists(st.integers(0, 300), max_size=30))
def test_the_utf8_check_agrees_with_pythons_decoder_on_every_split(
    message: tuple[bytes, bytes], cuts: list[int]
) -> None:
    payload, stream = message
    app, wire = feed(stream, cuts)
    try:
        payload.decode()
    except UnicodeDecodeError:
        valid = False
    else:
        valid = True
    closes = [payload for opcode, _, payload in wire.frames() if opcode == Opcode.CLOSE]
    if valid:
        assert (app.messages(), closes) == ([(payload, True)], [])
    else:
        assert [int.from_bytes(close[:2], "big") for close in closes] == [1007]
        assert app.messages() == []  # never delivered whole


def test_a_small_text_frame_checked_in_part_then_completed_leaves_no_state() -> None:
    """Found by the first property: a small text frame whose first byte came in one read
    was completed by the parser's inline path, which left the partial check's decoder
    behind; the next text message then failed with 1007."""
    stream = b"".join(
        Frame(opcode, payload, fin=fin).serialize(mask=True)
        for opcode, payload, fin in [
            (Opcode.TEXT, b"\xc2\x80", True),
            (Opcode.TEXT, b"", False),
            (Opcode.CONT, b"", True),
        ]
    )
    app, wire = feed(stream, [2 + 4 + 1])  # the header, the mask and b"\xc2"
    assert app.messages() == [(b"\xc2\x80", True), (b"", True)]
    assert wire.frames() == []
