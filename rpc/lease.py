"""The latency fast path: a handler serving one client's socket directly for a while.

Per-call dispatch costs a hop through the server for every call. When a client
calls one at a time and handlers are to spare, the server lends the client's
socket to a handler, which reads requests and writes replies itself until the
client goes quiet, the server recalls it, or something it does not handle
arrives; then the socket goes back. Requests are read whole, so the server
resumes at a frame boundary. While a call runs, the handler posts its id and
deadline in memory the server shares, so the server can still enforce deadlines
and answer for a handler that dies.
"""

from __future__ import annotations

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
    (time.monotonic(), 0 for none), 2 request id, 3 calls answered in this lease.
    """

    SIZE = 4

    IDLE, RUNNING, WRITING = 0.0, 1.0, 2.0

    def __init__(self, array: Any) -> None:
        self.array = array

    def running(self, request_id: int, deadline: float | None) -> None:
        self.array[2] = float(request_id)
        self.array[1] = deadline or 0.0
        self.array[0] = self.RUNNING

    def writing(self) -> None:
        self.array[0] = self.WRITING

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


_PEEK_BYTES = 65536


def _take_whole_frame(sock: socket.socket, max_message_bytes: int) -> bytes | None:
    """Consume the next frame only if all of it is already waiting; else consume nothing.

    The frame is taken with one system call, so a handler killed at any moment
    leaves the socket at a frame boundary for the server. Returns b"" at the end
    of the stream, and None when the frame is incomplete, too large for one
    read, or over the size limit: then the server reads it instead.
    """
    peeked = sock.recv(_PEEK_BYTES, socket.MSG_PEEK)
    if not peeked:
        return b""
    if len(peeked) < 4:
        return None
    size = int.from_bytes(peeked[:4], "big", signed=True)
    if size < 0 or size > max_message_bytes or len(peeked) < 4 + size:
        return None
    data = sock.recv(4 + size)
    return data[4:]


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
    served, reason, unserved = 0, "idle", None
    try:
        while True:
            if frame is not None:
                try:
                    request = protocol.decode_request(frame)  # decoded once: run from this
                except protocol.ProtocolError:
                    request = None
                if request is None or request.id is None or request.method == PING:
                    reason, unserved = "frame", frame  # the server handles everything else
                    break
                started = time.monotonic()
                limits = [t for t in (request.timeout, max_call_seconds) if t is not None]
                state.running(request.id, started + min(limits) if limits else None)
                reply = execute(request)
                state.writing()
                try:
                    sock.sendall(_header(len(reply)) + reply if len(reply) < _PEEK_BYTES else _header(len(reply)))
                    if len(reply) >= _PEEK_BYTES:
                        sock.sendall(reply)
                except OSError:
                    reason = "broken"  # the client stopped reading or went away
                    break
                finally:
                    state.idle()
                state.answered()
                served += 1
                on_call(request, reply, started)
                frame = None
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
                taken = _take_whole_frame(sock, max_message_bytes)
            except OSError:
                reason = "closed"
                break
            if taken == b"":
                reason = "closed"
                break
            if taken is None:
                reason = "partial"  # the server reads what is not whole yet
                break
            frame = taken
    finally:
        sock.close()  # our copy of the descriptor; the server keeps its own
    return protocol.encode_internal(protocol.LEASE_END, reason, unserved, served)


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _header(size: int) -> bytes:
    """The ``multiprocessing.connection`` length header."""
    return struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
