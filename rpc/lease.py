"""The latency fast path: a handler serving one client's socket directly for a while.

Per-call dispatch costs a hop through the server for every call. When a client
calls one at a time and handlers are to spare, the server lends the client's
socket to a handler, which reads requests and writes replies itself until the
client goes quiet, the server recalls it, or something it does not handle
arrives; then the socket goes back. Requests are read whole, so the server
resumes at a frame boundary. While a call runs, the handler posts its id and
deadline in memory the server shares, so the server can still enforce deadlines
and answer for a handler that dies.

A handler may be killed at any moment, so the shared state is written in an order
that lets the server tell what the client has and has not received (see
:func:`rpc.supervisor.HandlerPool._reap_lease`): a request is posted as running
before it is taken off the socket, and each send's progress is posted after it.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from . import protocol

__all__ = ["IDLE_SECONDS", "CallState", "serve_lease"]

PING = "_rpc.ping"  # answered by the server itself

# A lent socket goes back after this long without a request.
IDLE_SECONDS = 0.005
# A client that pipelines calls this long gets them spread over all handlers instead.
PARALLEL_WORTHY_SECONDS = 0.001


class CallState:
    """The call a handler runs on a lent socket, in memory shared with the server.

    Slots: 0 what (0 nothing, 1 running, 2 writing the reply), 1 deadline
    (time.monotonic(), 0 for none), 2 request id, 3 calls done in this lease,
    4 bytes of the reply frame, 5 bytes of it sent so far, 6 whether the kernel
    sends that frame all or nothing (1) or may send part of it (0).
    """

    SIZE = 7

    IDLE, RUNNING, WRITING = 0.0, 1.0, 2.0

    def __init__(self, array: Any) -> None:
        self.array = array

    def running(self, request_id: int, deadline: float | None) -> None:
        self.array[2] = float(request_id)
        self.array[1] = deadline or 0.0
        self.array[0] = self.RUNNING

    def writing(self, size: int = 0, whole: bool = False) -> None:
        self.array[4] = float(size)
        self.array[5] = 0.0
        self.array[6] = 1.0 if whole else 0.0
        self.array[0] = self.WRITING

    def sent(self, count: int) -> None:
        self.array[5] = float(count)

    def idle(self) -> None:
        self.array[0] = self.IDLE

    def answered(self) -> None:
        self.array[3] += 1

    def reset(self) -> None:
        for i in range(self.SIZE):
            self.array[i] = 0.0

    def read(self) -> tuple[float, float | None, int, int]:
        what, deadline, request_id, answered = self.array[0], self.array[1], self.array[2], self.array[3]
        return what, (deadline or None), int(request_id), int(answered)

    def reply_progress(self) -> tuple[int, int, bool]:
        """Of the reply being written: its size, the bytes known sent, and whether it goes all or nothing."""
        return int(self.array[4]), int(self.array[5]), self.array[6] == 1.0


PEEK_BYTES = 65536


# A send on a Unix stream socket of at most this many bytes goes out in one kernel
# buffer: all of it or none, even if the sender is killed during the call.
_WHOLE_SEND_BYTES = 32 * 1024


def _peek_whole_frame(sock: socket.socket, max_message_bytes: int) -> bytes | None:
    """The next frame, with its header, if all of it is already waiting; consumes nothing.

    Returns b"" at the end of the stream, and None when the frame is incomplete,
    too large for one read, or over the size limit: then the server reads it instead.
    """
    peeked = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
    if not peeked:
        return b""
    return whole_frame(peeked, max_message_bytes)


def whole_frame(peeked: bytes, max_message_bytes: int) -> bytes | None:
    """The first frame of ``peeked``, header included, if all of it is there and within the limit."""
    if len(peeked) < 4:
        return None
    size = int.from_bytes(peeked[:4], "big", signed=True)
    if size < 0 or size > max_message_bytes or len(peeked) < 4 + size:
        return None
    return peeked[: 4 + size]


def serve_lease(
    pipe: Connection, message: bytes, execute: Any, state: CallState, max_message_bytes: int,
    max_call_seconds: float | None, on_call: Any,
) -> bytes:
    """Serve a lent socket until it should go back; returns the LEASE_END message."""
    _, frame, _peer = protocol.decode_value(message)
    sock = socket.socket(fileno=reduction.recv_handle(pipe))  # our own copy of the descriptor
    # One poll object for the whole lease: cheaper per call than connection.wait().
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(pipe.fileno(), select.POLLIN)
    idle_ms = int(IDLE_SECONDS * 1000)
    pipe_fd = pipe.fileno()
    whole_bytes = _whole_send_bytes(sock)
    served, reason, unserved = 0, "idle", None
    waiting: bytes | None = None  # a whole frame still on the socket: taken once it is posted as running
    try:
        while True:
            if frame is not None or waiting is not None:
                try:
                    request = protocol.decode_request(frame if frame is not None else waiting[4:])  # type: ignore[index]
                except protocol.ProtocolError:
                    request = None
                if request is None or request.id is None or request.method == PING:
                    # The server handles everything else: the frame it lent us, or the one left unread.
                    reason, unserved = "frame", frame
                    break
                started = time.monotonic()
                limits = [t for t in (request.timeout, max_call_seconds) if t is not None]
                state.running(request.id, started + min(limits) if limits else None)
                if waiting is not None:
                    # Taken only now, in one call: killed before this, the server finds it unread.
                    try:
                        sock.recv(len(waiting))
                    except OSError:
                        state.idle()
                        reason = "closed"
                        break
                frame = waiting = None
                reply = execute(request)
                if not _send_reply(sock, state, reply, whole_bytes):
                    reason = "broken"  # the client stopped reading or went away
                    break
                served += 1
                on_call(request, reply, started)
                if time.monotonic() - started >= PARALLEL_WORTHY_SECONDS and _readable(sock):
                    # The client sends its next call before reading this answer: it pipelines
                    # calls that take a while, which other handlers could run meanwhile.
                    reason = "pipelined"
                    break
            ready = poller.poll(idle_ms)
            if any(fd == pipe_fd for fd, _ in ready):
                reason = "recalled"
                break
            if not ready:
                break
            try:
                peeked = _peek_whole_frame(sock, max_message_bytes)
            except OSError:
                reason = "closed"
                break
            if peeked == b"":
                reason = "closed"
                break
            if peeked is None:
                reason = "partial"  # the server reads what is not whole yet
                break
            waiting = peeked
    finally:
        sock.close()  # our copy of the descriptor; the server keeps its own
    return protocol.encode_internal(protocol.LEASE_END, reason, unserved, served)


def _send_reply(sock: socket.socket, state: CallState, reply: bytes, whole_bytes: int) -> bool:
    """Write one reply frame, posting its progress after each send; False if the socket failed."""
    header = _header(len(reply))
    size = len(header) + len(reply)
    parts = [header + reply] if len(reply) < PEEK_BYTES else [header, reply]
    state.writing(size, size <= whole_bytes)
    sent = 0
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                count = os.write(sock.fileno(), view)  # a raw write of frame bytes
                sent += count
                state.sent(sent)
                view = view[count:]
    except OSError:
        return False
    finally:
        # The call is done, whatever became of its reply: counted before going idle, so a
        # handler killed in between is never taken for one that had not started its call.
        state.answered()
        state.idle()
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


def _header(size: int) -> bytes:
    """The ``multiprocessing.connection`` length header."""
    return struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
