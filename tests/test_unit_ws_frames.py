"""hub/ws_frames.py against wsproto: the same byte streams give the same
messages, however they are cut, and what the fast path does not handle goes
to wsproto from a frame boundary."""

from __future__ import annotations

import random

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from hub import ws_frames
from hub.ws_frames import ClientFrames, FrameTracker, pong_frame, server_frame, unmask


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def server() -> Connection:
    return Connection(ConnectionType.SERVER)


def wsproto_messages(data: bytes) -> list[object]:
    """The whole messages (and pings) wsproto's server reads from `data`."""
    out: list[object] = []
    text: list[str] = []
    binary: list[bytes] = []
    s = server()
    s.receive_data(data)
    for event in s.events():
        if isinstance(event, TextMessage):
            text.append(event.data)
            if event.message_finished:
                out.append("".join(text))
                text = []
        elif isinstance(event, BytesMessage):
            binary.append(bytes(event.data))
            if event.message_finished:
                out.append(b"".join(binary))
                binary = []
        elif isinstance(event, Ping):
            out.append(ws_frames.Ping(bytes(event.payload)))
    return out


def feed_all(frames: ClientFrames, chunks: list[bytes]) -> tuple[list[object], bytes]:
    messages: list[object] = []
    rest = b""
    for chunk in chunks:
        got, more = frames.feed(chunk)
        messages += got
        rest += more or b""
    return messages, rest


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, 300)
        chunks.append(data[i : i + n])
        i += n
    return chunks


def test_whole_messages_as_wsproto_reads_them_however_the_stream_is_cut() -> None:
    rng = random.Random(7)
    c = client()
    data = b""
    for i in range(200):
        size = rng.choice([0, 1, 125, 126, 127, 300, 65535, 65536, 70000])
        if i % 3:
            data += c.send(TextMessage(data="é" * (size // 2) + str(i)))
        else:
            data += c.send(BytesMessage(data=bytes(rng.getrandbits(8) for _ in range(min(size, 2000)))))
        if i % 17 == 0:
            data += c.send(Ping(payload=b"p%d" % i))
    whole, rest = feed_all(ClientFrames(limit=1 << 20), [data])
    assert rest == b""
    assert whole == wsproto_messages(data)
    pieces, rest = feed_all(ClientFrames(limit=1 << 20), cut(data, rng))
    assert rest == b""
    assert pieces == whole


def test_frames_that_come_a_byte_at_a_time_are_read_whole() -> None:
    # Each header form (7-bit, 16-bit and 64-bit lengths) cut at every byte;
    # the frame is joined once, when its last byte comes (not at every read).
    c = client()
    data = b"".join(
        c.send(TextMessage(data="x" * size)) for size in (0, 5, 125, 126, 300, 65536, 70000)
    ) + c.send(Ping(payload=b"end"))
    frames = ClientFrames(limit=1 << 20)
    messages, rest = feed_all(frames, [data[i : i + 1] for i in range(len(data))])
    assert rest == b""
    assert messages == wsproto_messages(data)
    # The start of a frame gathered so far goes to wsproto whole.
    assert frames.feed(data[:3]) == ([], None)
    assert frames.feed(data[3:4]) == ([], None)
    assert frames.stop() == data[:4]


@pytest.mark.parametrize(
    "odd",
    [
        CloseConnection(code=CloseReason.NORMAL_CLOSURE),
        TextMessage(data="first half", message_finished=False),
        TextMessage(data="x" * (ws_frames.FAST_FRAME_LIMIT + 1)),  # over the fast path's limit
    ],
)
def test_a_frame_it_does_not_handle_goes_to_wsproto_with_everything_after_it(odd: object) -> None:
    c = client()
    before = c.send(TextMessage(data="one")) + c.send(Ping(payload=b"hi")) + c.send(BytesMessage(data=b"\x00two"))
    after = c.send(odd)  # type: ignore[arg-type]
    if isinstance(odd, TextMessage) and not odd.message_finished:
        after += c.send(TextMessage(data=" and the rest"))
    after += c.send(TextMessage(data="three")) if not isinstance(odd, CloseConnection) else b""
    frames = ClientFrames()
    messages, rest = feed_all(frames, [before[:5], before[5:] + after[:3], after[3:]])
    assert messages == ["one", ws_frames.Ping(b"hi"), b"\x00two"]
    assert rest == after
    assert frames.handed_over
    # wsproto, given only what was handed over, reads it as if it had read all along.
    assert wsproto_messages(rest) == wsproto_messages(before + after)[3:]
    # And everything after that is wsproto's too.
    assert frames.feed(b"more") == ([], b"more")


def test_pongs_are_dropped_and_invalid_utf8_is_wsproto_s_to_refuse() -> None:
    c = client()
    pong = c.send(Ping(payload=b"x").response())
    bad = bytearray(c.send(TextMessage(data="ab")))
    # The payload is masked: flip it to bytes that are not UTF-8 (0xff).
    mask = bytes(bad[2:6])
    bad[6:8] = unmask(b"\xff\xff", mask)
    messages, rest = ClientFrames().feed(pong + bytes(bad))
    assert messages == []
    assert rest == bytes(bad)
    s = server()
    s.receive_data(rest)
    assert any(isinstance(e, CloseConnection) and e.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA for e in s.events())


def test_a_frame_held_when_the_fast_path_stops_goes_to_wsproto() -> None:
    data = client().send(TextMessage(data="held"))
    frames = ClientFrames()
    assert frames.feed(data[:4]) == ([], None)
    assert frames.stop() + data[4:] == data
    assert frames.feed(b"x") == ([], b"x")


def test_the_servers_frames_are_what_wsproto_writes() -> None:
    s = server()
    for text in ["", "a" * 125, "é" * 63, "b" * 126, "c" * 65535, "d" * 65536]:
        assert server_frame(text) == s.send(TextMessage(data=text))
    assert pong_frame(b"ping!") == s.send(Ping(payload=b"ping!").response())


def _client_frame(payload: bytes, *, fin: bool = True, opcode: int = 0x1) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def test_the_frame_tracker_says_what_is_still_to_come_however_the_bytes_are_split() -> None:
    """Frames of each header form (7-bit, 16-bit, 64-bit length), fed in
    pieces of every size: after each piece, to_come is what the current
    frame's header announced and has not come yet."""
    sizes = [0, 5, 125, 126, 300, 65535, 65536, 70000]
    stream = b"".join(_client_frame(b"x" * n, fin=i % 2 == 0) for i, n in enumerate(sizes))
    # The expected value after each byte, from the frames' layout.
    expected = []
    for n in sizes:
        head = 2 + (2 if 126 <= n < 65536 else 8 if n >= 65536 else 0) + 4
        expected += [0] * (head - 1) + [n]  # header incomplete, then whole
        expected += list(range(n - 1, -1, -1))
    assert len(expected) == len(stream)
    for piece in (1, 2, 3, 7, 100, 4096, len(stream)):
        tracker = FrameTracker()
        for at in range(0, len(stream), piece):
            tracker.feed(stream[at : at + piece])
            assert tracker.to_come == expected[min(at + piece, len(stream)) - 1], (piece, at)
