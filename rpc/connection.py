"""One client connection on the server side: ordered replies that never block the sender.

Replies are written with a non-blocking send; what the socket cannot take at once
waits in a bounded outbox that a writer thread drains, started only when needed.
So a client that stops reading stalls nobody but itself: once its outbox passes
the bound its requests are no longer read, and if it makes no progress for the
send timeout it is dropped.

Whatever ends a connection from the server's side records why (:meth:`drop`, or a
failed send), and the thread reading the connection logs it once.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

from . import lease, protocol, transport

__all__ = ["ClientConnection"]

_SMALL = 65536  # frames up to this size are joined with their header into one buffer
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!iQ")


def _framed(frame: bytes) -> list[memoryview]:
    """``frame`` with its ``multiprocessing.connection`` length header, as buffers to send."""
    size = len(frame)
    header = _LENGTH.pack(size) if size <= 0x7FFFFFFF else _LONG_LENGTH.pack(-1, size)
    if size <= _SMALL:
        return [memoryview(header + frame)]
    return [memoryview(header), memoryview(frame).cast("B")]


class ClientConnection:
    """An authenticated client as the server sees it.

    ``answer`` is for answers to accepted calls (it counts them down in
    ``pending``); ``reply`` is for the server's own messages.
    """

    def __init__(self, conn: Connection, peer: str, outbox_limit: int) -> None:
        self.conn = conn
        self.peer = peer
        self.outbox_limit = outbox_limit
        self.handshake_deadline: float | None = None
        self.timed_out = False
        self.closed = False
        self.broken = False  # a send failed or timed out: nothing more can be sent
        self.broken_reason = ""
        self.broken_level = "warning"
        self.drop_reason: str | None = None  # why the server ended this connection, if it did
        self.drop_level = "warning"
        self.pending = 0  # calls accepted from this client and not yet answered
        self.last_read = time.monotonic()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._outbox: deque[memoryview] = deque()
        self._outbox_bytes = 0
        self._writer: threading.Thread | None = None
        # A socket object over the same descriptor, for non-blocking sendmsg();
        # detached on close so the descriptor is closed once, by the Connection.
        self._sock = socket.socket(fileno=conn.fileno())

    def begin_lease(self) -> None:
        """The socket is lent to a handler: this client counts as busy until it is back."""
        with self._lock:
            self.pending += 1
            self._lease_done = threading.Event()
            self._lease_result: tuple[str, bytes | None] = ("crashed", None)

    def end_lease(self, reason: str, unserved: bytes | None) -> None:
        """The handler gave the socket back; ``unserved`` is a frame it left for the server."""
        with self._lock:
            self.pending -= 1
            self.last_read = time.monotonic()
            self._lease_result = (reason, unserved)
        self._lease_done.set()

    def wait_lease(self) -> tuple[str, bytes | None]:
        """Block until the lent socket is back; why it came back, and any frame left to handle."""
        self._lease_done.wait()
        return self._lease_result

    def expect_answer(self, count: int) -> None:
        """Count calls accepted from this client (+1) or refused after all (-1)."""
        with self._lock:
            self.pending += count

    def answer(self, frame: bytes) -> None:
        """Send the answer of a call accepted from this client."""
        self._write(frame)
        with self._lock:
            self.pending -= 1

    def reply(self, frame: bytes) -> None:
        """Send a message that answers no accepted call (a rejection, an error)."""
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        parts = _framed(frame)
        with self._lock:
            if self.closed or self.broken:
                return
            if not self._outbox:
                try:
                    sent = self._sock.sendmsg(parts, [], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._break(exc)
                    return
                parts = _consume(parts, sent)
                if not parts:
                    return
            for part in parts:
                self._outbox.append(part)
                self._outbox_bytes += len(part)
            if self._writer is None:
                writer = threading.Thread(target=self._drain, name=f"rpc-writer-{self.peer}", daemon=True)
                try:
                    writer.start()
                except RuntimeError as exc:  # no thread to be had (a pids limit): this client loses, nobody else
                    self._break_with(f"no thread could be started to send its replies: {exc}")
                    return
                self._writer = writer

    def _drain(self) -> None:
        """The writer thread: send the outbox in order, blocking up to the socket's send timeout."""
        while True:
            with self._lock:
                if not self._outbox or self.closed or self.broken:
                    self._writer = None
                    self._room.notify_all()
                    return
                part = self._outbox[0]
            try:
                sent = self._sock.sendmsg([part])
            except OSError as exc:  # a timeout (the client stopped reading) or a reset
                with self._lock:
                    self._break(exc)
                continue
            with self._lock:
                if sent == len(part):
                    self._outbox.popleft()
                else:
                    self._outbox[0] = part[sent:]
                self._outbox_bytes -= sent
                self._room.notify_all()

    def _break(self, exc: OSError) -> None:
        """Under the lock: stop sending, and wake the reader so it drops the connection."""
        if isinstance(exc, (BlockingIOError, TimeoutError)):
            self._break_with("it stopped reading its replies (a send made no progress within send_timeout)")
        else:
            # A closed or reset peer went away (after its own CallTimeout, say): no fault, so info.
            gone = isinstance(exc, (BrokenPipeError, ConnectionResetError))
            self._break_with(f"sending a reply failed: {exc.strerror or exc}", "info" if gone else "warning")

    def _break_with(self, reason: str, level: str = "warning") -> None:
        """Under the lock: stop sending for ``reason``, and wake the reader so it drops the connection."""
        if not self.broken:
            self.broken_reason, self.broken_level = reason, level
        self.broken = True
        self._outbox.clear()
        self._outbox_bytes = 0
        self._room.notify_all()
        transport.shutdown(self.conn)

    def wait_for_room(self) -> None:
        """Block while the outbox is over its bound: stop taking requests from a client that does not read."""
        with self._lock:
            while self._outbox_bytes > self.outbox_limit and not (self.closed or self.broken or self.drop_reason):
                self._room.wait()

    def drop(self, reason: str, level: str = "warning") -> None:
        """End the connection from the server's side; the reading thread logs ``reason`` at ``level``."""
        with self._lock:
            if self.drop_reason is None:
                self.drop_reason, self.drop_level = reason, level
            self._room.notify_all()
        transport.shutdown(self.conn)  # wakes the reading thread

    def end_reason(self) -> tuple[str, str] | None:
        """Why the server ended this connection, and the log level to say it at; None if it did not."""
        with self._lock:
            if self.drop_reason is not None:
                return self.drop_reason, self.drop_level
            if self.broken:
                return self.broken_reason, self.broken_level
            return None

    def waiting_request_id(self) -> int | None:
        """The id of a request waiting whole and unread at the head of the socket, if there is one.

        Used while no thread reads the socket: after a handler serving it died.
        """
        with self._lock:
            if self.closed:
                return None
            try:
                peeked = self._sock.recv(lease.PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return None
        frame = lease.whole_frame(peeked, lease.PEEK_BYTES)
        if frame is None:
            return None
        try:
            return protocol.parse_envelope(frame[4:]).id
        except protocol.ProtocolError:
            return None

    def idle_since(self) -> float | None:
        """When this connection went idle (nothing pending, nothing to send), or None if busy."""
        with self._lock:
            if self.pending or self._outbox:
                return None
            return self.last_read

    def close(self) -> None:
        # Under the lock, so no sender writes to a descriptor number reused later.
        with self._lock:
            if not self.closed:
                self.closed = True
                self._outbox.clear()
                self._outbox_bytes = 0
                self._room.notify_all()
                self._sock.detach()
                self.conn.close()


def _consume(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``parts`` after the first ``sent`` bytes went out."""
    while parts and sent >= len(parts[0]):
        sent -= len(parts[0])
        parts = parts[1:]
    if parts and sent:
        parts = [parts[0][sent:], *parts[1:]]
    return parts
