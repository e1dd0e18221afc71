"""The pool of handler processes: dispatch, deadlines, replacement, shutdown.

Each handler runs one call at a time. A call goes straight to an idle handler
from the thread that read it, or waits in a bounded queue. One thread per handler
slot reads the handler's replies, hands it the next queued call, and routes the
reply to the caller; when the handler dies, that thread fails its call with
``WorkerCrashed`` and starts a replacement. This module never touches client
sockets: a call's ``connection`` only needs ``send(frame)`` and ``peer``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Protocol

from . import handler, lease, protocol
from .errors import (
    CallTimeout,
    RPCError,
    ServerBusy,
    ServerShuttingDown,
    StartupError,
    WorkerCrashed,
)
from .logs import Logger

__all__ = ["PoolSettings", "Call", "HandlerPool"]

_HELLO_LIMIT = 1 << 20  # a handler's hello, or its report of why the registry failed to import


class ReplySink(Protocol):
    """Where a call's answer goes: the client connection it came from."""

    peer: str

    def answer(self, frame: bytes) -> None: ...


@dataclass(frozen=True)
class PoolSettings:
    workers: int
    max_pending: int
    max_call_seconds: float | None
    start_method: str
    startup_timeout: float
    access_log: bool
    lease: bool = True


class Call:
    """One request on its way through the server; answered exactly once."""

    __slots__ = ("connection", "id", "method", "frame", "deadline", "received", "answered")

    def __init__(
        self, connection: ReplySink | None, id: int | None, method: str, frame: bytes, deadline: float | None
    ) -> None:
        self.connection = connection  # None for a notification: nobody waits for it
        self.id = id
        self.method = method
        self.frame = frame
        self.deadline = deadline
        self.received = time.monotonic()
        self.answered = False


class _Slot:
    """A place for one handler process; its process is replaced when it dies."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.current: Call | None = None
        self.started: float = 0.0
        self.kill_reason: str | None = None  # set when the supervisor kills the handler
        self.kill_at: float | None = None  # when to escalate SIGTERM to SIGKILL
        self.reaping = False  # the slot thread is collecting the process: signal it no more
        self.retired: threading.Event | None = None  # set once a reload has replaced this handler
        self.lease: Any = None  # the client whose socket this handler is serving directly
        self.lease_frame: bytes | None = None  # the request that came with the lease
        self.recalled = False
        # Orders LEASE (a frame, then the descriptor) against RECALL on the pipe.
        self.lease_lock = threading.Lock()
        self.call_state: Any = None  # shared memory: the call running on a lent socket
        self.thread: threading.Thread | None = None


class HandlerPool:
    """N handler processes that run calls handed to :meth:`submit`."""

    def __init__(self, settings: PoolSettings, handler_settings: handler.HandlerSettings, log: Logger) -> None:
        self._settings = settings
        self._handler_settings = handler_settings
        self._log = log
        self._context = multiprocessing.get_context(settings.start_method)
        self._lock = threading.Lock()
        self._idle_changed = threading.Condition(self._lock)
        self._slots = [_Slot(i) for i in range(settings.workers)]
        for slot in self._slots:
            slot.call_state = self._context.RawArray("d", lease.CallState.SIZE)
        self._idle: list[_Slot] = []
        self._queue: deque[Call] = deque()
        self._closing = False  # no new calls; queued ones were failed
        self._stopping = False  # handlers are being stopped; do not replace them
        self._hurry = False  # a second shutdown request: stop waiting for calls in flight
        self._unanswered = 0  # calls accepted and not yet answered, queued or running
        self._startup_errors: list[str] = []
        self._ready = threading.Semaphore(0)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start every handler and wait until all have imported the registry."""
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._run_slot, args=(slot,), name=f"rpc-slot-{slot.index}", daemon=True)
            slot.thread.start()
        for _ in self._slots:
            self._ready.acquire()
        if self._startup_errors:
            self.stop(grace=0)
            raise StartupError(self._startup_errors[0])

    def pids(self) -> list[int]:
        """Process ids of the live handlers."""
        with self._lock:
            return [slot.pid for slot in self._slots if slot.pid is not None]

    def drain(self, grace: float) -> int:
        """Take no more calls, fail queued ones, and wait up to ``grace`` s for running ones.

        Returns how many calls were still unanswered when the grace period ended.
        A call counts until its answer is sent, not just until its handler is done.
        """
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            lent = [slot for slot in self._slots if slot.lease is not None]
        for slot in lent:
            self._recall(slot)
        for call in queued:
            self._fail(call, ServerShuttingDown("the server is shutting down; the call did not run"), None)
        deadline = time.monotonic() + grace
        with self._lock:
            while self._unanswered and not self._hurry and (remaining := deadline - time.monotonic()) > 0:
                self._idle_changed.wait(remaining)
            return self._unanswered

    def hurry(self) -> None:
        """Cut short a :meth:`drain` or :meth:`stop` under way: stop handlers now."""
        with self._lock:
            self._hurry = True
            self._idle_changed.notify_all()

    def reload(self) -> bool:
        """Replace the handlers one at a time with processes that import the code afresh.

        A probe handler imports the registry first; if that fails, nothing is
        replaced. Each handler finishes its current call before it is replaced,
        and the others keep serving meanwhile, so no call fails.
        """
        error = self._probe()
        if error is not None:
            self._log.error("reload_failed", error=error)
            return False
        for slot in self._slots:
            done = threading.Event()
            with self._lock:
                if self._stopping:
                    return False
                slot.retired = done
                idle = slot in self._idle
                if idle:
                    self._idle.remove(slot)
                lent = slot.lease is not None
                conn = slot.conn
            if idle and conn is not None:
                _shutdown_pipe(conn)
            elif lent:
                self._recall(slot)
            if not done.wait(self._settings.startup_timeout + 10):
                self._log.error("reload_failed", error=f"handler {slot.index} was not replaced in time")
                return False
        self._log.info("reload_finished", workers=len(self._slots))
        return True

    def _probe(self) -> str | None:
        """Start a throwaway handler to check that the registry imports; returns an error or None."""
        probe = _Slot(-1)
        error = self._start_handler(probe, log=False)
        if error is None:
            assert probe.conn is not None and probe.process is not None
            probe.conn.close()
            probe.process.join(10)
            if probe.process.exitcode is None:
                probe.process.kill()
                probe.process.join()
        return error

    def stop(self, grace: float = 2.0) -> None:
        """Stop every handler: close its pipe, then SIGTERM, then SIGKILL. Waits for them.

        Only slot threads reap handler processes; this method signals them and
        waits for the slot threads, so no process id is signalled after reaping.
        """
        with self._lock:
            self._closing = True
            self._stopping = True
            conns = [slot.conn for slot in self._slots if slot.conn is not None]
            if self._hurry:
                grace = 0
        for conn in conns:
            _shutdown_pipe(conn)  # the handler reads EOF and exits after its call
        threads = [s.thread for s in self._slots if s.thread is not None and s.thread is not threading.current_thread()]
        deadline = time.monotonic() + grace
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        for signum, wait_seconds in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            stuck = [slot for slot in self._slots if slot.thread in threads and slot.thread.is_alive()]
            if not stuck:
                break
            for slot in stuck:
                self._signal(slot, signum)
            deadline = time.monotonic() + wait_seconds
            for slot in stuck:
                assert slot.thread is not None
                slot.thread.join(max(deadline - time.monotonic(), 0))

    # -- calls ------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        """Run ``call`` on an idle handler, or queue it; raises ServerBusy when the queue is full."""
        if self._settings.max_call_seconds is not None:
            cap = call.received + self._settings.max_call_seconds
            call.deadline = cap if call.deadline is None else min(call.deadline, cap)
        conn = recall = None
        with self._lock:
            if self._closing:
                raise ServerShuttingDown("the server is shutting down; the call did not run")
            if self._idle:
                slot = self._idle.pop()
                slot.current = call
                slot.started = time.monotonic()
                conn = slot.conn
            elif len(self._queue) >= self._settings.max_pending:
                raise ServerBusy(f"all {len(self._slots)} handlers are busy and {len(self._queue)} calls are waiting")
            else:
                self._queue.append(call)
                recall = self._recall_one()
            self._unanswered += 1
        if conn is not None:
            self._send(conn, call)
        elif recall is not None:
            self._recall(recall)

    def try_lease(self, call: Call, client: Any) -> bool:
        """Lend ``client``'s socket to an idle handler for ``call`` and what follows.

        Only while handlers are to spare (one stays idle for others) and none is
        waited for, so lending never delays another client's call.
        """
        if not self._settings.lease:
            return False
        with self._lock:
            if self._closing or self._queue or len(self._idle) < 2:
                return False
            slot = self._idle.pop()
            slot.lease, slot.recalled, slot.lease_frame = client, False, call.frame
            lease.CallState(slot.call_state).reset()  # the handler is idle: nobody writes it now
            slot.started = time.monotonic()
            self._unanswered += 1  # the lease counts as one call until the socket is back
            conn, pid = slot.conn, slot.pid
            client.begin_lease()
            # Taken before the pool lock is let go, so no RECALL can come between the two parts.
            slot.lease_lock.acquire()
        half_sent: OSError | None = None
        try:
            assert conn is not None and pid is not None
            conn.send_bytes(protocol.encode_internal(protocol.LEASE, call.frame, client.peer))
            try:
                reduction.send_handle(conn, client.conn.fileno(), pid)
            except OSError as exc:
                half_sent = exc
        except (OSError, AssertionError):
            pass  # the handler died: its slot thread ends the lease
        finally:
            slot.lease_lock.release()
        if half_sent is not None:
            # The handler has the LEASE but not the socket: it would wait for it forever, or
            # take the next message on its pipe for it. Stop it; its slot thread then ends the
            # lease, and the server runs the call itself.
            with self._lock:
                slot.kill_reason = f"the lent socket could not be handed to it: {half_sent}"
            self._log.warning("lease_failed", slot=slot.index, pid=pid, error=str(half_sent))
            self._signal(slot, signal.SIGKILL)
        return True

    def _recall_one(self) -> _Slot | None:
        """Under the lock: pick one lent handler to give its socket back."""
        for slot in self._slots:
            if slot.lease is not None and not slot.recalled:
                slot.recalled = True
                return slot
        return None

    def _recall(self, slot: _Slot) -> None:
        with slot.lease_lock:
            _send_internal(slot.conn, protocol.RECALL)

    def check_deadlines(self) -> None:
        """Fail calls past their deadline; kill the handlers running them. Call periodically."""
        now = time.monotonic()
        timed_out: list[tuple[Call, int | None]] = []
        to_terminate: list[_Slot] = []
        to_kill: list[_Slot] = []
        with self._lock:
            for slot in self._slots:
                call = slot.current
                if slot.lease is not None and slot.kill_reason is None:
                    what, deadline, _, _ = lease.CallState(slot.call_state).read()
                    if what == lease.CallState.RUNNING and deadline is not None and now >= deadline:
                        slot.kill_reason = "a call on a lent socket passed its deadline"
                        slot.kill_at = now + 1.0
                        to_terminate.append(slot)
                        continue
                if call is not None and not call.answered and call.deadline is not None and now >= call.deadline:
                    call.answered = True
                    timed_out.append((call, slot.pid))
                    slot.kill_reason = f"call {call.method!r} passed its deadline"
                    slot.kill_at = now + 1.0
                    to_terminate.append(slot)
                elif slot.kill_at is not None and now >= slot.kill_at:
                    slot.kill_at = None
                    to_kill.append(slot)
            if self._queue and any(c.deadline is not None and now >= c.deadline for c in self._queue):
                waiting = deque(c for c in self._queue if c.deadline is None or now < c.deadline)
                expired = [c for c in self._queue if c.deadline is not None and now >= c.deadline]
                self._queue = waiting
            else:
                expired = []
        for slot in to_terminate:
            self._signal(slot, signal.SIGTERM)
        for slot in to_kill:
            self._signal(slot, signal.SIGKILL)
        for call, pid in timed_out:
            self._answer(call, _error_frame(call, _timeout(call)), pid, "timeout")
        for call in expired:
            self._fail(call, _expired(call), None)

    def forget(self, connection: ReplySink) -> None:
        """Drop queued calls of a connection that closed; running ones finish unheard."""
        with self._lock:
            dropped = [c for c in self._queue if c.connection is connection]
            if dropped:
                self._queue = deque(c for c in self._queue if c.connection is not connection)
                for call in dropped:
                    call.answered = True  # nobody is left to answer
                self._unanswered -= len(dropped)
                self._idle_changed.notify_all()

    # -- internals --------------------------------------------------------------------

    def _signal(self, slot: _Slot, signum: int) -> None:
        """Signal the slot's handler unless its slot thread has begun reaping it."""
        with self._lock:
            pid = None if slot.reaping or slot.process is None else slot.process.pid
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _send(self, conn: Connection | None, call: Call) -> None:
        try:
            assert conn is not None
            conn.send_bytes(call.frame)
        except (OSError, AssertionError):
            pass  # the handler died; its slot thread fails the call with WorkerCrashed

    def _next_call(self, now: float) -> tuple[Call | None, list[Call]]:
        """Under the lock: the next queued call still worth running, and those that expired."""
        expired = []
        while self._queue:
            call = self._queue.popleft()
            if call.deadline is not None and now >= call.deadline:
                expired.append(call)
                continue
            return call, expired
        return None, expired

    def _run_slot(self, slot: _Slot) -> None:
        first = True
        backoff = 0.1
        while True:
            error = self._start_handler(slot)
            if first:
                first = False
                if error is not None:
                    self._startup_errors.append(error)
                self._ready.release()
                if error is not None:
                    return
            elif error is not None:
                if self._stopping:
                    return
                self._log.error("handler_start_failed", slot=slot.index, error=error)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            with self._lock:
                retired, slot.retired = slot.retired, None
                call, expired, _ = self._free_locked(slot, time.monotonic())
            if retired is not None:
                retired.set()
            if call is not None:
                self._send(slot.conn, call)
            self._after_free(slot, expired, False)
            self._serve(slot)
            reason = self._reap(slot)
            if self._stopping:
                return
            if reason == "reload":
                self._log.info("handler_reloading", slot=slot.index, pid=slot.pid)
            else:
                self._log.warning("handler_replaced", slot=slot.index, pid=slot.pid, reason=reason)

    def _start_handler(self, slot: _Slot, log: bool = True) -> str | None:
        """Start a handler process in ``slot`` and wait for its hello; returns an error or None."""
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=handler.run,
            args=(child_conn, self._handler_settings, slot.call_state),
            name=f"rpc-handler-{slot.index}",
            # Not daemonic, so exposed functions may start processes of their own. A
            # handler exits by itself when the supervisor dies (see rpc.handler).
            daemon=False,
        )
        try:
            process.start()
        except Exception as exc:
            parent_conn.close()
            child_conn.close()
            return f"cannot start a handler process: {exc}"
        child_conn.close()  # so the supervisor reads EOF when the handler dies
        error = None
        try:
            if not parent_conn.poll(self._settings.startup_timeout):
                error = f"handler did not start within {self._settings.startup_timeout:g} s"
            else:
                first = parent_conn.recv_bytes(_HELLO_LIMIT)
                try:
                    protocol.decode_hello(first)
                except RPCError:
                    response = protocol.decode_response(first)
                    info = response.error
                    error = _import_failure(self._handler_settings.registry, info) if info else "bad hello"
        except (EOFError, OSError):
            process.join(1.0)
            error = (
                f"handler exited while starting ({_exit_reason(process.exitcode)}); its traceback is on stderr. "
                "Handlers import the main module first: run from a file whose server starts under "
                "`if __name__ == '__main__':`"
            )
        if error is not None:
            parent_conn.close()
            process.kill()
            process.join()
            return error
        with self._lock:
            slot.process, slot.conn, slot.pid = process, parent_conn, process.pid
            slot.kill_reason, slot.kill_at, slot.reaping = None, None, False
            stopping = self._stopping
        if stopping:
            _shutdown_pipe(parent_conn)  # stop() began while this handler started: let it exit
        if log:
            self._log.info("handler_started", slot=slot.index, pid=process.pid)
        return None

    def _serve(self, slot: _Slot) -> None:
        """Route the handler's replies until its pipe closes (it exited or was killed)."""
        conn = slot.conn
        assert conn is not None
        # Handlers keep results within max_message_bytes; the margin covers the envelope.
        limit = self._handler_settings.max_message_bytes + protocol.ENVELOPE_MARGIN
        while True:
            try:
                reply = conn.recv_bytes(limit)
            except (EOFError, OSError):
                return
            now = time.monotonic()
            if protocol.internal_kind(reply) == protocol.LEASE_END:
                self._lease_ended(slot, reply, now)
                continue
            with self._lock:
                call = slot.current
                if call is None or slot.kill_reason is not None:
                    continue  # a late result of a call already answered with CallTimeout
                if call.answered:
                    continue
                call.answered = True
                next_call, expired, retiring = self._free_locked(slot, now)
            # Hand the handler its next call before replying, so it works while we send.
            if next_call is not None:
                self._send(conn, next_call)
            self._answer(call, reply, slot.pid, "error" if protocol.response_is_error(reply) else "ok")
            self._after_free(slot, expired, retiring)

    def _free_locked(self, slot: _Slot, now: float) -> tuple[Call | None, list[Call], bool]:
        """Under the lock: a handler is free; give it the next queued call, or mark it idle.

        Returns that call, the queued calls found expired, and whether the handler
        is being replaced by a reload (then it takes nothing more).
        """
        retiring = slot.retired is not None
        next_call, expired = (None, []) if self._closing or retiring else self._next_call(now)
        slot.current = next_call
        if next_call is not None:
            slot.started = now
        elif not retiring:
            self._idle.append(slot)
        self._idle_changed.notify_all()
        return next_call, expired, retiring

    def _after_free(self, slot: _Slot, expired: list[Call], retiring: bool) -> None:
        """Outside the lock, after _free_locked: fail expired calls; let a retiring handler exit."""
        for stale in expired:
            self._fail(stale, _expired(stale), None)
        if retiring and slot.conn is not None:
            _shutdown_pipe(slot.conn)  # the handler exits; _run_slot starts its replacement

    def _lease_ended(self, slot: _Slot, message: bytes, now: float) -> None:
        """The handler gave a lent socket back: take the slot back into service."""
        _, reason, unserved, _served = protocol.decode_value(message)
        with self._lock:
            client, slot.lease = slot.lease, None
            if client is None:
                return
            self._unanswered -= 1
            next_call, expired, retiring = self._free_locked(slot, now)
        if next_call is not None:
            self._send(slot.conn, next_call)
        client.end_lease(reason, unserved)
        self._after_free(slot, expired, retiring)

    def _reap(self, slot: _Slot) -> str:
        """After the handler's pipe closed: fail its call, collect the process, say why."""
        with self._lock:
            slot.reaping = True
        process = slot.process
        process.join(5.0)
        if process.exitcode is None:
            process.kill()
            process.join()
        code = process.exitcode
        reason = slot.kill_reason or ("reload" if slot.retired is not None else _exit_reason(code))
        with self._lock:
            call = slot.current
            slot.current = None
            if slot in self._idle:
                self._idle.remove(slot)
            crashed = call is not None and not call.answered
            if crashed:
                call.answered = True
            self._idle_changed.notify_all()
        if slot.conn is not None:
            with slot.lease_lock:  # not while try_lease sends on it: its number could be reused meanwhile
                slot.conn.close()
        self._reap_lease(slot, reason)
        if crashed:
            assert call is not None
            error = WorkerCrashed(f"the handler process (pid {slot.pid}) died during this call: {reason}")
            self._answer(call, _error_frame(call, error), slot.pid, "crashed")
        return reason

    def _reap_lease(self, slot: _Slot, reason: str) -> None:
        """A handler died serving a lent socket: answer its call if the client lacks an answer, give the socket back.

        The handler is dead, so the server can write to the socket without
        interleaving. What it posted in the shared call state tells where it died
        (see :mod:`rpc.lease`): before taking its request off the socket (the
        server reads and runs it), while running it (the call failed), after
        writing the whole reply (nothing is missing), or partway through the reply:
        then the stream has half a frame in it and the connection must be dropped.
        """
        with self._lock:
            client, slot.lease = slot.lease, None
            if client is None:
                return
            self._unanswered -= 1
            self._idle_changed.notify_all()
        state = lease.CallState(slot.call_state)
        what, _deadline, request_id, answered = state.read()
        if what == lease.CallState.IDLE and not answered:
            # It died before starting the call it was lent the socket for: the server runs it.
            client.end_lease("crashed", slot.lease_frame)
            return
        died = f"the handler process (pid {slot.pid}) died during this call: {reason}"
        error: RPCError | None = None
        if what == lease.CallState.WRITING:
            size, sent, whole = state.reply_progress()
            if sent == 0 and whole:
                # Sent whole or not at all: if it did go out, the client drops this second answer.
                error = WorkerCrashed(died)
            elif sent < size:
                client.drop(
                    f"handler process (pid {slot.pid}) {reason} while writing a reply on the lent socket, "
                    f"{sent} of its {size} bytes known sent: the stream may be cut mid-frame"
                )
        elif what == lease.CallState.RUNNING and client.waiting_request_id() != request_id:
            error = CallTimeout("the call passed its deadline") if slot.kill_reason is not None else WorkerCrashed(died)
        if error is not None:
            client.reply(protocol.encode_error(request_id, protocol.ErrorInfo(error.code, type(error).__name__, error.message)))
        client.end_lease("crashed", None)

    def _fail(self, call: Call, error: RPCError, pid: int | None) -> None:
        """Answer a call that is not on a handler (queued, rejected) with ``error``."""
        with self._lock:
            if call.answered:
                return
            call.answered = True
        self._answer(call, _error_frame(call, error), pid, error.code)

    def _answer(self, call: Call, frame: bytes, pid: int | None, outcome: str) -> None:
        """Send the one answer of ``call``; it counts as in flight until it is sent."""
        try:
            if call.connection is not None:
                call.connection.answer(frame)
        finally:
            with self._lock:
                self._unanswered -= 1
                if not self._unanswered:
                    self._idle_changed.notify_all()
        if self._settings.access_log:
            self._log.info(
                "call",
                method=call.method,
                id=call.id,
                peer=call.connection.peer if call.connection is not None else None,
                pid=pid,
                ms=round((time.monotonic() - call.received) * 1000, 3),
                outcome=outcome,
            )


def _timeout(call: Call) -> CallTimeout:
    return CallTimeout(f"call {call.method!r} passed its deadline of {_allowed(call)} s")


def _expired(call: Call) -> CallTimeout:
    return CallTimeout(
        f"call {call.method!r} passed its deadline of {_allowed(call)} s while waiting for a handler; it did not run"
    )


def _allowed(call: Call) -> str:
    """The seconds the call was given: its timeout, or max_call_seconds if that is shorter."""
    return f"{round((call.deadline or call.received) - call.received, 3):g}"


def _error_frame(call: Call, error: RPCError) -> bytes:
    return protocol.encode_error(call.id, protocol.ErrorInfo(error.code, type(error).__name__, error.message))


def _import_failure(registry: str, info: protocol.ErrorInfo) -> str:
    """Why handlers cannot import the registry, with the traceback that says where."""
    text = f"handlers cannot import the registry {registry!r}: {info.message}"
    return f"{text}\n{info.traceback.rstrip()}" if info.traceback else text


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _send_internal(conn: Connection | None, *fields: Any) -> None:
    try:
        if conn is not None:
            conn.send_bytes(protocol.encode_internal(*fields))
    except OSError:
        pass  # the handler is gone; its slot thread deals with that


def _shutdown_pipe(conn: Connection) -> None:
    """Signal EOF to the handler without closing the descriptor a slot thread is reading."""
    try:
        sock = socket.socket(fileno=conn.fileno())
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()
