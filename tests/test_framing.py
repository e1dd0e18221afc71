"""FrameDecoder: multiprocessing.connection frames out of a byte stream, with no I/O.

The stdlib's ``Connection.send_bytes`` / ``recv_bytes`` are the reference for the
wire format, so the decoder is cross-checked against them over a real socket pair.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from rpc.errors import MessageTooLarge, ProtocolError
from rpc.framing import FrameDecoder, ReceiveBudget, frame_header, read_header


def short(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def long(payload: bytes) -> bytes:
    """The -1 + 8-byte header, which the stdlib uses past 2 GiB and accepts at any size."""
    return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames: list[bytes] = []
    for _ in range(10_000):  # bounded: a decoder bug must not hang the suite
        frame = decoder.next()
        if frame is None:
            return frames
        frames.append(frame)
    raise AssertionError("the decoder never ran out of frames")


def decode(stream: bytes, max_bytes: int = 1 << 20, *, chunks: Iterator[bytes] | None = None) -> list[bytes]:
    """Every frame of ``stream`` fed in ``chunks`` (default: all at once), fast path included."""
    decoder = FrameDecoder(max_bytes)
    frames: list[bytes] = []
    for chunk in chunks if chunks is not None else iter([stream]):
        whole = decoder.feed(chunk)
        if whole is not None:
            frames.append(whole)
            assert decoder.next() is None  # the fast path leaves nothing behind
        frames.extend(drain(decoder))
    assert decoder.buffered == 0
    return frames


PAYLOADS = [b"", b"x", b"hello", bytes(range(256)), os.urandom(1000), b"\x00" * 3]


# -- headers -----------------------------------------------------------------------


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: f"{len(p)}B")
@pytest.mark.parametrize("encode", [short, long])
def test_one_frame_whole(payload: bytes, encode: object) -> None:
    assert callable(encode)
    assert decode(encode(payload)) == [payload]


def test_short_frame_takes_the_fast_path_uncopied_into_the_buffer() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(short(b"abc")) == b"abc"
    assert decoder.buffered == 0
    assert decoder.next() is None


def test_long_header_never_takes_the_fast_path() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(long(b"abc")) is None
    assert decoder.next() == b"abc"
    assert decoder.next() is None


def test_no_fast_path_when_bytes_are_already_buffered() -> None:
    decoder = FrameDecoder(100)
    first = short(b"first")
    assert decoder.feed(first[:2]) is None
    # The rest of the first frame plus a whole second: nothing may jump the queue.
    assert decoder.feed(first[2:]) is None
    assert decoder.feed(short(b"second")) is None
    assert drain(decoder) == [b"first", b"second"]


def test_no_fast_path_for_more_or_less_than_one_frame() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(short(b"a") + short(b"b")) is None
    assert drain(decoder) == [b"a", b"b"]
    assert decoder.feed(short(b"abc")[:-1]) is None
    assert decoder.next() is None
    assert decoder.feed(b"c") is None
    assert drain(decoder) == [b"abc"]


def test_empty_frames() -> None:
    assert decode(short(b"")) == [b""]
    assert decode(short(b"") * 5) == [b""] * 5
    assert decode(long(b"") + short(b"") + long(b"")) == [b""] * 3
    decoder = FrameDecoder(0)  # a zero limit still lets empty frames through
    assert decoder.feed(short(b"")) == b""


def test_frame_header_matches_the_stdlib_choice_of_header() -> None:
    assert frame_header(0) == struct.pack("!i", 0)
    assert frame_header(0x7FFFFFFF) == struct.pack("!i", 0x7FFFFFFF)
    assert frame_header(0x80000000) == struct.pack("!i", -1) + struct.pack("!Q", 0x80000000)
    payload = b"payload"
    assert decode(frame_header(len(payload)) + payload) == [payload]


# -- splitting and joining ---------------------------------------------------------


def test_several_frames_in_one_feed() -> None:
    stream = b"".join(short(p) for p in PAYLOADS) + b"".join(long(p) for p in PAYLOADS)
    assert decode(stream) == PAYLOADS + PAYLOADS


@pytest.mark.parametrize("encode", [short, long])
def test_split_at_every_byte_boundary(encode: object) -> None:
    assert callable(encode)
    frames = [b"alpha", b"", b"gamma" * 7]
    stream = b"".join(encode(f) for f in frames) + short(b"tail")
    for cut in range(len(stream) + 1):
        assert decode(stream, chunks=iter([stream[:cut], stream[cut:]])) == frames + [b"tail"], cut


def test_split_at_every_pair_of_boundaries() -> None:
    stream = short(b"one") + long(b"two") + short(b"")
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            chunks = iter([stream[:i], stream[i:j], stream[j:]])
            assert decode(stream, chunks=chunks) == [b"one", b"two", b""], (i, j)


def test_one_byte_at_a_time() -> None:
    frames = [os.urandom(n) for n in (0, 1, 4, 11, 12, 300)]
    stream = b"".join((short if i % 2 else long)(f) for i, f in enumerate(frames))
    chunks = iter([stream[i : i + 1] for i in range(len(stream))])
    assert decode(stream, chunks=chunks) == frames


def test_next_waits_for_the_rest_of_a_frame() -> None:
    decoder = FrameDecoder(100)
    stream = short(b"0123456789")
    decoder.feed(stream[:6])
    for _ in range(3):  # asking again changes nothing
        assert decoder.next() is None
    assert decoder.buffered == 6
    decoder.feed(stream[6:])
    assert decoder.next() == b"0123456789"
    assert decoder.buffered == 0


# -- limits and malformed headers --------------------------------------------------


def test_max_bytes_is_inclusive() -> None:
    assert decode(short(b"x" * 10), max_bytes=10) == [b"x" * 10]
    assert decode(long(b"x" * 10), max_bytes=10) == [b"x" * 10]


@pytest.mark.parametrize("encode", [short, long])
def test_too_large_is_refused_from_the_header_alone(encode: object) -> None:
    assert callable(encode)
    header = encode(b"x" * 11)[:-11]
    decoder = FrameDecoder(10)
    assert decoder.feed(header) is None
    with pytest.raises(MessageTooLarge) as caught:
        decoder.next()
    assert caught.value.size == 11  # type: ignore[attr-defined]
    assert isinstance(caught.value, ProtocolError)


@pytest.mark.parametrize("size", [2**31 - 1, 2**40, 2**64 - 1])
def test_huge_announced_sizes_are_refused_before_any_payload(size: int) -> None:
    """Nothing is allocated for the announced size: only the header is ever buffered."""
    header = struct.pack("!i", size) if size < 2**31 else struct.pack("!i", -1) + struct.pack("!Q", size)
    decoder = FrameDecoder(1 << 20)
    decoder.feed(header)
    with pytest.raises(MessageTooLarge) as caught:
        decoder.next()
    assert caught.value.size == size  # type: ignore[attr-defined]
    assert decoder.buffered == len(header)


def test_too_large_whole_frame_in_one_feed_is_not_returned_by_the_fast_path() -> None:
    decoder = FrameDecoder(2)
    assert decoder.feed(short(b"abc")) is None
    with pytest.raises(MessageTooLarge):
        decoder.next()


def test_too_large_after_good_frames_in_the_same_feed() -> None:
    decoder = FrameDecoder(5)
    decoder.feed(short(b"ok") + short(b"fine") + short(b"far too long"))
    assert decoder.next() == b"ok"
    assert decoder.next() == b"fine"
    with pytest.raises(MessageTooLarge) as caught:
        decoder.next()
    assert caught.value.size == len(b"far too long")  # type: ignore[attr-defined]


def test_max_bytes_may_change_between_frames() -> None:
    """The handshake holds a frame to 256 bytes, then requests may be larger (or smaller)."""
    decoder = FrameDecoder(4)
    decoder.feed(short(b"tiny") + short(b"a bigger frame") + short(b"12345"))
    assert decoder.next() == b"tiny"
    with pytest.raises(MessageTooLarge):
        decoder.next()  # refused under the old limit; the bytes stay where they were
    decoder.max_bytes = 100
    assert decoder.next() == b"a bigger frame"
    decoder.max_bytes = 4
    with pytest.raises(MessageTooLarge):
        decoder.next()
    decoder.max_bytes = 5
    assert decoder.next() == b"12345"
    # The fast path follows the new limit too.
    assert decoder.feed(short(b"123456")) is None
    with pytest.raises(MessageTooLarge):
        decoder.next()


@pytest.mark.parametrize("length", [-2, -3, -(2**31)])
def test_negative_length_is_a_protocol_error(length: int) -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(struct.pack("!i", length) + b"\x00" * 8) is None
    with pytest.raises(ProtocolError) as caught:
        decoder.next()
    assert not isinstance(caught.value, MessageTooLarge)


def test_negative_length_after_good_frames() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(short(b"good") + struct.pack("!i", -7))
    assert decoder.next() == b"good"
    with pytest.raises(ProtocolError):
        decoder.next()


def test_minus_one_waits_for_its_eight_byte_length() -> None:
    stream = long(b"payload")
    for end in range(1, 12):  # the header alone, cut anywhere
        decoder = FrameDecoder(100)
        decoder.feed(stream[:end])
        assert decoder.next() is None, end
        decoder.feed(stream[end:])
        assert decoder.next() == b"payload"


# -- the stdlib is the reference ---------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A stdlib Connection writing to a plain socket that the test reads raw."""
    left, right = socket.socketpair()
    right.settimeout(10)  # a bug fails the test instead of hanging it
    connection = Connection(left.detach())
    try:
        yield connection, right
    finally:
        connection.close()
        right.close()


def receive_all(sock: socket.socket, decoder: FrameDecoder, count: int) -> list[bytes]:
    """Read ``sock`` until ``count`` frames came out of ``decoder``."""
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(1 << 16)
        assert data, "the stdlib side closed early"
        whole = decoder.feed(data)
        if whole is not None:
            frames.append(whole)
        frames.extend(drain(decoder))
    return frames


def test_decodes_what_the_stdlib_sends(pair: tuple[Connection, socket.socket]) -> None:
    connection, sock = pair
    # Around the stdlib's 16384-byte switch from one write to header-then-payload.
    payloads = [b"", b"a", os.urandom(16384), os.urandom(16385), os.urandom(100_000), b"end"]
    for payload in payloads:
        connection.send_bytes(payload)
    assert receive_all(sock, FrameDecoder(1 << 20), len(payloads)) == payloads


def test_decodes_the_stdlib_sending_slices(pair: tuple[Connection, socket.socket]) -> None:
    connection, sock = pair
    data = bytes(range(256)) * 4
    connection.send_bytes(data, 10, 100)
    connection.send_bytes(data, 1000)
    assert receive_all(sock, FrameDecoder(1 << 20), 2) == [data[10:110], data[1000:]]


def test_stdlib_bytes_fed_one_at_a_time_decode_the_same(pair: tuple[Connection, socket.socket]) -> None:
    connection, sock = pair
    payloads = [b"x" * n for n in (0, 1, 3, 4, 5, 255, 256, 257)]
    for payload in payloads:
        connection.send_bytes(payload)
    connection.close()
    stream = bytearray()
    for _ in range(1000):
        data = sock.recv(1 << 16)
        if not data:
            break
        stream += data
    chunks = iter([bytes(stream[i : i + 1]) for i in range(len(stream))])
    assert decode(bytes(stream), chunks=chunks) == payloads


def test_stdlib_reads_what_the_decoder_reads(pair: tuple[Connection, socket.socket]) -> None:
    """Both header forms, written raw, read the same by the stdlib and by the decoder."""
    connection, sock = pair
    stream = short(b"one") + long(b"two") + short(b"") + long(os.urandom(5000)) + frame_header(3) + b"end"
    sock.sendall(stream)
    expected = decode(stream)
    assert [connection.recv_bytes() for _ in expected] == expected


def test_the_stdlib_limit_and_the_decoder_limit_agree(pair: tuple[Connection, socket.socket]) -> None:
    """recv_bytes(maxlength) refuses exactly the frames the decoder refuses (from the header)."""
    connection, sock = pair
    for size in (9, 10, 11):
        sock.sendall(short(b"y" * size))
        if size <= 10:
            assert connection.recv_bytes(10) == b"y" * size
            assert decode(short(b"y" * size), max_bytes=10) == [b"y" * size]
        else:
            with pytest.raises(MessageTooLarge):
                decode(short(b"y" * size), max_bytes=10)
            with pytest.raises(OSError, match="bad message length"):
                connection.recv_bytes(10)


# -- the receive budget: large frames under way share a bound in bytes ------------------------


def _large_frame(size: int) -> bytes:
    return struct.pack("!i", size) + bytes(size)


def test_a_large_frame_takes_its_size_from_the_budget_until_it_is_whole():
    budget = ReceiveBudget(200_000)
    decoder = FrameDecoder(1 << 20, budget=budget)
    frame = _large_frame(150_000)
    decoder.feed(frame[:1000])
    assert decoder.next() is None
    assert budget.used == 150_000
    decoder.feed(frame[1000:])
    assert budget.used == 0
    assert decoder.next() == bytes(150_000)


def test_a_frame_that_does_not_fit_waits_and_is_taken_once_room_is_given_back():
    released = []
    budget = ReceiveBudget(200_000, released=lambda: released.append(True))
    first, second = FrameDecoder(1 << 20, budget=budget), FrameDecoder(1 << 20, budget=budget)
    a, b = _large_frame(150_000), _large_frame(100_000)
    first.feed(a[:1000])
    assert first.next() is None
    second.feed(b[:1000])
    assert second.next() is None and second.waiting  # 150,000 + 100,000 > 200,000
    assert budget.used == 150_000
    first.feed(a[1000:])
    assert released == [True] and budget.used == 0
    assert second.next() is None and not second.waiting  # room now: it receives in place
    assert budget.used == 100_000
    second.feed(b[1000:])
    assert second.next() == bytes(100_000)
    assert budget.used == 0


def test_one_frame_larger_than_the_budget_is_still_received_when_nothing_else_is():
    budget = ReceiveBudget(100_000)
    decoder = FrameDecoder(1 << 20, budget=budget)
    frame = _large_frame(300_000)
    decoder.feed(frame[:1000])
    assert decoder.next() is None and not decoder.waiting
    decoder.feed(frame[1000:])
    assert decoder.next() == bytes(300_000)


def test_a_stream_that_ends_mid_frame_gives_its_room_back():
    budget = ReceiveBudget(1 << 20)
    decoder = FrameDecoder(1 << 20, budget=budget)
    decoder.feed(_large_frame(500_000)[:1000])
    assert decoder.next() is None and budget.used == 500_000
    decoder.abandon()
    assert budget.used == 0
    decoder.abandon()  # twice is harmless
    assert budget.used == 0


def test_small_frames_never_touch_the_budget():
    budget = ReceiveBudget(1)
    budget.take(1)  # full
    decoder = FrameDecoder(1 << 20, budget=budget)
    small = struct.pack("!i", 60_000) + bytes(60_000)
    assert decoder.feed(small + small[:1000]) is None
    assert decoder.next() == bytes(60_000)
    assert decoder.next() is None and not decoder.waiting  # the next one is not whole yet, and small
    assert budget.used == 1


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", None),
        (b"\x00\x00\x00", None),
        (struct.pack("!i", 5), (5, 4)),
        (struct.pack("!i", -1) + b"\x00" * 7, None),  # the long form's length not whole yet
        (struct.pack("!iQ", -1, 70_000), (70_000, 12)),
    ],
)
def test_read_header_is_the_one_parser_of_lengths(data, expected):
    assert read_header(data, 0, len(data), 1 << 20) == expected


def test_read_header_refuses_negative_and_oversized_lengths():
    with pytest.raises(ProtocolError, match="negative length"):
        read_header(struct.pack("!i", -2), 0, 4, 100)
    with pytest.raises(MessageTooLarge) as caught:
        read_header(struct.pack("!iQ", -1, 101), 0, 12, 100)
    assert caught.value.size == 101
