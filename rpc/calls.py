"""The call table: which handler runs which call, the queue, deadlines, answer-exactly-once.

Plain data, with no sockets, processes or clocks of its own (callers pass ``now``),
so every rule here is tested on its own. Handlers are known by their slot number.
The router asks the table what to do and does the I/O:

- :meth:`CallTable.admit` a request: run it on an idle slot, queue it, or refuse it
  (``ServerBusy`` when the queue is full in calls or in bytes);
- :meth:`CallTable.release` a slot whose handler answered (or just started): its
  next call from the queue, or idle;
- :meth:`CallTable.settle` before sending any answer: True exactly once per call,
  so a call that timed out, crashed and replied all at once is answered once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .errors import ServerBusy, ServerShuttingDown
from .framing import Frame

__all__ = ["Call", "CallTable"]


class Call:
    """One request on its way through the server."""

    __slots__ = ("connection", "origin", "id", "method", "frame", "deadline", "received", "answered", "slot", "lease", "stream")

    def __init__(
        self,
        connection: Any,
        id: int | None,
        method: str,
        frame: Frame,
        deadline: float | None,
        received: float,
        origin: Any = None,
    ) -> None:
        self.connection = connection  # where the answer goes; None for a notification
        self.origin = connection if origin is None else origin  # whose share of the queue it takes
        self.id = id
        self.method = method
        self.frame = frame
        self.deadline = deadline  # time.monotonic() value, or None
        self.received = received
        self.answered = False
        self.slot: int | None = None  # the handler running it, once it runs
        self.lease = False  # it lent its connection to the handler: settled when the socket is back
        self.stream: Any = None  # the router's record of its stream, once its handler started one

    def __repr__(self) -> str:
        return f"<Call {self.method!r} id={self.id} slot={self.slot} answered={self.answered}>"


class CallTable:
    """Calls accepted and not yet answered, for ``workers`` handler slots."""

    def __init__(
        self, workers: int, max_pending: int, max_queue_bytes: int, max_call_seconds: float | None = None
    ) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.max_queue_bytes = max_queue_bytes
        self.max_call_seconds = max_call_seconds
        self.running: list[Call | None] = [None] * workers
        self.idle: list[int] = []  # slots whose handler waits for a call
        self.queue: deque[Call] = deque()
        self.queue_bytes = 0
        self.unanswered = 0  # accepted and not settled: queued or running
        self.closing = False  # no new calls
        self.retiring: set[int] = set()  # slots whose handler takes no more calls (a reload)
        # A connection's fair share of the queue: past it, the router reads no more of its
        # requests until some leave the queue, so one client cannot fill it for everyone.
        self.share_calls = max(1, max_pending // 4)
        self.share_bytes = max(1, max_queue_bytes // 4)
        self.queued_by: dict[Any, list[int]] = {}  # connection -> [calls, bytes] in the queue
        # (connection, request id) -> its queued calls, in order: a cancel finds its call without
        # a scan of the queue, so a storm of cancels costs little however long the queue is.
        self.queued_ids: dict[tuple[Any, int], list[Call]] = {}
        self.inflight_by: dict[Any, int] = {}  # connection -> its calls accepted and not settled
        # (connection, request id) -> its call accepted and not settled: a request reusing the id
        # of a call in flight would have its answers misrouted (the router refuses it).
        self.by_id: dict[tuple[Any, int], Call] = {}

    # -- calls in -----------------------------------------------------------------------

    def admit(self, call: Call) -> int | None:
        """Accept ``call``: the slot to run it on now, or None if it was queued.

        Raises ServerShuttingDown while closing, ServerBusy when the queue is full.
        """
        if self.closing:
            raise ServerShuttingDown("the server is shutting down; the call did not run")
        if self.max_call_seconds is not None:
            cap = call.received + self.max_call_seconds
            call.deadline = cap if call.deadline is None else min(call.deadline, cap)
        if self.idle:
            slot = self.idle.pop()
            self.running[slot] = call
            call.slot = slot
            self._accepted(call)
            return slot
        size = len(call.frame)
        if len(self.queue) >= self.max_pending:
            raise ServerBusy(f"all {self.workers} handlers are busy and {len(self.queue)} calls are waiting")
        if self.queue and self.queue_bytes + size > self.max_queue_bytes:
            raise ServerBusy(
                f"all {self.workers} handlers are busy and the calls waiting hold {self.queue_bytes} bytes "
                f"(max_queue_bytes is {self.max_queue_bytes})"
            )
        self.queue.append(call)
        self.queue_bytes += size
        self._count(call, 1)
        self._accepted(call)
        return None

    def lend(self, call: Call) -> int | None:
        """Take an idle slot for ``call`` and the lease of its connection, while one more stays
        idle for others and nothing waits; the slot, or None (then :meth:`admit` it)."""
        if self.closing or self.queue or len(self.idle) < 2:
            return None
        slot = self.idle.pop()
        self.running[slot] = call
        call.slot = slot
        call.lease = True
        self._accepted(call)
        return slot

    def inflight(self, connection: Any) -> int:
        """Calls of ``connection`` accepted and not yet settled."""
        return self.inflight_by.get(connection, 0)

    def _accepted(self, call: Call) -> None:
        self.unanswered += 1
        if call.connection is not None:
            self.inflight_by[call.connection] = self.inflight_by.get(call.connection, 0) + 1
            if call.id is not None:
                self.by_id[(call.connection, call.id)] = call

    def over_share(self, connection: Any) -> bool:
        """Whether ``connection`` holds its full share of the queue (in calls or in bytes)."""
        held = self.queued_by.get(connection)
        return held is not None and (held[0] >= self.share_calls or held[1] >= self.share_bytes)

    def settle(self, call: Call) -> bool:
        """Mark ``call`` answered; True only the first time, when the caller must send its answer."""
        if call.answered:
            return False
        call.answered = True
        self.unanswered -= 1
        connection = call.connection
        if connection is not None:
            left = self.inflight_by[connection] - 1
            if left:
                self.inflight_by[connection] = left
            else:
                del self.inflight_by[connection]
            if call.id is not None:
                self.by_id.pop((connection, call.id), None)
        return True

    # -- handlers -----------------------------------------------------------------------

    def release(self, slot: int, now: float) -> tuple[Call | None, list[Call]]:
        """The handler in ``slot`` is free: the call to send it next (or None: it is idle now),
        and the queued calls found past their deadline (settled; the caller answers them)."""
        running = self.running[slot]
        if running is not None and not running.answered:
            return None, []  # a stale release: the slot's handler still owes this call its answer
        self.running[slot] = None
        expired: list[Call] = []
        if slot in self.retiring:
            return None, expired
        while self.queue:
            call = self._pop()
            if call.answered:
                continue  # its connection went away
            if call.deadline is not None and now >= call.deadline:
                self.settle(call)
                expired.append(call)
                continue
            self.running[slot] = call
            call.slot = slot
            return call, expired
        if slot not in self.idle:
            self.idle.append(slot)
        return None, expired

    def lost(self, slot: int) -> Call | None:
        """The handler in ``slot`` is gone: its call, if that still needs an answer (settled)."""
        call, self.running[slot] = self.running[slot], None
        if slot in self.idle:
            self.idle.remove(slot)
        if call is not None and self.settle(call):
            return call
        return None

    def retire(self, slot: int) -> bool:
        """Give ``slot`` no more calls (a reload replaces its handler); True if it is idle now."""
        self.retiring.add(slot)
        if slot in self.idle:
            self.idle.remove(slot)
            return True
        return False

    def reopen(self, slot: int) -> None:
        """A new handler took ``slot``'s place: it may take calls again (call :meth:`release` next)."""
        self.retiring.discard(slot)

    # -- time and endings ---------------------------------------------------------------

    def expire(self, now: float) -> tuple[list[Call], list[Call]]:
        """Calls past their deadline, settled: (running ones, whose handlers must be stopped; queued ones)."""
        running = [
            call
            for call in self.running
            if call is not None and call.deadline is not None and now >= call.deadline and self.settle(call)
        ]
        queued: list[Call] = []
        if any(call.deadline is not None and now >= call.deadline for call in self.queue):
            waiting: deque[Call] = deque()
            for call in self.queue:
                if call.deadline is not None and now >= call.deadline and not call.answered:
                    self.settle(call)
                    queued.append(call)
                else:
                    waiting.append(call)
            self._replace_queue(waiting)
        return running, queued

    def forget(self, connection: Any) -> int:
        """Drop the queued calls of a connection that ended (nobody is left to answer); how many."""
        if connection is not None and connection not in self.queued_by:
            return 0  # (its requests are counted there while queued)
        waiting: deque[Call] = deque()
        dropped = 0
        for call in self.queue:
            if call.connection is connection:
                dropped += self.settle(call)
            else:
                waiting.append(call)
        self._replace_queue(waiting)
        return dropped

    def find(self, connection: Any, request_id: int) -> Call | None:
        """The unanswered call ``request_id`` of ``connection``, queued or running (not lent), if any."""
        for call in self.running:
            # (an answered one may still hold its slot, its handler being stopped: the same id,
            # reused since by the client, may run or wait elsewhere)
            if call is not None and call.id == request_id and call.connection is connection:
                if not (call.answered or call.lease):
                    return call
        for call in self.queued_ids.get((connection, request_id), ()):
            if not call.answered:
                return call
        return None

    def unqueue(self, call: Call) -> None:
        """Take a settled ``call`` out of the queue (it was cancelled)."""
        self.queue.remove(call)
        self.queue_bytes -= len(call.frame)
        self._count(call, -1)

    def running_of(self, connection: Any) -> list[Call]:
        """The calls of ``connection`` that handlers run now (not lent), unanswered."""
        return [
            call
            for call in self.running
            if call is not None and call.connection is connection and not call.answered and not call.lease
        ]

    def close(self) -> list[Call]:
        """Take no more calls; the queued ones, settled, for the caller to fail."""
        self.closing = True
        queued = [call for call in self.queue if self.settle(call)]
        self._replace_queue(deque())
        return queued

    def busy(self) -> int:
        """Handlers running a call."""
        return sum(call is not None for call in self.running)

    def _pop(self) -> Call:
        call = self.queue.popleft()
        self.queue_bytes -= len(call.frame)
        self._count(call, -1)
        return call

    def _count(self, call: Call, sign: int) -> None:
        """``call`` joins (``sign`` 1) or leaves (-1) the queue: its connection's share and the index by id."""
        if call.id is not None and call.connection is not None:
            key = (call.connection, call.id)
            if sign > 0:
                self.queued_ids.setdefault(key, []).append(call)
            else:
                same = self.queued_ids[key]
                same.remove(call)
                if not same:
                    del self.queued_ids[key]
        if call.origin is None:
            return
        held = self.queued_by.setdefault(call.origin, [0, 0])
        held[0] += sign
        held[1] += sign * len(call.frame)
        if not held[0]:
            del self.queued_by[call.origin]

    def _replace_queue(self, waiting: deque[Call]) -> None:
        self.queue = waiting
        self.queue_bytes = sum(len(call.frame) for call in waiting)
        self.queued_by = {}
        self.queued_ids = {}
        for call in waiting:
            self._count(call, 1)
