"""The client's frame reader and sender (rpc.framing) on real socket pairs.

The reader keeps one receive buffer for frames that fit in it and gives a
larger frame a buffer of its own; these tests put frame boundaries, and the
edges of that buffer, everywhere a read can fall.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import rpc
from rpc.framing import FrameReader, SendTimeout, send_frame

HANG = 10.0  # seconds: a wait this long is a hang, not slowness
BUFFER = 1 << 16  # the reader's own buffer, as rpc.framing sizes it


def framed(payload: bytes, long: bool = False) -> bytes:
    return (struct.pack("!iQ", -1, len(payload)) if long else struct.pack("!i", len(payload))) + payload


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of a pattern that differs from one ``seed`` to another."""
    return (bytes((seed + i) % 251 for i in range(1000)) * (size // 1000 + 1))[:size]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def write_in_pieces(sock: socket.socket, data: bytes, piece: int) -> threading.Thread:
    """Send ``data`` in pieces of ``piece`` bytes from a thread (the reader empties the socket meanwhile)."""
    thread = threading.Thread(target=lambda: [sock.sendall(data[i : i + piece]) for i in range(0, len(data), piece)])
    thread.start()
    return thread


SIZES = [0, 1, BUFFER - 12, BUFFER - 4, BUFFER - 3, BUFFER, BUFFER + 1, 3 * BUFFER + 5, 1 << 20, 7]


@pytest.mark.parametrize("piece", [1 << 20, 4096, 4099, 65_537])
def test_frames_of_every_size_around_the_buffer_arrive_whole_however_they_are_split(pair, piece):
    left, right = pair
    payloads = [payload(size, seed) for seed, size in enumerate(SIZES)]
    stream = b"".join(framed(p, long=i % 3 == 2) for i, p in enumerate(payloads))
    reader = FrameReader(right.fileno(), 2 << 20)
    writer = write_in_pieces(left, stream, piece)
    got = [reader.read(time.monotonic() + HANG) for _ in payloads]
    writer.join(HANG)
    assert [len(p) for p in got] == SIZES
    assert got == payloads
    assert reader.buffered == 0


def test_small_frames_straddling_the_end_of_the_buffer_are_moved_and_read(pair):
    left, right = pair
    # Frames of 9 + 4 bytes written at once fill the buffer with whole frames and one cut by its end.
    payloads = [bytes([i % 256]) * 9 for i in range(3 * BUFFER // 13)]
    reader = FrameReader(right.fileno(), 1 << 20)
    writer = write_in_pieces(left, b"".join(framed(p) for p in payloads), BUFFER + 100)
    got = [reader.read(None) for _ in payloads]
    writer.join(HANG)
    assert got == payloads


def test_a_large_frame_after_part_of_it_was_buffered_with_a_small_one(pair):
    left, right = pair
    big = payload(5 * BUFFER, 3)
    stream = framed(b"small") + framed(big) + framed(b"after")
    reader = FrameReader(right.fileno(), 1 << 20)
    left.sendall(stream[:1000])  # the small frame and the start of the large one arrive together
    assert reader.read(time.monotonic() + HANG) == b"small"
    assert reader.read(time.monotonic() + 0.05) is None  # the rest is not there yet
    assert reader.buffered == 1000 - 9
    writer = write_in_pieces(left, stream[1000:], 30_000)
    assert reader.read(time.monotonic() + HANG) == big
    assert reader.read(time.monotonic() + HANG) == b"after"
    writer.join(HANG)


def test_read_view_gives_the_payload_without_a_copy_and_read_gives_bytes_that_last(pair):
    left, right = pair
    reader = FrameReader(right.fileno(), 1 << 20)
    left.sendall(framed(b"first") + framed(b"second") + framed(b"x" * (2 * BUFFER)))
    first = reader.read(None)
    view = reader.read_view(None)
    assert isinstance(first, bytes) and isinstance(view, memoryview)
    assert bytes(view) == b"second"
    assert reader.read_view(None) == b"x" * (2 * BUFFER)
    assert first == b"first"


def test_a_length_over_the_limit_is_refused_from_the_header_alone(pair):
    left, right = pair
    left.sendall(struct.pack("!iQ", -1, 1 << 40))
    reader = FrameReader(right.fileno(), 1 << 20)
    with pytest.raises(rpc.MessageTooLarge) as raised:
        reader.read(time.monotonic() + HANG)
    assert raised.value.size == 1 << 40


def test_a_byte_on_the_wake_pair_ends_the_wait_and_frames_follow(pair):
    left, right = pair
    wake_reader, wake_writer = socket.socketpair()
    wake_reader.setblocking(False)
    try:
        reader = FrameReader(right.fileno(), 1 << 20)
        wake_writer.send(b"\0")
        assert reader.read(time.monotonic() + HANG, wake_reader) is None
        left.sendall(framed(b"after the wake-up"))
        assert reader.read(time.monotonic() + HANG, wake_reader) == b"after the wake-up"
    finally:
        wake_reader.close()
        wake_writer.close()


def test_a_small_frame_goes_out_in_one_write():
    # A sequenced-packet pair keeps each write a packet of its own, so a frame read in one
    # receive was written in one send: header and payload together.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        for size in (0, 5, 1000, 60_000):
            body = payload(size, 1)
            send_frame(left, body, time.monotonic() + HANG)
            assert right.recv(1 << 17) == framed(body)
            send_frame(left, body, None)
            assert right.recv(1 << 17) == framed(body)


@pytest.mark.parametrize("size", [50, 200_000])
def test_a_frame_that_finds_the_socket_full_is_sent_whole_once_the_peer_reads(pair, size):
    left, right = pair
    left.setblocking(False)
    filled = 0
    try:
        while True:
            filled += left.send(b"f" * 4096)
    except BlockingIOError:
        pass
    left.setblocking(True)
    body = payload(size, 2)
    received = bytearray()

    def drain() -> None:
        while len(received) < filled + 4 + size:
            received.extend(right.recv(1 << 16))

    reader = threading.Thread(target=drain)
    reader.start()
    send_frame(left, body, time.monotonic() + HANG)
    reader.join(HANG)
    assert not reader.is_alive()
    assert bytes(received) == b"f" * filled + framed(body)


def test_a_frame_the_peer_never_reads_ends_in_send_timeout(pair):
    left, right = pair
    start = time.monotonic()
    with pytest.raises(SendTimeout) as raised:
        send_frame(left, b"z" * (8 << 20), start + 0.2)
    assert 0 < raised.value.sent < 4 + (8 << 20)
    assert os.get_blocking(left.fileno())  # the socket stays blocking for whoever uses it next
