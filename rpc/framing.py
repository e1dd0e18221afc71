"""Reading and sending ``multiprocessing.connection`` frames under a deadline.

A frame is a 4-byte big-endian signed length, or -1 then an 8-byte big-endian
length, followed by that many payload bytes. ``Connection.recv_bytes`` blocks
until a whole frame has arrived, so a peer that sends half a frame holds the
reader forever, whatever ``poll()`` said first. :class:`FrameReader` instead
reads whatever the socket holds into its own buffer and waits with ``poll()``
for the rest, so a deadline can end the wait at any byte. The bytes already read
stay in the buffer for the next read: a wait cut short never leaves the stream
out of step. A length over the limit is refused before anything is allocated.
:func:`send_frame` likewise stops waiting for room in the socket's send buffer
when the deadline passes, and says how much of the frame went out.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import time
from typing import Any, Callable, Protocol, Union

from .errors import MessageTooLarge, ProtocolError

__all__ = [
    "DIRECT_BYTES",
    "Frame",
    "FrameDecoder",
    "FrameReader",
    "ReceiveBudget",
    "SendTimeout",
    "read_header",
    "frame_header",
    "send_frame",
]

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_BUFFER_BYTES = 1 << 16  # the reader's reused buffer; a larger frame gets one of its own size
_JOIN_BYTES = 1 << 16  # a payload up to this size is sent joined to its header, as one buffer


# A frame at least this big is received straight into a buffer of its own size, so its
# bytes are copied once (by the kernel), not gathered chunk by chunk.
DIRECT_BYTES = 1 << 16
_SCRATCH_BYTES = 1 << 16  # what one read may bring while no large frame is pending

Frame = Union[bytes, bytearray]


def read_header(buffer: Any, start: int, have: int, max_bytes: int) -> tuple[int, int] | None:
    """The frame header at ``buffer[start:]``, of which ``have`` bytes are there: (payload size,
    header size), or None until the header is whole. The one parser of frame headers.

    Raises ProtocolError for a negative length and :class:`MessageTooLarge` (with a
    ``size`` attribute) for one over ``max_bytes``: either way the stream is lost.
    """
    if have < 4:
        return None
    size: int = _SHORT.unpack_from(buffer, start)[0]
    if size >= 0:
        header = 4
    elif size == -1:
        if have < 12:
            return None
        size = _LONG.unpack_from(buffer, start + 4)[0]
        header = 12
    else:
        raise ProtocolError(f"a frame announced a negative length ({size})")
    if size > max_bytes:
        raise too_large(size, max_bytes)
    return size, header


def scratch_buffer() -> memoryview:
    """A buffer for the small reads of :class:`FrameDecoder`; share one per thread."""
    return memoryview(bytearray(_SCRATCH_BYTES))


class ReceiveBudget:
    """Bytes of large frames being received at once by the decoders that share it.

    A frame of :data:`DIRECT_BYTES` or more takes its size when its header arrives
    and gives it back once it is whole. A decoder whose frame does not fit waits
    (:attr:`FrameDecoder.waiting`): its reader must stop reading, and try again
    after ``released`` is called. While nothing is taken, any one frame fits, so a
    limit below the largest frame allowed slows large frames down, never stops them.
    """

    __slots__ = ("limit", "used", "released")

    def __init__(self, limit: int, released: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.released = released

    def take(self, size: int) -> bool:
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size
        if self.released is not None:
            self.released()


class FrameDecoder:
    """Frames out of a byte stream, with no I/O of its own.

    Bytes come in either by :meth:`feed`, or (for ``asyncio.BufferedProtocol``) by
    :meth:`get_buffer` then :meth:`buffer_updated`; whole frames come out of
    :meth:`next`, one at a time, so a caller may change ``max_bytes`` between
    them (a handshake message is held to fewer bytes than a request). A frame of
    :data:`DIRECT_BYTES` or more is received into a buffer of its own and
    returned as that ``bytearray``; smaller ones as ``bytes``.

    Headers are read by :func:`read_header`, as in :class:`FrameReader` (the fast paths
    only take a lone short frame, and leave every other case to it). A header announcing more than
    ``max_bytes`` raises :class:`MessageTooLarge` before anything is buffered for it (its
    ``size`` attribute says how many bytes it announced); a negative length
    raises :class:`ProtocolError`. After either, the stream cannot be resynchronised.
    """

    __slots__ = ("max_bytes", "waiting", "_buffer", "_need", "_scratch", "_large", "_filled", "_ready", "_budget")

    def __init__(self, max_bytes: int, scratch: memoryview | None = None, budget: ReceiveBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self._budget = budget
        self.waiting = False  # a large frame's header is here, and the budget has no room for it yet
        self._buffer = bytearray()
        self._need = 0  # the first frame's full length (header included), once known
        # Where small reads land; shared by every decoder of one thread (a router's thousands
        # of connections need one), since buffer_updated copies it out before the next read.
        self._scratch = scratch
        self._large: memoryview | None = None  # a large frame being received in place
        self._filled = 0  # bytes of it received
        self._ready: bytearray | None = None  # a large frame received whole, before anything buffered

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as frames."""
        ready = len(self._ready) if self._ready is not None else 0
        return len(self._buffer) + ready + (self._filled if self._large is not None else 0)

    def feed(self, data: bytes) -> Frame | None:
        """Add ``data``. If it is exactly one frame and nothing else is buffered (the usual
        case), that frame is returned at once, uncopied into the buffer; then :meth:`next`
        has nothing more. Otherwise None: take the frames with :meth:`next`."""
        if self._large is not None:
            data = data[self._fill(data) :]
            if not data:
                return None
        if not self._buffer and self._ready is None and len(data) >= 4:
            size = _SHORT.unpack_from(data)[0]
            if 0 <= size <= self.max_bytes and len(data) == 4 + size:
                return data[4:]
        self._buffer += data
        return None

    def get_buffer(self) -> memoryview:
        """Where the next bytes read from the socket should go."""
        if self._large is not None:
            return self._large[self._filled :]
        if self._scratch is None:
            self._scratch = scratch_buffer()
        return self._scratch

    def buffer_updated(self, count: int) -> Frame | None:
        """``count`` bytes were read into the last :meth:`get_buffer`; returns as :meth:`feed` does."""
        if self._large is not None:
            self._filled += count
            if self._filled == len(self._large):
                self._finish_large()
            return None
        assert self._scratch is not None
        data = bytes(self._scratch[:count])
        if not self._buffer and self._ready is None and count >= 4:  # feed's usual case, inlined
            size = _SHORT.unpack_from(data)[0]
            if 0 <= size <= self.max_bytes and count == 4 + size:
                return data[4:]
        return self.feed(data)

    def next(self) -> Frame | None:
        """Remove and return the first whole frame received, or None if there is none yet."""
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        buffer = self._buffer
        have = len(buffer)
        if have < 4 or have < self._need:
            return None
        found = read_header(buffer, 0, have, self.max_bytes)
        if found is None:
            return None
        size, start = found
        end = start + size
        if have < end:
            if size >= DIRECT_BYTES:
                if self._budget is not None and not self._budget.take(size):
                    self.waiting = True  # asked again by the next call
                    return None
                self.waiting = False
                # Receive the rest straight into the frame's own buffer.
                self._large = memoryview(bytearray(size))
                self._filled = have - start
                self._large[: self._filled] = buffer[start:]
                del buffer[:]
                self._need = 0
            else:
                self._need = end
            return None
        with memoryview(buffer) as view:
            frame = bytes(view[start:end])
        del buffer[:end]
        self._need = 0
        return frame

    def _fill(self, data: bytes) -> int:
        """Copy what ``data`` holds of the large frame under way into it; how many bytes that took."""
        assert self._large is not None
        count = min(len(data), len(self._large) - self._filled)
        self._large[self._filled : self._filled + count] = data[:count]
        self._filled += count
        if self._filled == len(self._large):
            self._finish_large()
        return count

    def _finish_large(self) -> None:
        assert self._large is not None
        frame = self._large.obj
        assert isinstance(frame, bytearray)
        self._large.release()
        self._large, self._filled, self._ready = None, 0, frame
        if self._budget is not None:
            self._budget.give(len(frame))

    def abandon(self) -> None:
        """The stream ended: give back what a large frame under way took from the budget."""
        if self._large is not None:
            size = len(self._large)
            self._large.release()
            self._large, self._filled = None, 0
            if self._budget is not None:
                self._budget.give(size)
        self.waiting = False


def too_large(size: int, limit: int) -> MessageTooLarge:
    error = MessageTooLarge(f"a frame of {size} bytes exceeds the limit of {limit} bytes")
    error.size = size  # type: ignore[attr-defined]  # lets a caller word its own message
    return error


class Decrypting(Protocol):
    """TLS under a :class:`FrameReader` (:class:`rpc.tls.ClientTLS`): plaintext out, ciphertext in."""

    def decrypt_into(self, buffer: memoryview) -> int | None:
        """Plaintext into ``buffer``: its size, 0 at the end, None until more ciphertext is received."""

    def receive(self, block: bool = False) -> bool:
        """Take the ciphertext the socket holds (waiting for some if ``block``); False at its end."""


class FrameReader:
    """Frames from the socket ``fd``, each at most ``max_bytes`` long.

    One thread at a time may read; the caller keeps it that way. ``max_bytes`` may
    be changed between reads (the handshake caps each message). Bytes are read
    with ``readv`` into one preallocated buffer, reused for every frame that fits
    in it; a larger frame gets a buffer of exactly its size, so it comes off the
    socket in as few reads as the kernel allows and is never copied on the way.
    With ``tls``, the socket's bytes are ciphertext: ``tls`` takes them and
    decrypts into the same buffers, under the same deadlines.
    """

    def __init__(self, fd: int, max_bytes: int, tls: Decrypting | None = None) -> None:
        self._fd = fd
        self._tls = tls
        self.max_bytes = max_bytes
        self._standard = memoryview(bytearray(_BUFFER_BYTES))
        self._buffer = self._standard  # the standard buffer, or a large frame's own
        self._start = 0  # bytes read and not yet returned: _buffer[_start:_end]
        self._end = 0
        self._whole = [self._standard]  # what readv fills when nothing is buffered
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._wake: socket.socket | None = None
        self._wake_fd = -1

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet returned (part of a frame, or whole ones)."""
        return self._end - self._start

    def read(self, deadline: float | None, wake: socket.socket | None = None) -> bytes | None:
        """The next frame's payload, or None if ``deadline`` passed (or ``wake`` got a byte) first.

        ``deadline`` is a ``time.monotonic()`` value (None: wait as long as it takes).
        ``wake`` is the reading end of a socket pair: a byte sent to it ends the wait early.
        Raises EOFError when the peer closed the connection, :class:`MessageTooLarge`
        or :class:`ProtocolError` for a length that cannot be accepted, OSError otherwise.
        """
        view = self.read_view(deadline, wake)
        return None if view is None else bytes(view)

    def read_view(self, deadline: float | None, wake: socket.socket | None = None) -> memoryview | None:
        """As :meth:`read`, but the payload is a view of the reader's buffer, valid until the next read."""
        if deadline is None and wake is None and not self._end and self._buffer is self._standard and self._tls is None:
            # The usual case: nothing buffered, nothing bounds the wait. One blocking read,
            # which usually brings exactly one frame.
            count = os.readv(self._fd, self._whole)
            if not count:
                raise EOFError("the peer closed the connection")
            if count > 4:
                size = _SHORT.unpack_from(self._standard)[0]
                if count == 4 + size and size <= self.max_bytes:
                    return self._standard[4:count]
            self._end = count
            frame = self._take()  # part of a frame, or more than one, or a length to refuse
            if frame is not None:
                return frame
        if wake is not None and wake is not self._wake:
            if self._wake is not None:
                self._poller.unregister(self._wake_fd)
            self._wake_fd = wake.fileno()
            self._poller.register(self._wake_fd, select.POLLIN)
            self._wake = wake
        remaining = 0.0
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
        if self._end:
            frame = self._take()
            if frame is not None:
                return frame
        if self._tls is not None:
            return self._read_tls(self._tls, deadline, wake)
        bounded = deadline is not None or wake is not None
        while True:
            if bounded:
                # Wait for bytes; a plain blocking read (the cheapest path) when nothing bounds the wait.
                ready = woken = False
                for fd, _ in self._poller.poll(-1 if deadline is None else math.ceil(remaining * 1000)):
                    if fd == self._fd:
                        ready = True
                    else:
                        woken = True  # (the only other descriptor polled is the wake-up pair's)
                if woken:
                    self._drain_wake()
                    if wake is not None:
                        return None
            if not bounded or ready:
                count = os.readv(self._fd, [self._buffer[self._end :]])
                if not count:
                    raise EOFError("the peer closed the connection")
                self._end += count
                frame = self._take()
                if frame is not None:
                    return frame
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None

    def _read_tls(self, tls: Decrypting, deadline: float | None, wake: socket.socket | None) -> memoryview | None:
        """:meth:`read_view`'s loop over TLS: decrypt what is there, else wait for ciphertext."""
        bounded = deadline is not None or wake is not None
        while True:
            count = tls.decrypt_into(self._buffer[self._end :])
            if count is not None:
                if not count:
                    raise EOFError("the peer closed the connection")
                self._end += count
                frame = self._take()
                if frame is not None:
                    return frame
                continue
            if bounded:
                remaining = 0.0
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                ready = woken = False
                for fd, _ in self._poller.poll(-1 if deadline is None else math.ceil(remaining * 1000)):
                    if fd == self._fd:
                        ready = True
                    else:
                        woken = True
                if woken:
                    self._drain_wake()
                    if wake is not None:
                        return None
                if not ready:
                    continue  # (the deadline is checked above)
            if not tls.receive(block=not bounded):
                raise EOFError("the peer closed the connection")

    def _take(self) -> memoryview | None:
        """Return the first whole frame in the buffer; if there is none, make room for the rest of it.

        With nothing buffered, the standard buffer is in use from its start.
        """
        buffer, start = self._buffer, self._start
        have = self._end - start
        need = 12  # until the length is known, room for the longest header
        try:
            found = read_header(buffer, start, have, self.max_bytes)
        except MessageTooLarge as exc:
            size = exc.size  # type: ignore[attr-defined]
            error = MessageTooLarge(f"a frame of {size} bytes exceeds this client's max_message_bytes ({self.max_bytes})")
            error.size = size  # type: ignore[attr-defined]  # lets a caller word its own message
            raise error from None
        if found is not None:
            size, header = found
            need = header + size
            if have >= need:
                if have == need:  # all taken: start over (the frame returned keeps its buffer alive)
                    self._buffer, self._start, self._end = self._standard, 0, 0
                else:
                    self._start = start + need
                return buffer[start + header : start + need]
        if start + need > len(buffer):
            self._move(need, have)
        return None

    def _move(self, need: int, have: int) -> None:
        """Put the ``have`` buffered bytes of a frame of ``need`` bytes at the start of a buffer that holds it."""
        target = self._standard if need <= len(self._standard) else memoryview(bytearray(need))
        target[:have] = self._buffer[self._start : self._end]  # (memoryview copies overlapping bytes safely)
        self._buffer, self._start, self._end = target, 0, have

    def _drain_wake(self) -> None:
        assert self._wake is not None
        try:
            self._wake.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass


class SendTimeout(TimeoutError):
    """The deadline passed before a whole frame was sent; ``sent`` bytes of it went out."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"{sent} bytes of the frame were sent when the deadline passed")
        self.sent = sent


def frame_header(size: int) -> bytes:
    return _SHORT.pack(size) if size <= 0x7FFFFFFF else _SHORT.pack(-1) + _LONG.pack(size)


_pack_short = _SHORT.pack


def framed_small(payload: Frame) -> bytes:
    """``payload`` after its header, in one bytes object: for payloads under 2 GiB (small ones,
    where one write beats two)."""
    return _pack_short(len(payload)) + payload


def send_frame(sock: socket.socket, payload: bytes, deadline: float | None) -> None:
    """Send ``payload`` as one frame on the blocking socket ``sock``.

    With a ``deadline``, raises :class:`SendTimeout` if it passes before the
    frame is out (a peer that does not read); other failures raise OSError.
    """
    flags = 0 if deadline is None else socket.MSG_DONTWAIT
    if len(payload) <= _JOIN_BYTES:
        # A small frame goes out as one buffer in one send: the copy costs less than a gather.
        data = _SHORT.pack(len(payload)) + payload
        try:
            sent = sock.sendmsg([data], (), flags)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        parts = [memoryview(data)[sent:]]
    else:
        parts = [memoryview(frame_header(len(payload))), memoryview(payload)]
        sent = 0
    poller: Any = None  # made only if the socket's send buffer fills
    while True:
        try:
            count = sock.sendmsg(parts, (), flags)
        except BlockingIOError:
            count = 0
        sent += count
        while parts and count >= len(parts[0]):
            count -= len(parts.pop(0))
        if not parts:
            return
        parts[0] = parts[0][count:]
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(sent)
            if poller is None:
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT)
            poller.poll(math.ceil(remaining * 1000))
