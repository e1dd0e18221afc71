"""The router: one event loop that moves every frame between clients and handlers.

One thread of the supervisor process runs it; nothing on a call's path takes a
lock or crosses a thread. For each client connection it runs the authkey
handshake (a state machine under a timer), reads frames, checks each request's
envelope (kind, id, method, deadline) without decoding its arguments, and hands
the frame untouched to an idle handler's pipe, or queues it (:mod:`rpc.calls`).
A handler's reply goes back to the connection its call came from. A call of a
generator function is answered by a stream (see :mod:`rpc.streams`): the router
forwards its start and items to the client, and the client's credits and close
to the handler, which stays the call's until the stream ends.

Backpressure comes from the transports: a connection whose unsent replies pass
``max_outbox_bytes`` is not read until they drain, and a reply for it waits,
with its handler, until then (so the bytes a slow reader holds stay bounded); a
client that takes nothing for ``send_timeout`` seconds is dropped. Deadlines,
idle timeouts and handshake deadlines are loop timers. Handler processes are the
arbiter's (:mod:`rpc.arbiter`); the router only reads and writes their pipes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import deque
from typing import Any, cast

from . import lease, metrics, protocol, tls
from .arbiter import Arbiter, ArbiterSettings, Handler
from .calls import Call, CallTable
from .config import ServerConfig
from .errors import (
    AuthenticationError,
    CallCancelled,
    CallTimeout,
    MessageTooLarge,
    ProtocolError,
    RPCError,
    ServerBusy,
    ServerShuttingDown,
    WorkerCrashed,
)
from .framing import Frame, FrameDecoder, ReceiveBudget, frame_header, framed_small, scratch_buffer
from .handler import HandlerSettings
from .handshake import MAX_HANDSHAKE_FRAME, ServerHandshake
from .logs import Logger, Throttle
from .transport import format_address

__all__ = ["Router"]

HOUSEKEEPING_INTERVAL = 0.05  # seconds: the resolution of call deadlines
_HELLO_LIMIT = 65536
_LINGER_SECONDS = 1.0  # how long a connection closed after an error still drains its input
_LARGE = 1 << 16  # frames this big are written without joining header and payload
_ACCEPT_BATCH = 64  # connections accepted per wakeup, so a burst cannot starve calls in flight
_ACCEPT_BACKOFF = 0.05  # seconds, doubled up to _ACCEPT_BACKOFF_MAX while descriptors or memory run out
_ACCEPT_BACKOFF_MAX = 2.0
# A call still running this long after its client went away is cancelled (its handler stopped).
_GONE_GRACE = 0.1
_GONE = "by its client going away"
# A stream closed by its client (or its client going away) must end within this long (or its
# per-item timeout, if longer), or its handler is stopped: a generator stuck in its work.
STREAM_CLOSE_GRACE = 5.0
_SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Where a client connection is.
_HANDSHAKE, _HELLO, _SERVING, _CLOSING = range(4)


class Router:
    """The loop's side of a server: connections, handler pipes, the call table, timers."""

    def __init__(self, config: ServerConfig, handler_settings: HandlerSettings, hello: bytes, log: Logger) -> None:
        self.config = config
        self.log = log
        self.hello = framed_small(hello)
        self.table = CallTable(config.workers, config.max_pending, config.max_queue_bytes, config.max_call_seconds)
        self.arbiter = Arbiter(
            ArbiterSettings(config.workers, config.start_method, config.startup_timeout),
            handler_settings,
            log,
            self._attach,
            self._retire,
            self.handler_gone,
        )
        self.pipes: list[HandlerPipe | None] = [None] * config.workers
        self.lent: dict[int, ClientConnection] = {}  # slot -> the connection its handler serves
        self.scratch = scratch_buffer()  # where every small read lands (the loop reads one socket at a time)
        self.recalled: set[int] = set()  # lent slots asked to give their socket back
        self.connections: set[ClientConnection] = set()
        # Large requests being received, over all connections, hold at most max_receive_bytes;
        # connections starting one past that wait here, in order, until some arrive whole.
        self.receive_budget = ReceiveBudget(config.max_receive_bytes, self._budget_released)
        self.starved: deque[ClientConnection] = deque()
        self._gone_since: dict[int, tuple[int, float]] = {}  # lent slot -> (call id, when its client was seen gone)
        self._waking_starved = False
        self.notification_dropped = Throttle("notification_dropped")
        self.counts = metrics.CallCounts()  # what /metrics reports (rpc.metrics)
        # Answered calls are counted only if someone can read the counts: counting costs each
        # about a microsecond (the few calls refused or lost are counted anyway).
        self.counting = config.metrics_address is not None
        self.closing = False
        self._stopping_handlers = False  # handlers that exit from now on are not replaced
        self._hurry = asyncio.Event()
        self._settled = asyncio.Event()  # set whenever no call is left unanswered
        self._listening: socket.socket | None = None
        self._accepting = False
        self._accept_backoff = _ACCEPT_BACKOFF
        self._housekeeping: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lending = lease.enabled(config)
        # With TLS, each connection's protocol sits on a rpc.tls.ServerTLS layer.
        self.tls = (
            tls.server_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
            if config.tls_cert_file is not None and config.tls_key_file is not None
            else None
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, listening: socket.socket) -> None:
        """Start the handlers, then accept clients on ``listening``."""
        self.loop = loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        await self.arbiter.start()
        self._listening = listening
        loop.add_reader(listening.fileno(), self._accept)
        self._housekeeping = loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeep)

    async def close(self, grace: float) -> int:
        """Stop accepting, fail queued calls, let running ones finish within ``grace`` s, stop handlers.

        Returns how many calls were still unanswered when the grace period ended.
        """
        self.closing = True
        self._stop_listening()
        for slot in list(self.lent):
            if slot not in self.recalled and (pipe := self.pipes[slot]) is not None:
                self.recalled.add(slot)
                pipe.write_frame(lease.RECALL)
        for connection in list(self.connections):
            if connection.held:
                connection.unhold()  # what it sent beyond its share is answered: ServerShuttingDown
        for call in self.table.close():
            self._answer(call, protocol.error_frame(call.id, ServerShuttingDown("the server is shutting down; the call did not run")), None, "shutting_down")
        for streaming in list(self.table.running):
            # A stream could run for ever: close it now (its generator's finally blocks run), and tell its client.
            if streaming is not None and streaming.stream is not None and self.table.settle(streaming):
                self._close_stream(streaming, "by the server shutting down")
                error = ServerShuttingDown("the server is shutting down; the stream was closed")
                self._answer(streaming, protocol.stream_end_frame(streaming.id, error), None, "shutting_down")
        for connection in list(self.connections):
            connection.go_away()  # (a lent one's, once its handler gives the socket back)
        try:
            deadline = time.monotonic() + grace
            # Calls running, and replies of calls that ran but wait for a slow reader, may finish.
            while self._unfinished() and not self._hurry.is_set() and (remaining := deadline - time.monotonic()) > 0:
                self._settled.clear()
                waits = [asyncio.ensure_future(self._settled.wait()), asyncio.ensure_future(self._hurry.wait())]
                _, pending = await asyncio.wait(
                    waits, timeout=min(remaining, HOUSEKEEPING_INTERVAL), return_when=asyncio.FIRST_COMPLETED
                )
                for waiting in pending:
                    waiting.cancel()
        finally:
            unfinished = self._unfinished()
            for connection in list(self.connections):
                connection.drop("the server is shutting down", level="info")
            self._stopping_handlers = True
            await self.arbiter.stop(0 if self._hurry.is_set() else 2.0)
            for connection in list(self.connections):  # any adopted meanwhile
                connection.drop("the server is shutting down", level="info")
            for _ in range(3):
                await asyncio.sleep(0)  # let the transports report themselves closed
            if self._housekeeping is not None:
                self._housekeeping.cancel()
            self.notification_dropped.flush()
        return unfinished

    def _unfinished(self) -> int:
        """Calls accepted and not answered, counting replies still parked for a slow reader."""
        return self.table.unanswered + sum(len(c.parked) for c in self.connections)

    def hurry(self) -> None:
        """A second request to stop: cut the grace period short."""
        self._hurry.set()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = context.get("message", "")
        if isinstance(exc, OSError) and "accept" in message:
            self.log.error("accept_failed", error=exc.strerror or str(exc))
        else:
            self.log.error("router_error", error=message, exception=repr(exc) if exc is not None else None)

    # -- handlers -----------------------------------------------------------------------

    async def _attach(self, handler: Handler) -> None:
        """Serve a new handler's pipe until it closes, then account for its call."""
        assert self.loop is not None
        closed: asyncio.Future[None] = self.loop.create_future()
        transport, pipe = await self.loop.create_unix_connection(
            lambda: HandlerPipe(self, handler, closed), sock=handler.pipe
        )
        self.pipes[handler.slot] = pipe
        handler.end_input = pipe.end_input
        self.counts.know(handler.methods)
        if handler.retired:
            pipe.end_input()  # a reload began while it started: it may run the old code
        else:
            self.table.reopen(handler.slot)
            self._release(handler.slot)
        try:
            await closed
        finally:
            if self.pipes[handler.slot] is pipe:
                self.pipes[handler.slot] = None

    def _retire(self, slot: int) -> None:
        """A reload replaces the slot's handler: it takes no more calls and exits once idle."""
        if self.table.retire(slot):
            pipe = self.pipes[slot]
            if pipe is not None:
                pipe.end_input()
        elif slot in self.lent:
            # A client calling without pause would keep a lent socket forever: ask for it back.
            self._recall(slot, "reload")

    def handler_gone(self, handler: Handler, reason: str) -> None:
        """A handler's process was collected: fail the call it held, if any."""
        if not self._stopping_handlers:
            self.counts.replaced(metrics.replacement_reason(handler.kill_reason, reason))
        self._take_lent_calls(handler)  # those it served on lent sockets and had not been taken
        call = self.table.lost(handler.slot)
        lent = self.lent.pop(handler.slot, None)
        self._gone_since.pop(handler.slot, None)
        self.recalled.discard(handler.slot)
        if lent is not None:
            self._reap_lease(handler, lent, call, reason)
            return
        if call is None:
            return
        if handler.kill_reason is not None and call.deadline is not None and time.monotonic() >= call.deadline:
            error: RPCError = _timeout(call)
            outcome = "timeout"
        else:
            error = WorkerCrashed(f"the handler process (pid {handler.pid}) died during this call: {reason}")
            outcome = "crashed"
        self._answer(call, self._failure_frame(call, error), handler.pid, outcome)

    def handler_replied(self, handler: Handler, reply: Frame) -> None:
        slot = handler.slot
        if (internal := protocol.internal_kind(reply)) is not None:
            if internal == protocol.LEASE_END:
                self._lease_ended(handler, lease.LeaseEnd.decode(reply))
            elif internal == protocol.LEASE_TALLY:  # it served many calls on a lent socket
                self._take_lent_calls(handler, metrics.read_tally(reply))
            return
        if reply[0] != 0x94 and (kind := protocol.stream_kind(reply)) is not None:  # (a response is an array of 4)
            self._stream_message(handler, kind, reply)
            return
        call = self.table.running[slot]
        if call is None or handler.kill_reason is not None or not self.table.settle(call):
            return  # a late result of a call already answered (CallTimeout): its handler is being stopped
        self._note_settled()
        connection = call.connection
        if connection is not None and connection.must_park():
            connection.park(handler, call, reply)  # sent, and the handler freed, once it drains
            return
        self._deliver(call, reply, handler.pid)
        self._release(slot)

    def _deliver(self, call: Call, reply: Frame, pid: int | None) -> None:
        if call.connection is not None:
            call.connection.write_frame(reply)
        if self.counting or self.config.access_log:
            closed = call.stream is not None and call.stream.closing
            outcome = "closed" if closed else "error" if protocol.response_is_error(reply) else "ok"
            if self.counting:
                self.counts.call(call.method, outcome, time.monotonic() - call.received)
            if self.config.access_log:
                self._log_call(call, pid, outcome)

    # -- streams (rpc.streams) -------------------------------------------------------------

    def _stream_message(self, handler: Handler, kind: int, frame: Frame) -> None:
        """A stream's start, item or end from the handler running its call."""
        slot = handler.slot
        call = self.table.running[slot]
        if call is None or handler.kill_reason is not None:
            return  # its handler is being stopped: the call is answered already
        if call.answered:  # closed and answered by the router (shutdown): drop the rest
            if kind == protocol.STREAM_END:
                self._release(slot)
            return
        connection = call.connection
        if kind == protocol.STREAM_ITEM:
            stream = call.stream
            stream.window.sent(len(frame))
            if connection is not None:
                # Never parked: the window bounds what a stream has on its way.
                connection.write_frame(frame)
            self._arm(call)
        elif kind == protocol.STREAM_START:
            allowance = None if call.deadline is None else call.deadline - call.received
            call.stream = _CallStream(allowance)
            if connection is not None:
                connection.write_frame(frame)
            self._arm(call)
        elif call.stream is not None and self.table.settle(call):  # the end: answered, as a response
            self._note_settled()
            if connection is not None and connection.must_park():
                connection.park(handler, call, frame)
                return
            self._deliver(call, frame, handler.pid)
            self._release(slot)

    def _arm(self, call: Call) -> None:
        """A stream's deadline: its per-item timeout from now while its handler may send,
        none while its window is shut (the handler waits for the client, not the other way)."""
        stream = call.stream
        if stream.allowance is None or stream.closing:
            return
        call.deadline = time.monotonic() + stream.allowance if stream.window.open() else None

    def credit(self, connection: ClientConnection, request_id: int, frame: Frame) -> None:
        """The client consumed items of the stream ``request_id``: forward the credit to its handler."""
        call = self.table.find(connection, request_id)
        if call is None or call.stream is None or call.stream.closing or call.slot is None:
            return  # answered, closed, or not a stream: nothing to open
        pipe = self.pipes[call.slot]
        if pipe is not None:
            pipe.write_frame(frame)
        call.stream.window.credit(protocol.decode_credit(frame)[1])
        self._arm(call)

    def _close_stream(self, call: Call, how: str) -> None:
        """Ask the handler to close the stream's generator (its finally blocks run) and end it."""
        stream = call.stream
        if stream.closing or call.slot is None:
            return
        stream.closing = True
        pipe = self.pipes[call.slot]
        if pipe is not None:
            pipe.write_frame(protocol.encode_cancel(call.id if call.id is not None else 0))
        grace = max(STREAM_CLOSE_GRACE, stream.allowance or 0.0)
        call.deadline = time.monotonic() + grace
        log = call.connection.log if call.connection is not None else self.log
        log.info("stream_closed", method=call.method, id=call.id, how=how)

    def _failure_frame(self, call: Call, error: RPCError) -> bytes:
        """The message that fails ``call``: a response, or the end of the stream it started."""
        if call.stream is not None:
            return protocol.stream_end_frame(call.id, error)
        return protocol.error_frame(call.id, error)

    def _release(self, slot: int) -> None:
        """The slot's handler is free: give it its next call, or let it exit if it is retiring."""
        call, expired = self.table.release(slot, time.monotonic())
        pipe = self.pipes[slot]
        if call is not None and pipe is not None:
            pipe.write_frame(call.frame)
            self._left_queue(call)
        elif slot in self.table.retiring and pipe is not None:
            pipe.end_input()
        for late in expired:
            self._answer(late, protocol.error_frame(late.id, _expired(late)), None, "timeout")
            self._left_queue(late)

    def _left_queue(self, call: Call) -> None:
        """A call left the queue: its connection may be read again if it was held at its share."""
        connection = call.origin
        if connection is not None and connection.held and not self.table.over_share(connection):
            connection.unhold()

    # -- calls --------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        """Run or queue ``call``; ServerBusy or ServerShuttingDown if it cannot be taken."""
        slot = self.table.admit(call)
        if slot is not None:
            pipe = self.pipes[slot]
            if pipe is not None:
                pipe.write_frame(call.frame)
            # (no pipe: the handler is gone and its slot is being refilled; the call fails as crashed)
        elif self.lent:
            self._recall_one()  # a call waits: a lent handler is worth more serving it

    # -- the lease (rpc.lease) -----------------------------------------------------------

    def try_lease(self, connection: ClientConnection, call: Call) -> bool:
        """Lend ``connection``'s socket, with ``call``, to a spare handler; False to route it as usual.

        Only with nothing of this client in flight or unsent (so no reply can land in
        the middle of another), no byte of it read ahead, one handler left idle for
        others and no call waiting.
        """
        if len(self.table.idle) < 2:
            return False  # checked first: under load, the usual answer
        transport = connection.transport
        if (
            not self.lending
            or self.closing
            or transport is None
            or connection.held
            or connection.write_blocked
            or connection.parked
            or connection.decoder.buffered
            or transport.get_write_buffer_size()
            or len(call.frame) > lease.MAX_LENT_FRAME
            or self.table.inflight(connection)
        ):
            return False
        candidate = self.pipes[self.table.idle[-1]]
        if (
            candidate is None
            or call.method in candidate.handler.streams  # a stream is the router's to follow
            or candidate.transport is None
            or candidate.transport.is_closing()
            or candidate.transport.get_write_buffer_size()
        ):
            return False
        slot = self.table.lend(call)
        if slot is None:
            return False
        handler = self.arbiter.handlers[slot]
        assert handler is not None
        lease.CallState(handler.call_state).reset()  # the handler is idle: nobody writes it now
        transport.pause_reading()
        connection.lent = handler
        self.lent[slot] = connection
        try:
            lease.send_lease(candidate.fd, bytes(call.frame), connection.fd)
        except OSError as exc:
            # The handler may have the message but not the socket: stop it. Seeing that it
            # never started the call, the router then runs it (see _reap_lease).
            self.log.warning("lease_failed", slot=slot, pid=handler.pid, error=str(exc))
            self.arbiter.kill(slot, f"the lent socket could not be handed to it: {exc}")
        return True

    def _recall_one(self) -> None:
        for slot in self.lent:
            if slot not in self.recalled:
                self._recall(slot, "a call waits")
                return

    def _recall(self, slot: int, why: str) -> None:
        """Ask the handler lent a socket to give it back after its current call."""
        pipe = self.pipes[slot]
        if pipe is not None and slot not in self.recalled:
            self.recalled.add(slot)
            pipe.write_frame(lease.RECALL)
            self.log.debug("lease_recalled", slot=slot, why=why)

    def _lease_ended(self, handler: Handler, end: lease.LeaseEnd) -> None:
        """The handler gave the lent socket back: read it again, and free the handler."""
        slot = handler.slot
        self._take_lent_calls(handler, end.tally)  # the calls it served on the socket
        connection = self.lent.pop(slot, None)
        self._gone_since.pop(slot, None)
        self.recalled.discard(slot)
        call = self.table.running[slot]
        if call is not None and call.lease and self.table.settle(call):
            self._note_settled()
        if connection is not None:
            connection.lent = None
            # What the handler left on the socket is the router's to read, and not to lend again.
            connection.may_lend = end.reason not in (lease.EndReason.FRAME, lease.EndReason.PARTIAL, lease.EndReason.PIPELINED)
            if end.reason is lease.EndReason.BROKEN:
                connection.drop("it stopped reading its replies, or went away: a send on the lent socket failed")
            else:
                self._socket_returned(handler, connection)
                connection.resume_after_lease()
        if handler.kill_reason is None:
            self._release(slot)

    def _take_lent_calls(self, handler: Handler, counted: Any = None) -> None:
        """Count the calls ``handler`` served on lent sockets and posted since they were last
        taken (rpc.lease.LentCalls), and any it ``counted`` itself (a CallCounts export)."""
        if counted is not None:
            self.counts.absorb(counted)
        names = handler.methods
        for number, failed, seconds in lease.LentCalls(handler.call_state).take():
            self.counts.call(names[number] if 0 <= number < len(names) else metrics.UNKNOWN, "error" if failed else "ok", seconds)

    def take_lent_calls(self) -> None:
        """Count what every handler has posted of its calls on lent sockets (before /metrics is read)."""
        for handler in self.arbiter.handlers:
            if handler is not None:
                self._take_lent_calls(handler)

    def _reap_lease(self, handler: Handler, connection: ClientConnection, call: Call | None, reason: str) -> None:
        """A handler died serving a lent socket: answer what its client is owed, and read it again.

        The handler is dead, so the router may write to the socket without interleaving.
        """
        connection.lent = None
        connection.may_lend = False
        if connection.closed:
            return
        state = lease.CallState(handler.call_state)
        owed, request_id = lease.what_is_owed(state, lambda: lease.waiting_request_id(connection.fd))
        if owed is lease.Owed.CUT:
            size, sent, _ = state.reply_progress()
            connection.drop(
                f"handler process (pid {handler.pid}) {reason} while writing a reply on the lent socket, "
                f"{sent} of its {size} bytes known sent: the stream may be cut mid-frame"
            )
            return
        if owed is lease.Owed.RUN_LENT and call is not None:
            again = Call(connection, call.id, call.method, call.frame, call.deadline, call.received)
            try:
                self.submit(again)
            except (ServerBusy, ServerShuttingDown) as exc:
                connection.write_frame(protocol.error_frame(call.id, exc))
                self.counts.call(call.method, "busy" if isinstance(exc, ServerBusy) else "shutting_down")
        elif owed is lease.Owed.CRASHED:
            _, deadline, _, _ = state.read()
            error: RPCError
            if handler.cancelled == request_id:
                error, outcome = CallCancelled("the call was cancelled"), "cancelled"
            elif handler.kill_reason is not None and deadline is not None and time.monotonic() >= deadline:
                error, outcome = CallTimeout("the call passed its deadline"), "timeout"
            else:
                error = WorkerCrashed(f"the handler process (pid {handler.pid}) died during this call: {reason}")
                outcome = "crashed"
            connection.write_frame(protocol.error_frame(request_id, error))
            number = state.method_number()
            self.counts.call(handler.methods[number] if 0 <= number < len(handler.methods) else metrics.UNKNOWN, outcome)
        self._socket_returned(handler, connection)
        connection.resume_after_lease()

    def _socket_returned(self, handler: Handler, connection: ClientConnection) -> None:
        """A lent socket came back: count the requests its handler read (the last it started is in
        its call state), and, if the server drains, send the go-away before the router reads it."""
        served_id = lease.CallState(handler.call_state).read()[2]
        connection.last_id = max(connection.last_id, served_id)
        if self.closing:
            connection.go_away()

    def _answer(self, call: Call, frame: bytes, pid: int | None, outcome: str) -> None:
        """Send the answer of a call already settled in the table (an error the router made)."""
        self._note_settled()
        if call.connection is not None:
            call.connection.write_frame(frame)
        if self.counting:
            self.counts.call(call.method, outcome, time.monotonic() - call.received)
        if self.config.access_log:
            self._log_call(call, pid, outcome)

    def _note_settled(self) -> None:
        if not self.table.unanswered:
            self._settled.set()

    def _log_call(self, call: Call, pid: int | None, outcome: str) -> None:
        self.log.info(
            "call",
            method=call.method,
            id=call.id,
            peer=call.connection.peer if call.connection is not None else None,
            pid=pid,
            ms=round((time.monotonic() - call.received) * 1000, 3),
            outcome=outcome,
        )

    def _housekeep(self) -> None:
        assert self.loop is not None
        try:
            running, queued = self.table.expire(time.monotonic())
        except Exception:  # deadlines must keep being enforced whatever went wrong once
            self.log.exception("housekeeping_failed")
            running, queued = [], []
        for call in running:
            try:
                assert call.slot is not None
                handler = self.arbiter.handlers[call.slot]
                if call.connection is not None and call.connection.closed:
                    self._stop_cancelled(call, _GONE)  # its grace after the disconnect ran out
                    # A client that gave up at its own timeout and left: its deadline, earlier than
                    # the disconnect's cutoff, ended the call.
                    ended_by_deadline = call.deadline != call.connection.gone_cutoff
                    outcome = "timeout" if ended_by_deadline else "cancelled"
                    self.counts.call(call.method, outcome, time.monotonic() - call.received)
                    continue
                # Stopped first: whatever becomes of the answer, the slot is not lost.
                self.arbiter.kill(call.slot, f"call {call.method!r} passed its deadline")
                self._answer(call, self._failure_frame(call, _timeout(call)), handler.pid if handler else None, "timeout")
            except Exception:
                self.log.exception("housekeeping_failed")
        for call in queued:
            try:
                self._answer(call, protocol.error_frame(call.id, _expired(call)), None, "timeout")
                self._left_queue(call)
            except Exception:
                self.log.exception("housekeeping_failed")
        try:
            self._check_lent_deadlines()
        except Exception:
            self.log.exception("housekeeping_failed")
        self._housekeeping = self.loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeep)

    def _check_lent_deadlines(self) -> None:
        now = time.monotonic()
        for slot in list(self.lent):
            handler = self.arbiter.handlers[slot]
            if handler is None or handler.kill_reason is not None:
                continue
            what, deadline, request_id, _ = lease.CallState(handler.call_state).read()
            if what != lease.CallState.RUNNING:
                continue
            if deadline is not None and now >= deadline:
                self.arbiter.kill(slot, "a call on a lent socket passed its deadline")
                continue
            # Its handler reads the socket only between calls: a cancel or a hang-up sent
            # while one runs waits there, and only the router can act on it now.
            connection = self.lent[slot]
            how = lease.cancel_waiting(connection.fd, request_id)
            if how == _GONE:
                # As for routed calls, a grace first: the same call seen running after it.
                since = self._gone_since.setdefault(slot, (request_id, now))
                if since[0] != request_id:
                    self._gone_since[slot] = (request_id, now)
                    continue
                if now - since[1] < _GONE_GRACE:
                    continue
            if how is not None:
                handler.cancelled = request_id
                self.arbiter.kill(slot, f"its call on a lent socket (id {request_id}) was cancelled {how}")
                connection.log.info("call_cancelled", id=request_id, was="running", how=how, leased=True)

    # -- cancelling -----------------------------------------------------------------------

    def cancel(self, connection: ClientConnection, request_id: int) -> None:
        """The client cancelled ``request_id``: unqueue it, or stop the handler running it.

        A call already answered (or never seen) is left alone: its answer may be on its way.
        """
        call = self.table.find(connection, request_id)
        if call is not None and call.stream is not None:
            self._close_stream(call, "by its caller")  # not stopped: its generator is closed, and it ends the stream
            return
        if call is None or not self.table.settle(call):
            return
        self._stop_cancelled(call, "by its caller")
        self._answer(call, protocol.error_frame(call.id, CallCancelled("the call was cancelled")), None, "cancelled")

    def _stop_cancelled(self, call: Call, how: str) -> None:
        """A settled ``call`` is cancelled: out of the queue, or its handler stopped (and replaced)."""
        where = "queued"
        if call.slot is None:
            self.table.unqueue(call)
            self._left_queue(call)
        else:
            where = "running"
            self.arbiter.kill(call.slot, f"its call {call.method!r} (id {call.id}) was cancelled {how}")
        log = call.connection.log if call.connection is not None else self.log
        log.info("call_cancelled", method=call.method, id=call.id, was=where, how=how)

    def forget(self, connection: ClientConnection) -> None:
        """A connection ended: drop its queued calls, cancel its running ones, and free the
        handlers its replies held.

        A disconnect cancels a running call only if it is still running after a short grace:
        stopping a handler costs a new process, far more than letting a short call finish.
        """
        self.table.forget(connection)
        cutoff = connection.gone_cutoff = time.monotonic() + _GONE_GRACE
        for call in self.table.running_of(connection):
            if call.stream is not None:
                self._close_stream(call, _GONE)  # its generator's finally blocks run
            else:
                call.deadline = cutoff if call.deadline is None else min(call.deadline, cutoff)
        self._note_settled()
        parked, connection.parked = connection.parked, []
        for handler, _call, _reply in parked:
            self._release_parked(handler)

    def _budget_released(self) -> None:
        if self.starved and not self._waking_starved and self.loop is not None:
            self._waking_starved = True
            self.loop.call_soon(self._wake_starved)

    def _wake_starved(self) -> None:
        """Room in the receive budget: let the connections that waited for it go on, in order."""
        self._waking_starved = False
        while self.starved:
            connection = self.starved[0]
            if not connection.closed and not connection.fed_from_budget():
                return  # still no room for its frame: it stays first in line
            self.starved.popleft()

    def unpark(self, connection: ClientConnection) -> None:
        """A connection drained: send the replies that waited for it, and free their handlers."""
        while connection.parked and not connection.over_hard_cap():
            handler, call, reply = connection.parked.pop(0)
            self._deliver(call, reply, handler.pid)
            self._release_parked(handler)
        if not connection.parked:
            connection.parked_since = None
            self._settled.set()  # a close() under way may be waiting for these replies

    def _release_parked(self, handler: Handler) -> None:
        """Free the handler that held a parked reply, unless it has died and been replaced since:
        its slot then belongs to a new handler, which may be running another call."""
        if self.arbiter.handlers[handler.slot] is handler and self.pipes[handler.slot] is not None:
            self._release(handler.slot)

    # -- accepting ----------------------------------------------------------------------

    def _accept(self) -> None:
        """The listening socket is readable: accept what is waiting (up to a batch)."""
        listening, loop = self._listening, self.loop
        assert listening is not None and loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _SHORTAGES:
                    # Out of descriptors or memory: back off rather than spin, then retry.
                    retry_in = self._accept_backoff
                    self.log.error("accept_failed", error=os.strerror(exc.errno or 0), retry_in=retry_in)
                    loop.remove_reader(listening.fileno())
                    loop.call_later(retry_in, self._resume_accepting)
                    self._accept_backoff = min(retry_in * 2, _ACCEPT_BACKOFF_MAX)
                    return
                self.log.warning("accept_failed", error=str(exc))
                continue
            self._accept_backoff = _ACCEPT_BACKOFF
            loop.create_task(self._adopt(sock))

    def _resume_accepting(self) -> None:
        if not self.closing and self._listening is not None and self.loop is not None:
            self.loop.add_reader(self._listening.fileno(), self._accept)

    def _stop_listening(self) -> None:
        """Accept no more, and close the listening socket: connects are refused at once, so
        clients move on to another server rather than wait in the backlog for the drain to end."""
        if self._listening is not None and self.loop is not None:
            if self._listening.fileno() != -1:
                self.loop.remove_reader(self._listening.fileno())
            self._listening.close()

    async def _adopt(self, sock: socket.socket) -> None:
        assert self.loop is not None
        context = self.tls
        try:
            if context is None:
                await self.loop.connect_accepted_socket(lambda: ClientConnection(self), sock)
            else:
                await self.loop.connect_accepted_socket(lambda: tls.ServerTLS(ClientConnection(self), context), sock)
        except OSError as exc:
            sock.close()
            self.log.warning("accept_failed", error=str(exc))


class HandlerPipe(asyncio.BufferedProtocol):
    """The supervisor's end of one handler's pipe: requests go in, replies come out."""

    def __init__(self, router: Router, handler: Handler, closed: asyncio.Future[None]) -> None:
        self.router = router
        self.handler = handler
        self.closed = closed
        # Handlers keep results within max_message_bytes; the margin covers the envelope.
        self.decoder = FrameDecoder(router.config.max_message_bytes + protocol.ENVELOPE_MARGIN, router.scratch)
        self.transport: asyncio.Transport | None = None
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fd = transport.get_extra_info("socket").fileno()

    def write_frame(self, frame: Frame) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the handler is gone: its call fails when the arbiter has collected it
        if len(frame) < _LARGE:
            self.transport.write(framed_small(frame))
        else:
            self.transport.writelines((frame_header(len(frame)), frame))

    def end_input(self) -> None:
        """EOF to the handler: it exits once its current call is done."""
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except (OSError, RuntimeError):
                pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        decoder, router = self.decoder, self.router
        reply = decoder.buffer_updated(nbytes)
        if reply is not None:
            router.handler_replied(self.handler, reply)
            return
        try:
            while (reply := decoder.next()) is not None:
                router.handler_replied(self.handler, reply)
        except (ProtocolError, MessageTooLarge) as exc:
            router.log.error("handler_reply_malformed", slot=self.handler.slot, error=str(exc))
            router.arbiter.kill(self.handler.slot, f"it sent a malformed reply: {exc}")

    def eof_received(self) -> bool:
        return False  # the handler exited: close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.handler.pipe_error = exc  # (a reset, usually: it died with a request unread)
        # An idle handler that died takes no call while the arbiter collects it.
        slot = self.handler.slot
        if slot in self.router.table.idle:
            self.router.table.idle.remove(slot)
        if self.router.pipes[slot] is self:
            self.router.pipes[slot] = None
        if not self.closed.done():
            self.closed.set_result(None)


class ClientConnection(asyncio.BufferedProtocol):
    """One client: the handshake, then its requests in and its answers out."""

    def __init__(self, router: Router) -> None:
        self.router = router
        config = router.config
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.log = router.log
        self.state = _HANDSHAKE
        self.handshake = ServerHandshake(config.authkey) if config.authkey is not None else None
        self.decoder = FrameDecoder(
            MAX_HANDSHAKE_FRAME if self.handshake is not None else _HELLO_LIMIT, router.scratch, router.receive_budget
        )
        self.closed = False
        self.admitted = False  # authenticated, and its hello taken
        self.sending = False  # replies were still going out when it ended
        self.write_blocked = False  # unsent replies are over max_outbox_bytes
        self.held = False  # its calls fill its share of the queue: read no more for now
        self.starved = False  # its next request is large and the receive budget is full: read no more for now
        self.in_line = False  # in the router's line for the receive budget
        self.lent: Handler | None = None  # the handler serving its socket directly (rpc.lease)
        self.input_ended = False  # EOF sent after an error: nothing more may be written
        self.parked_since: float | None = None
        self.may_lend = False  # not its first request: lending pays over repeated calls
        self.wants_go_away = False  # its hello asked for a go-away when the server drains
        self.went_away = False  # its go-away is sent
        self.last_id = -1  # the highest request id read from it (sent in the go-away)
        self.gone_cutoff: float | None = None  # when its running calls are stopped, once it ended
        self.fd = -1
        self.parked: list[tuple[Handler, Call, Frame]] = []  # replies waiting for it to drain, with their slots
        self.last_active = time.monotonic()
        self.end_reason: tuple[str, str] | None = None  # why the server ended it, and the log level
        self._timer: asyncio.TimerHandle | None = None
        self._send_watch: asyncio.TimerHandle | None = None
        self._written = 0  # bytes handed to the transport, to tell progress from a growing backlog
        self._sent_at_watch = 0

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        router = self.router
        peer = transport.get_extra_info("peername")
        self.peer = format_address(peer[:2]) if isinstance(peer, tuple) else "unix"
        self.log = router.log.bind(peer=self.peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=router.config.max_outbox_bytes)
        router.connections.add(self)
        if router.closing:  # accepted just before close() stopped accepting
            self._end("the server is shutting down", "info")
            transport.abort()
            return
        assert router.loop is not None
        self._timer = router.loop.call_later(router.config.handshake_timeout, self._handshake_timed_out)
        if self.handshake is not None:
            for frame in self.handshake.start():
                self.write_frame(frame)
        else:
            self._begin_hello()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        state = self.state
        if state == _CLOSING:
            return  # after an error: discard what the client still sends
        try:
            frame = self.decoder.buffer_updated(nbytes)
            if frame is not None and state == _SERVING:
                self.last_active = time.monotonic()
                self._request(frame)  # the usual case: one whole request
            else:
                self._received(frame)
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        """A bug: the connection still ends, with its reason logged."""
        self.log.exception("client_dropped", reason=f"internal error: {type(exc).__name__}: {exc}")
        self.end_reason = ("internal error", "logged")
        if self.transport is not None:
            self.transport.abort()

    def _received(self, frame: Frame | None) -> None:
        """Serve ``frame`` (the one whole frame a read brought) or every whole frame buffered."""
        self.last_active = time.monotonic()
        decoder = self.decoder
        try:
            while frame is not None or (frame := decoder.next()) is not None:
                if self.state == _SERVING:
                    self._request(frame)
                elif self.state == _HANDSHAKE:
                    self._handshake_step(frame)
                elif self.state == _HELLO:
                    self._hello(frame)
                if self.state == _CLOSING or self.closed or self.held or self.lent:
                    return  # (held: the frames stay buffered until its calls leave the queue)
                frame = None
            if decoder.waiting:
                self._starve()
        except MessageTooLarge as exc:
            self._too_large(exc)
        except ProtocolError as exc:  # a frame header the stream cannot go on from
            if self.state == _HANDSHAKE:
                self._end(exc.message, "warning", linger=True)  # not authenticated: told nothing
            else:
                self._fail(None, exc, exc.message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.decoder.abandon()  # a large request under way gives its room in the receive budget back
        self.sending = bool(self.write_blocked or self.parked or (self.transport and self.transport.get_write_buffer_size()))
        self._cancel_timers()
        router = self.router
        router.connections.discard(self)
        router.forget(self)
        if self.end_reason is not None:
            pass  # logged when the server ended it
        elif not self.admitted:
            # A peer that closes without a word (a port probe) went away: info.
            self.log.info("client_rejected", reason="closed during handshake" if exc is None else str(exc))
            router.counts.rejected("closed")
        elif isinstance(exc, OSError) and self.sending:
            # A closed or reset peer went away (after its own CallTimeout, say): no fault, so info.
            self.log.info("client_dropped", reason=f"sending a reply failed: {exc.strerror or exc}")
        else:
            self.log.debug("client_disconnected", **({"reason": str(exc)} if exc else {}))

    def park(self, handler: Handler, call: Call, reply: Frame) -> None:
        """Hold ``reply`` (and its handler) until the client has read enough of what is unsent.

        A handler waits so at most ``send_timeout`` seconds: a client that reads a trickle
        must not keep it from everyone else for longer.
        """
        self.parked.append((handler, call, reply))
        send_timeout = self.router.config.send_timeout
        if self.parked_since is None and send_timeout and self.router.loop is not None:
            self.parked_since = time.monotonic()
            self.router.loop.call_later(send_timeout, self._check_parked, self.parked_since)

    def _check_parked(self, since: float) -> None:
        if self.parked and self.parked_since == since and not self.closed:
            self.drop("it stopped reading its replies (a handler waited send_timeout for it to take one)")

    def must_park(self) -> bool:
        """Whether a reply for it must wait in its handler: its unsent replies are over twice
        max_outbox_bytes (past once, its requests are no longer read)."""
        return not self.closed and (bool(self.parked) or self.over_hard_cap())

    def over_hard_cap(self) -> bool:
        if not self.write_blocked or self.transport is None:
            return False
        return self.transport.get_write_buffer_size() >= 2 * self.router.config.max_outbox_bytes

    def _resume_reading(self) -> None:
        """Read from the client again, unless another reason to wait still holds."""
        if (
            not self.closed
            and self.transport is not None
            and not self.held
            and not self.write_blocked
            and self.lent is None
            and not self.starved
        ):
            self.transport.resume_reading()

    def resume_after_lease(self) -> None:
        """The socket is the router's again: read what the client sent meanwhile."""
        self._resume_reading()

    def _starve(self) -> None:
        """Its next request is large and the receive budget is full: wait in line for room."""
        self.starved = True
        if self.transport is not None:
            self.transport.pause_reading()
        if not self.in_line:
            self.in_line = True
            self.router.starved.append(self)

    def fed_from_budget(self) -> bool:
        """Room in the budget: take its waiting frame; False if there is still none for it."""
        self.starved = False
        try:
            self._received(None)
        except Exception as exc:
            self._internal_error(exc)
        if self.starved and not self.closed:
            return False
        self.in_line = False
        self._resume_reading()
        return True

    def hold(self) -> None:
        """Read no more requests until some of its queued calls leave the queue."""
        self.held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def unhold(self) -> None:
        self.held = False
        if self.closed or self.transport is None:
            return
        self._resume_reading()
        assert self.router.loop is not None
        self.router.loop.call_soon(self._take_buffered)

    def _take_buffered(self) -> None:
        """Serve the requests read while it was held."""
        if not self.closed and not self.held and self.state == _SERVING and self.decoder.buffered:
            try:
                self._received(None)
            except Exception as exc:
                self._internal_error(exc)

    def pause_writing(self) -> None:
        self.write_blocked = True
        if self.transport is not None and self.state == _SERVING:
            self.transport.pause_reading()  # stop taking requests from a client that does not read
        self._watch_sending()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.state == _SERVING and not self.closed and not self.held and not self.lent and not self.starved:
            self._resume_reading()
            self.router.loop.call_soon(self._take_buffered)  # type: ignore[union-attr]
        self.router.unpark(self)

    # -- the handshake ------------------------------------------------------------------

    def _handshake_step(self, frame: Frame) -> None:
        assert self.handshake is not None
        try:
            replies = self.handshake.receive(bytes(frame))
        except AuthenticationError as exc:
            if self.handshake.farewell is not None:
                self.write_frame(self.handshake.farewell)
            self._end(str(exc), "warning", linger=True)
            return
        for reply in replies:
            self.write_frame(reply)
        if self.handshake.done:
            self._begin_hello()

    def _begin_hello(self) -> None:
        self.state = _HELLO
        self.decoder.max_bytes = _HELLO_LIMIT
        self._write_framed(self.router.hello)

    def _hello(self, frame: Frame) -> None:
        """The client's first frame after the handshake: its hello, or an error reply and the end."""
        try:
            hello = protocol.decode_hello(bytes(frame))
            if hello.version != protocol.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {hello.version} is not supported; this server speaks {protocol.PROTOCOL_VERSION}"
                )
        except ProtocolError as exc:
            self._fail(None, exc, exc.message)
            return
        self._cancel_timers()
        self.state = _SERVING
        self.admitted = True
        self.decoder.max_bytes = self.router.config.max_message_bytes
        self.wants_go_away = hello.info.get("go_away") is True
        self.log.debug("client_connected")
        if self.router.config.idle_timeout:
            self._arm_idle(self.router.config.idle_timeout)
        if self.router.closing:
            self.go_away()  # admitted while the server drains

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self.state == _HELLO:  # authenticated (or no authkey): it may be told why
            timeout = self.router.config.handshake_timeout
            error = ProtocolError(
                f"no hello within handshake_timeout ({timeout:g} s): a client sends its hello "
                f"[4, {protocol.PROTOCOL_VERSION}, {{info}}] first"
            )
            self._fail(None, error, "handshake timed out")
        elif self.state == _HANDSHAKE:
            stalled = self.transport.handshake_timed_out() if isinstance(self.transport, tls.ServerTLS) else None
            self._end(stalled or "handshake timed out", "warning")

    # -- requests -----------------------------------------------------------------------

    def _request(self, frame: Frame) -> None:
        router = self.router
        try:
            envelope = protocol.parse_envelope(frame)
        except ProtocolError as exc:
            if exc.request_id is None:
                self._fail(None, exc, exc.message)
            else:
                self.write_frame(protocol.error_frame(exc.request_id, exc))
            return
        kind = envelope.kind
        if kind == protocol.REQUEST:
            if (self, envelope.id) in router.table.by_id:
                # Two calls with one id: their answers could not be told apart (a client bug).
                error = ProtocolError(
                    f"request id {envelope.id} is already in flight on this connection: "
                    "an id must be unique among the calls not yet answered"
                )
                self._fail(None, error, f"request id {envelope.id} reused while in flight")
                return
            request_id = envelope.id
            if request_id is not None and request_id > self.last_id:
                self.last_id = request_id
            if envelope.method == protocol.PING:
                self.write_frame(protocol.encode_response(envelope.id, "pong"))
                return
            now = time.monotonic()
            deadline = None if envelope.timeout is None else now + envelope.timeout
            call = Call(self, envelope.id, envelope.method, frame, deadline, now)
            lend, self.may_lend = self.may_lend, True
            if lend and router.try_lease(self, call):
                return
            try:
                router.submit(call)
            except (ServerBusy, ServerShuttingDown) as exc:
                self.write_frame(protocol.error_frame(envelope.id, exc))
                router.counts.call(call.method, "busy" if isinstance(exc, ServerBusy) else "shutting_down")
                return
            if call.slot is None and router.table.over_share(self):
                self.hold()
        elif kind == protocol.NOTIFICATION:
            notification = Call(None, None, envelope.method, frame, None, time.monotonic(), origin=self)
            try:
                router.submit(notification)
            except (ServerBusy, ServerShuttingDown) as exc:
                router.notification_dropped(self.log, method=envelope.method, reason="server busy")
                router.counts.call(notification.method, "busy" if isinstance(exc, ServerBusy) else "shutting_down")
                return
            if notification.slot is None and router.table.over_share(self):
                self.hold()
        elif kind == protocol.CANCEL:
            assert envelope.id is not None
            router.cancel(self, envelope.id)
        elif kind == protocol.CREDIT:
            assert envelope.id is not None
            router.credit(self, envelope.id, frame)
        # A second hello means nothing.

    def go_away(self) -> None:
        """The server drains: tell a client that asked for it (see "Go-away" in rpc.protocol).

        Sent once, and not while the socket is lent (the handler writes on it): then once it
        comes back. From now on the table refuses calls, so no request read after this runs.
        """
        if self.went_away or not self.wants_go_away or self.lent is not None or self.state != _SERVING:
            return
        self.went_away = True
        last_id = self.last_id if self.last_id >= 0 else None
        self.write_frame(protocol.encode_go_away(last_id, "the server is shutting down"))
        self.log.debug("client_told_to_go_away", last_id=last_id)

    def _too_large(self, exc: MessageTooLarge) -> None:
        limit = self.decoder.max_bytes
        size = getattr(exc, "size", "?")
        if self.state != _SERVING and tls.speaks_tls(size) and self.router.tls is None:
            self._end("the client speaks TLS, and this server has none (no tls_cert_file)", "warning", linger=True)
            return
        if self.state == _HANDSHAKE:  # not authenticated: told nothing
            self._end(f"a handshake message of {size} bytes (at most {limit})", "warning", linger=True)
            return
        if self.state == _HELLO:
            error = MessageTooLarge(f"a hello of {size} bytes; at most {limit}")
            self._fail(None, error, f"a hello of {size} bytes (at most {limit})")
            return
        error = MessageTooLarge(f"message exceeds the server's limit of {limit} bytes")
        self.write_frame(protocol.error_frame(None, error))
        self._end("message too large", "warning", linger=True, limit=limit)

    def _fail(self, request_id: int | None, error: RPCError, reason: str) -> None:
        """A frame that cannot be answered by id: say why, then close."""
        self.write_frame(protocol.error_frame(request_id, error))
        self._end(reason, "warning", linger=True)

    # -- sending ------------------------------------------------------------------------

    def write_frame(self, payload: Frame) -> None:
        """Send one message to the client (nothing, once the connection is closed or closing)."""
        if self.closed or self.input_ended or self.transport is None or self.transport.is_closing():
            return
        if len(payload) < _LARGE:
            self.transport.write(framed_small(payload))
        else:
            self.transport.writelines((frame_header(len(payload)), payload))
        self._written += len(payload)
        if self._send_watch is None and self.transport.get_write_buffer_size():
            self._watch_sending()

    def _write_framed(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _watch_sending(self) -> None:
        """Drop the client if its unsent replies make no progress for ``send_timeout`` s."""
        send_timeout = self.router.config.send_timeout
        if self._send_watch is not None or not send_timeout or self.router.loop is None or self.transport is None:
            return
        self._sent_at_watch = self._written - self.transport.get_write_buffer_size()
        self._send_watch = self.router.loop.call_later(send_timeout, self._check_sending)

    def _check_sending(self) -> None:
        self._send_watch = None
        if self.closed or self.transport is None:
            return
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if self._written - unsent <= self._sent_at_watch:
            self.drop("it stopped reading its replies (a send made no progress within send_timeout)")
            return
        self._watch_sending()

    # -- idle and ending ----------------------------------------------------------------

    def _arm_idle(self, delay: float) -> None:
        assert self.router.loop is not None
        self._timer = self.router.loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle_timeout = self.router.config.idle_timeout
        assert idle_timeout
        # (starved: it is in the middle of sending a request, waiting for room to receive it)
        busy = self.lent or self.parked or self.starved or self.router.table.inflight(self)
        unsent = self.transport is not None and self.transport.get_write_buffer_size()
        quiet = time.monotonic() - self.last_active
        if busy or unsent:
            self.last_active = time.monotonic()
            self._arm_idle(idle_timeout)
        elif quiet >= idle_timeout:
            self.drop(f"idle for longer than idle_timeout ({idle_timeout:g} s)", level="info")
        else:
            self._arm_idle(idle_timeout - quiet)

    def drop(self, reason: str, level: str = "warning") -> None:
        """End the connection from the server's side, logging ``reason`` at ``level``."""
        self._end(reason, level)

    def _end(self, reason: str, level: str, linger: bool = False, **fields: Any) -> None:
        if self.closed:
            return
        if self.end_reason is None:
            # Logged now, as the server decides, not when the peer has finished closing.
            self.end_reason = (reason, level)
            event = "client_dropped" if self.admitted else "client_rejected"
            getattr(self.log, level)(event, reason=reason, **fields)
            if not self.admitted:
                self.router.counts.rejected(metrics.rejection_reason(reason))
        if linger:
            self._linger()
        elif self.transport is not None:
            self._close_soon(self.transport)

    def _close_soon(self, transport: asyncio.Transport) -> None:
        """Close now if nothing is unsent; close() waits for the peer to read what is, so abort
        if it has not within a moment (a client that stopped reading would hold it open)."""
        if transport.get_write_buffer_size() or self.write_blocked:
            transport.abort()
            return
        transport.close()
        if self.router.loop is not None:
            self.router.loop.call_later(_LINGER_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def _linger(self) -> None:
        """Finish sending, then discard what the peer still sends for a while, then close.

        Closing with unread input makes the kernel reset the connection, which can
        destroy the error reply before the peer reads it.
        """
        self.state = _CLOSING
        transport = self.transport
        if transport is None or self.router.loop is None:
            return
        self._cancel_timers()
        self.input_ended = True
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                pass
        transport.resume_reading()
        self._timer = self.router.loop.call_later(_LINGER_SECONDS, self._abort_if_open)

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._send_watch):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_watch = None


def _timeout(call: Call) -> CallTimeout:
    stream = call.stream
    if stream is not None and stream.closing:
        return CallTimeout(f"stream {call.method!r} did not end within {STREAM_CLOSE_GRACE:g} s of being closed")
    if stream is not None and stream.allowance is not None:
        return CallTimeout(f"stream {call.method!r} sent no item within its timeout of {round(stream.allowance, 3):g} s")
    return CallTimeout(f"call {call.method!r} passed its deadline of {_allowed(call)} s")


def _expired(call: Call) -> CallTimeout:
    return CallTimeout(
        f"call {call.method!r} passed its deadline of {_allowed(call)} s while waiting for a handler; it did not run"
    )


def _allowed(call: Call) -> str:
    """The seconds the call was given: its timeout, or max_call_seconds if that is shorter."""
    return f"{round((call.deadline or call.received) - call.received, 3):g}"



class _CallStream:
    """The router's record of a call answered by a stream."""

    __slots__ = ("window", "allowance", "closing")

    def __init__(self, allowance: float | None) -> None:
        self.window = protocol.StreamWindow()  # items forwarded and not yet credited, as the handler counts them
        self.allowance = allowance  # seconds allowed for each item (the call's timeout), or None
        self.closing = False  # a close went to its handler: the end is awaited, and nothing more forwarded to it
