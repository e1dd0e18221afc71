"""The latency fast path: a spare handler serves a quiet client's socket directly for a while.

Per-call dispatch costs a hop through the router for every call. When a client
calls one at a time and handlers are to spare, the router lends the client's
socket to an idle handler with the request that just arrived: one message on the
handler's pipe carries both (the descriptor as SCM_RIGHTS). The handler runs that
call, then reads further requests from the socket and writes their replies
itself, until the client is quiet for :data:`IDLE_SECONDS`, the router recalls
it, or something arrives that only the router handles; then it reports the
lease over (:class:`LeaseEnd`, with a :class:`EndReason`) and the router reads
the socket again. Everything the handler does not serve stays unread on the
socket, so the router resumes at a frame boundary with nothing to hand back.

The router lends only with nothing of this client in flight and its send buffer
empty, so a handler's reply can never land in the middle of another; the
handler checks every frame's envelope as the router does. It answers each call
before it reads the next, so it never holds two calls of its client at once: a
request id reused while in flight, which the router refuses with a
connection-level error, cannot be in flight twice here (docs/protocol.md).

A handler may be killed at any moment, so the state of the call it runs on a lent
socket is posted in memory it shares with the router (:class:`CallState`, 64-bit
integers, so any request id fits exactly), in an order that tells the router
what the client has and has not received (see :func:`what_is_owed`): a request
is posted as running before it is taken off the socket, and each send's progress
is posted after it.

Never over TLS (:func:`enabled`): the session's keys and record counters live in
the router's process, and a socket handed to another process carries only its
bytes, so a TLS server routes every call.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol
from .errors import ProtocolError
from .framing import Frame, frame_header

if TYPE_CHECKING:
    from .config import ServerConfig

_SHORT = struct.Struct("!i")  # a frame's length, as framing reads it

__all__ = ["IDLE_SECONDS", "SHARED_SIZE", "CallState", "EndReason", "LeaseEnd", "LentCalls", "Owed", "enabled", "serve_lease", "what_is_owed"]

# A lent socket goes back after this long without a request.
IDLE_SECONDS = 0.005
# A client that pipelines calls this long gets them spread over all handlers instead.
PARALLEL_WORTHY_SECONDS = 0.001
# The largest request lent with its socket (it travels in the lending message).
MAX_LENT_FRAME = 32 * 1024
PEEK_BYTES = 65536
_CANCEL_SCAN_FRAMES = 16  # frames waiting on a lent socket looked through for a cancel
# A send on a Unix stream socket of at most this many bytes goes out in one kernel
# buffer: all of it or none, even if the sender is killed during the call.
_WHOLE_SEND_BYTES = 32 * 1024


class EndReason(enum.Enum):
    """Why a handler gave a lent socket back."""

    IDLE = "idle"  # no request for IDLE_SECONDS
    RECALLED = "recalled"  # the router needs the handler for a waiting call
    FRAME = "frame"  # a frame the router handles (ping, notification, malformed, large) waits on the socket
    PARTIAL = "partial"  # part of a frame is there: the router reads the rest
    PIPELINED = "pipelined"  # the client sends calls before reading answers: spread them over handlers
    CLOSED = "closed"  # the client closed the connection
    BROKEN = "broken"  # a reply could not be sent: the client stopped reading or went away


@dataclass(frozen=True)
class Lease:
    """Router to handler: serve this request, then the socket that comes with this message."""

    frame: bytes

    def encode(self) -> bytes:
        return protocol.encode_internal(protocol.LEASE, self.frame)

    @classmethod
    def decode(cls, message: Frame) -> Lease:
        _, frame = protocol.decode_value(message)
        return cls(bytes(frame))


@dataclass(frozen=True)
class LeaseEnd:
    """Handler to router: the lent socket is the router's again."""

    reason: EndReason
    served: int
    tally: Any = None  # calls it counted itself, its LentCalls being full: CallCounts.export() or None (rpc.metrics)

    def encode(self) -> bytes:
        return protocol.encode_internal(protocol.LEASE_END, self.reason.value, self.served, self.tally)

    @classmethod
    def decode(cls, message: Frame) -> LeaseEnd:
        _, reason, served, tally = protocol.decode_value(message)
        return cls(EndReason(reason), int(served), tally)


RECALL = protocol.encode_internal(protocol.RECALL)


class CallState:
    """The call a handler runs on a lent socket, in memory shared with the router.

    Slots (64-bit integers): 0 what (IDLE, RUNNING, WRITING), 1 deadline
    (time.monotonic_ns(), 0 for none), 2 request id (as a signed 64-bit value),
    3 calls done in this lease, 4 bytes of the reply frame, 5 bytes of it sent so
    far, 6 whether the kernel sends that frame all or nothing (1) or may send part (0),
    7 the method's number in the handler's list of names (-1: not there), so a call
    that dies with its handler is counted under its method (rpc.metrics).

    ``methods`` (the handler's side only): method name -> its number.
    """

    SIZE = 8
    IDLE, RUNNING, WRITING = 0, 1, 2

    def __init__(self, array: Any, methods: Mapping[str, int] | None = None) -> None:
        self.array = array
        self._methods = methods or {}
        # The same memory as 64-bit integers: the per-call writes cost less than through ctypes.
        self._slots = memoryview(array).cast("B").cast("q")

    def running(self, request_id: int, deadline: float | None, method: str = "") -> None:
        slots = self._slots
        slots[2] = request_id - (1 << 64) if request_id >= 1 << 63 else request_id
        slots[1] = int(deadline * 1e9) if deadline is not None else 0
        slots[7] = self._methods.get(method, -1)
        slots[0] = self.RUNNING

    def writing(self, size: int = 0, whole: bool = False) -> None:
        slots = self._slots
        slots[4] = size
        slots[5] = 0
        slots[6] = 1 if whole else 0
        slots[0] = self.WRITING

    def sent(self, count: int) -> None:
        self._slots[5] = count

    def idle(self) -> None:
        self._slots[0] = self.IDLE

    def answered(self) -> None:
        self._slots[3] += 1

    def reset(self) -> None:
        for i in range(self.SIZE):
            self.array[i] = 0

    def read(self) -> tuple[int, float | None, int, int]:
        what, deadline, request_id, answered = self.array[0], self.array[1], self.array[2], self.array[3]
        return what, (deadline / 1e9 if deadline else None), request_id % (1 << 64), answered

    def method_number(self) -> int:
        """The number of the method of the call posted (see ``methods``), or -1."""
        return int(self.array[7])

    def reply_progress(self) -> tuple[int, int, bool]:
        """Of the reply being written: its size, the bytes known sent, and whether it goes all or nothing."""
        return self.array[4], self.array[5], self.array[6] == 1


class LentCalls:
    """The calls a handler served on lent sockets, posted for the router to count (rpc.metrics).

    A ring in the memory the two share, after the handler's :class:`CallState` (from slot
    :attr:`CallState.SIZE`): slot 0 counts the calls the handler posted, slot 1 those the
    router has taken, then :attr:`RING` entries of one integer each (the method's number
    plus one, 0 for a name not in the handler's list; whether it failed; nanoseconds it
    took). One writer each way, so no lock: an entry is written before the count that
    shows it. A handler asks the router to take them once half the ring waits (a
    :data:`protocol.LEASE_TALLY` message) and when its lease ends; the router also takes
    them when /metrics is read and when the handler dies, so a handler that is killed
    loses none. Posting costs the handler a few hundred nanoseconds per call.
    """

    RING = 1024

    def __init__(self, array: Any) -> None:
        self._slots = memoryview(array).cast("B").cast("q")[CallState.SIZE :]

    def reset(self) -> None:
        """A new handler in the slot: nothing posted, nothing taken."""
        self._slots[0] = self._slots[1] = 0

    def post(self, method: int, failed: bool, seconds: float) -> int:
        """The handler served a call: how many posted calls now wait to be taken, or -1 if the
        ring is full (the router is behind: the handler counts this call itself)."""
        slots = self._slots
        posted = slots[0]
        waiting = posted - slots[1]
        if waiting >= _RING:
            return -1
        nanoseconds = int(seconds * 1e9)
        slots[2 + posted % _RING] = (
            (method + 1) << _METHOD_SHIFT | (_FAILED if failed else 0) | (nanoseconds if nanoseconds < _MAX_NS else _MAX_NS)
        )
        slots[0] = posted + 1  # after the entry: the router never reads one half written
        return waiting + 1

    def take(self) -> list[tuple[int, bool, float]]:
        """The router's side: the calls posted since it last took them, as (method number
        or -1, whether it failed, seconds); they are counted as taken."""
        slots = self._slots
        posted, taken = slots[0], slots[1]
        calls = []
        for i in range(taken, posted):
            entry = slots[2 + i % _RING]
            calls.append(((entry >> _METHOD_SHIFT) - 1, bool(entry & _FAILED), (entry & _MAX_NS) / 1e9))
        slots[1] = posted
        return calls


# A LentCalls entry: method number + 1, then 1 bit (failed), then 40 bits of nanoseconds
# (about 18 minutes; a longer call counts as that long). Module constants: post() runs per call.
_RING = LentCalls.RING
_FAILED = 1 << 40
_MAX_NS = _FAILED - 1
_METHOD_SHIFT = 41

#: 64-bit integers shared by the router and each handler slot: its CallState, then its LentCalls
SHARED_SIZE = CallState.SIZE + 2 + LentCalls.RING


# -- the router's side ---------------------------------------------------------------------


class Owed(enum.Enum):
    """What the client of a handler that died on a lent socket is owed."""

    NOTHING = "nothing"  # every call it took was answered in full
    RUN_LENT = "run_lent"  # it died before starting the request it was lent with: the router runs it
    CRASHED = "crashed"  # a call was taken and not answered: it fails (WorkerCrashed or CallTimeout)
    CUT = "cut"  # a reply was cut partway: the stream is mid-frame, so the connection must go


def enabled(config: ServerConfig) -> bool:
    """Whether the server lends sockets: if its ``lease`` setting says so, and never with TLS
    (a TLS session cannot follow its socket to a handler)."""
    return config.lease and not config.tls


def what_is_owed(state: CallState, waiting_id: Callable[[], int | None]) -> tuple[Owed, int]:
    """After a lent handler died: what its client is owed, and the request id concerned.

    ``waiting_id`` peeks at the socket: the id of a whole request waiting unread at
    its head (a request posted as running but not yet taken is still there, and
    the router simply reads it).
    """
    what, _deadline, request_id, answered = state.read()
    if what == CallState.IDLE:
        return (Owed.RUN_LENT if not answered else Owed.NOTHING), request_id
    if what == CallState.WRITING:
        size, sent, whole = state.reply_progress()
        if sent == 0 and whole:
            # Sent whole or not at all: if it did go out, the client drops this second answer.
            return Owed.CRASHED, request_id
        if sent < size:
            return Owed.CUT, request_id
        return Owed.NOTHING, request_id
    if answered == 0 or waiting_id() != request_id:
        return Owed.CRASHED, request_id  # taken off the socket (or the lent request itself): it ran
    return Owed.NOTHING, request_id  # still on the socket: the router reads and runs it


def _peek(fd: int) -> bytes | None:
    """What waits unread on socket ``fd`` (b"" once the peer has closed), or None if nothing does."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # reset: gone as much as closed
    finally:
        sock.close()


def _waiting_envelope(peeked: bytes | None) -> protocol.Envelope | None:
    frame = _whole_frame(peeked, PEEK_BYTES) if peeked else None
    if frame is None:
        return None
    try:
        return protocol.parse_envelope(bytes(frame[4:]))
    except ProtocolError:
        return None


def waiting_request_id(fd: int) -> int | None:
    """The id of a request waiting whole and unread at the head of socket ``fd``, if there is one."""
    envelope = _waiting_envelope(_peek(fd))
    return envelope.id if envelope is not None and envelope.kind == protocol.REQUEST else None


def cancel_waiting(fd: int, request_id: int) -> str | None:
    """Whether the call ``request_id``, running on lent socket ``fd``, was cancelled meanwhile:
    how ("by its caller": a cancel for it waits among the whole frames peeked; "by its client
    going away": it hung up, even behind requests it sent first), or None."""
    peeked = _peek(fd)
    if peeked == b"":
        return "by its client going away"
    if peeked is None:
        return None
    offset = 0
    # A client may send more requests before cancelling the running call: look past a few
    # (not all: the router peeks at every housekeeping tick while the call runs).
    for _ in range(_CANCEL_SCAN_FRAMES):
        frame = _whole_frame(memoryview(peeked)[offset:], PEEK_BYTES)
        if frame is None:
            break
        offset += len(frame)
        try:
            envelope = protocol.parse_envelope(bytes(frame[4:]))
        except ProtocolError:
            break  # the router ends the connection when it reads this
        if envelope.id == request_id:
            if envelope.kind == protocol.CANCEL:
                return "by its caller"
            break  # another request with its id: the cancel may be for that one (the router's to read)
    return "by its client going away" if _hung_up(fd) else None


def _hung_up(fd: int) -> bool:
    """Whether the peer of socket ``fd`` closed (or reset) it, even with bytes still unread."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def send_lease(pipe_fd: int, frame: bytes, client_fd: int) -> None:
    """Send the lending message and the client's descriptor in one message; OSError if it did not go whole."""
    message = frame_header(len(payload := Lease(frame).encode())) + payload
    with socket.socket(fileno=os.dup(pipe_fd)) as pipe:
        sent = socket.send_fds(pipe, [message], [client_fd])
    if sent != len(message):
        raise OSError(f"only {sent} of the lease's {len(message)} bytes went out")


# -- the handler's side --------------------------------------------------------------------


def _whole_frame(peeked: bytes | memoryview, max_message_bytes: int) -> bytes | memoryview | None:
    """The first frame of ``peeked``, header included, if all of it is there and within the limit."""
    if len(peeked) < 4:
        return None
    size = int.from_bytes(peeked[:4], "big", signed=True)
    if size < 0 or size > max_message_bytes or len(peeked) < 4 + size:
        return None
    return peeked[: 4 + size]


def serve_lease(
    sock: socket.socket,
    pipe_fd: int,
    first: bytes,
    execute: Callable[[protocol.Request], bytes],
    state: CallState,
    max_call_seconds: float | None,
    on_call: Callable[[protocol.Request, bytes, float], None] | None,
    send_timeout: float | None = None,
    streams: frozenset[str] = frozenset(),
) -> LeaseEnd:
    """Run ``first``, then serve the lent ``sock`` until it should go back; closes ``sock``.

    ``on_call`` (if any) is told of each call served, after its reply is sent.
    """
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(pipe_fd, select.POLLIN)
    idle_ms = int(IDLE_SECONDS * 1000)
    whole_bytes = _whole_send_bytes(sock)
    # Requests are peeked into this buffer, then taken off the socket into it again.
    peeked = bytearray(PEEK_BYTES)
    view = memoryview(peeked)
    served, reason = 0, EndReason.IDLE
    body: bytes | memoryview | None = first  # the lent request: not on the socket
    waiting = 0  # the size of the whole frame holding ``body`` still on the socket (0: the lent one)
    try:
        while True:
            if body is not None:
                request = _servable(body, streams)
                if request is None and not waiting:
                    # The lent request, already off the socket: its envelope passed the
                    # router's checks but the rest did not (args not an array, ...).
                    if not _refuse(fd, state, bytes(body), whole_bytes, send_timeout):
                        reason = EndReason.BROKEN
                        break
                    body = None
                    served += 1
                    continue
                if request is None:
                    reason = EndReason.FRAME  # left on the socket, for the router
                    break
                assert request.id is not None
                started = time.monotonic()
                limit = request.timeout
                if max_call_seconds is not None and (limit is None or max_call_seconds < limit):
                    limit = max_call_seconds
                state.running(request.id, None if limit is None else started + limit, request.method)
                if waiting:
                    # Taken only now, in one call: killed before this, the router finds it unread.
                    try:
                        sock.recv_into(peeked, waiting)
                    except OSError:
                        state.idle()
                        reason = EndReason.CLOSED
                        break
                body = None
                reply = execute(request)
                # Looked at before the reply goes out: a request already waiting was sent before
                # this answer could be read, so the client pipelines calls that take a while, which
                # other handlers could run meanwhile. (Looked at after, it may be the next call of a
                # client that calls one at a time and was quicker than this handler to get there.)
                pipelined = time.monotonic() - started >= PARALLEL_WORTHY_SECONDS and _readable(sock)
                if not _send_reply(fd, state, reply, whole_bytes, send_timeout):
                    reason = EndReason.BROKEN
                    break
                served += 1
                if on_call is not None:
                    on_call(request, reply, started)
                if pipelined:
                    reason = EndReason.PIPELINED
                    break
            ready = poller.poll(idle_ms)
            if not ready:
                break
            if len(ready) > 1 or ready[0][0] != fd:  # the pipe: the router wants the handler back
                reason = EndReason.RECALLED
                break
            try:
                count = sock.recv_into(peeked, PEEK_BYTES, socket.MSG_PEEK)
            except OSError:
                reason = EndReason.CLOSED
                break
            if not count:
                reason = EndReason.CLOSED
                break
            size = _SHORT.unpack_from(peeked)[0] if count >= 4 else -1
            if not 0 <= size <= MAX_LENT_FRAME or count < 4 + size:
                reason = EndReason.PARTIAL  # not whole yet, or large: the router reads it
                break
            body, waiting = view[4 : 4 + size], 4 + size
    finally:
        state.idle()
        sock.close()  # our copy of the descriptor; the router keeps its own
    return LeaseEnd(reason, served)


def _servable(body: bytes | memoryview, streams: frozenset[str]) -> protocol.Request | None:
    """The request in ``body`` if the handler serves it on the lent socket: checked as the
    router checks every frame (and decoded once); pings, notifications, calls of
    generator functions (``streams``) and anything malformed are the router's."""
    try:
        request = protocol.decode_call(body)
    except ProtocolError:
        return None
    if request.id is None or request.method == protocol.PING or request.method in streams:
        return None
    return request


def _refuse(fd: int, state: CallState, frame: bytes, whole_bytes: int, send_timeout: float | None) -> bool:
    """Answer a lent request the handler cannot run with the ProtocolError saying why."""
    envelope = protocol.parse_envelope(frame)  # the router read it, so it reads
    assert envelope.id is not None
    try:
        protocol.decode_call(frame)
        error = ProtocolError("this request cannot be served on a lent socket")  # not reached: the router checks it
    except ProtocolError as exc:
        error = exc
    state.running(envelope.id, None)
    return _send_reply(fd, state, protocol.error_frame(envelope.id, error), whole_bytes, send_timeout)


def _send_reply(fd: int, state: CallState, reply: bytes, whole_bytes: int, send_timeout: float | None) -> bool:
    """Write one reply frame, posting its progress after each send; False if the socket failed
    or took nothing for ``send_timeout`` seconds (the client stopped reading)."""
    small = len(reply) < PEEK_BYTES
    header = _SHORT.pack(len(reply)) if small else frame_header(len(reply))
    size = len(header) + len(reply)
    state.writing(size, size <= whole_bytes)
    try:
        if small:
            # A small reply goes as one buffer in one write, which usually takes it all.
            data = header + reply
            try:
                sent = os.write(fd, data)  # a raw write of frame bytes
            except BlockingIOError:
                sent = 0
            if sent:
                state.sent(sent)
            if sent == size:
                return True
            return _send_rest(fd, state, [memoryview(data)[sent:]], sent, send_timeout)
        return _send_rest(fd, state, [memoryview(header), memoryview(reply)], 0, send_timeout)
    except OSError:
        return False
    finally:
        # The call is done, whatever became of its reply: counted before going idle, so a
        # handler killed in between is never taken for one that had not started its call.
        state.answered()
        state.idle()


def _send_rest(fd: int, state: CallState, parts: list[memoryview], sent: int, send_timeout: float | None) -> bool:
    """Write ``parts``, the rest of a reply of which ``sent`` bytes went out, waiting for room."""
    # The socket is non-blocking (its flags are the router's too): wait for room with poll.
    room = select.poll()
    room.register(fd, select.POLLOUT)
    wait_ms = -1 if not send_timeout else int(send_timeout * 1000)
    for part in parts:
        while part:
            try:
                count = os.write(fd, part)  # a raw write of frame bytes
            except BlockingIOError:
                if not room.poll(wait_ms):
                    return False
                continue
            sent += count
            state.sent(sent)
            part = part[count:]
    return True


def _whole_send_bytes(sock: socket.socket) -> int:
    """The largest reply this socket sends all or nothing (0 if it may always send part of one).

    Linux queues what one send() puts on a Unix stream socket in buffers of at
    most half the send buffer (and about 36 KiB); each goes whole or not at all.
    """
    if sock.family != socket.AF_UNIX:
        return 0
    try:
        half = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 64
    except OSError:
        return 0
    return max(min(_WHOLE_SEND_BYTES, half), 0)


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
