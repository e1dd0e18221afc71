"""The call table (rpc.calls): plain data, so every rule is tested with no sockets or processes.

Each test plays the router: it admits calls, releases slots when handlers answer or
start, reports handlers lost, and advances a clock of its own. :func:`check` states the
bookkeeping that must hold after every step, and the stateful test drives random
sequences of all of it, checking that bookkeeping and that each call is settled once.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rpc.calls import Call, CallTable
from rpc.errors import ServerBusy, ServerShuttingDown

A, B, C = "conn-a", "conn-b", "conn-c"  # connections are opaque to the table

_ids = iter(range(1, 1 << 62))


def call(connection: object = A, size: int = 10, deadline: float | None = None, received: float = 0.0) -> Call:
    return Call(connection, next(_ids), "method", b"x" * size, deadline, received)


def table(workers: int = 2, max_pending: int = 8, max_queue_bytes: int = 1000, max_call_seconds: float | None = None) -> CallTable:
    return CallTable(workers, max_pending, max_queue_bytes, max_call_seconds)


def start(t: CallTable, *slots: int, now: float = 0.0) -> None:
    """New handlers took these slots (as the router does when one attaches)."""
    for slot in slots or range(t.workers):
        t.reopen(slot)
        t.release(slot, now)


def admit_all(t: CallTable, calls: Iterable[Call]) -> list[int | None]:
    return [t.admit(c) for c in calls]


def check(t: CallTable, admitted: Iterable[Call]) -> None:
    """The table's bookkeeping agrees with its contents, whatever path led here."""
    admitted = list(admitted)
    assert t.queue_bytes == sum(len(c.frame) for c in t.queue)
    expected: dict[object, list[int]] = {}
    for c in t.queue:
        if c.origin is not None:
            held = expected.setdefault(c.origin, [0, 0])
            held[0] += 1
            held[1] += len(c.frame)
    assert t.queued_by == expected
    for connection, (count, size) in expected.items():
        assert t.over_share(connection) == (count >= t.share_calls or size >= t.share_bytes)
    assert t.unanswered == sum(not c.answered for c in admitted)
    # Idle slots run nothing, appear once, and take calls (a retiring slot never idles).
    assert len(set(t.idle)) == len(t.idle)
    for slot in t.idle:
        assert t.running[slot] is None
        assert slot not in t.retiring
    # A running call knows its slot; no call runs twice or both runs and waits.
    running = [c for c in t.running if c is not None]
    for slot, current in enumerate(t.running):
        if current is not None:
            assert current.slot == slot
    assert len({id(c) for c in running}) == len(running)
    queued = {id(c) for c in t.queue}
    assert len(queued) == len(t.queue)
    assert not queued & {id(c) for c in running}
    # Every call still owed an answer is somewhere: queued or running.
    for c in admitted:
        if not c.answered:
            assert id(c) in queued or c in running, c
    # No handler idles while a call it could run waits.
    if t.idle:
        assert all(c.answered for c in t.queue)
    if t.closing:
        assert not t.queue
    assert t.busy() == len(running)


# -- admit -----------------------------------------------------------------------------


def test_a_fresh_table_has_no_handlers_so_it_queues() -> None:
    t = table()
    first = call()
    assert t.admit(first) is None
    assert list(t.queue) == [first]
    check(t, [first])


def test_admit_runs_a_call_on_an_idle_slot() -> None:
    t = table(workers=2)
    start(t)
    first, second = call(), call()
    slots = admit_all(t, [first, second])
    assert sorted(slots) == [0, 1]  # type: ignore[type-var]
    assert first.slot == slots[0] and t.running[slots[0]] is first  # type: ignore[index]
    assert not t.idle and not t.queue
    assert t.unanswered == 2 and t.busy() == 2
    assert t.queued_by == {}  # running calls are not the queue's business
    check(t, [first, second])


def test_admit_queues_when_every_handler_is_busy() -> None:
    t = table(workers=1)
    start(t)
    running, waiting, notification = call(A, 5), call(B, 7), call(None, 11)
    assert admit_all(t, [running, waiting, notification]) == [0, None, None]
    assert list(t.queue) == [waiting, notification]
    assert t.queue_bytes == 18
    assert t.queued_by == {B: [1, 7]}  # a notification has no connection to hold back
    assert waiting.slot is None
    check(t, [running, waiting, notification])


def test_server_busy_by_count_changes_nothing() -> None:
    t = table(workers=1, max_pending=2)
    start(t)
    calls = [call() for _ in range(3)]
    admit_all(t, calls)
    refused = call(B)
    with pytest.raises(ServerBusy, match="2 calls are waiting") as caught:
        t.admit(refused)
    assert not isinstance(caught.value, ServerShuttingDown)
    assert len(t.queue) == 2 and B not in t.queued_by
    check(t, calls)


def test_server_busy_by_bytes_and_an_exact_fit() -> None:
    t = table(workers=1, max_queue_bytes=100)
    start(t)
    calls = [call(size=1), call(size=60), call(size=40)]  # running, then 100 bytes queued exactly
    assert admit_all(t, calls) == [0, None, None]
    assert t.queue_bytes == 100
    with pytest.raises(ServerBusy, match="hold 100 bytes") as caught:
        t.admit(call(size=1))
    assert not isinstance(caught.value, ServerShuttingDown)
    empty = call(size=0)
    assert t.admit(empty) is None  # an empty frame adds no bytes (the count limit still applies)
    check(t, calls + [empty])


def test_one_call_larger_than_the_byte_bound_still_queues_alone() -> None:
    """An empty queue takes any call, so a request over max_queue_bytes is delayed, not refused forever."""
    t = table(workers=1, max_queue_bytes=100)
    start(t)
    calls = [call(), call(size=500)]
    assert admit_all(t, calls) == [0, None]
    with pytest.raises(ServerBusy):
        t.admit(call(size=1))
    check(t, calls)


def test_closing_refuses_even_with_an_idle_handler() -> None:
    t = table()
    start(t)
    t.close()
    with pytest.raises(ServerShuttingDown) as caught:
        t.admit(call())
    assert isinstance(caught.value, ServerBusy)  # a client catching ServerBusy catches this too
    assert t.unanswered == 0 and sorted(t.idle) == [0, 1]
    check(t, [])


# -- deadlines and max_call_seconds ------------------------------------------------------


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [(None, 15.0), (12.0, 12.0), (15.0, 15.0), (40.0, 15.0)],
    ids=["none-gets-the-cap", "earlier-kept", "equal", "later-capped"],
)
def test_max_call_seconds_caps_deadlines(deadline: float | None, expected: float) -> None:
    for queued in (False, True):
        t = table(workers=1, max_call_seconds=5.0)
        start(t)
        if queued:
            t.admit(call())
        c = call(deadline=deadline, received=10.0)
        assert t.admit(c) == (None if queued else 0)
        assert c.deadline == expected


def test_no_max_call_seconds_leaves_deadlines_alone() -> None:
    t = table()
    start(t)
    forever, soon = call(deadline=None), call(deadline=3.0)
    admit_all(t, [forever, soon])
    assert forever.deadline is None and soon.deadline == 3.0


# -- settle ----------------------------------------------------------------------------------


def test_settle_is_true_exactly_once() -> None:
    t = table()
    start(t)
    c = call()
    t.admit(c)
    assert t.unanswered == 1
    assert t.settle(c) is True
    assert t.settle(c) is False
    assert t.settle(c) is False
    assert c.answered and t.unanswered == 0
    check(t, [c])


# -- release -----------------------------------------------------------------------------


def test_release_gives_the_next_queued_call_in_order() -> None:
    t = table(workers=1)
    start(t)
    calls = [call(A, 1), call(B, 2), call(A, 3)]
    admit_all(t, calls)
    t.settle(calls[0])
    assert t.release(0, now=0.0) == (calls[1], [])
    assert calls[1].slot == 0 and t.running[0] is calls[1]
    assert list(t.queue) == [calls[2]] and t.queue_bytes == 3 and t.queued_by == {A: [1, 3]}
    check(t, calls)
    t.settle(calls[1])
    assert t.release(0, now=0.0) == (calls[2], [])
    t.settle(calls[2])
    assert t.release(0, now=0.0) == (None, [])
    assert t.idle == [0] and t.queued_by == {} and t.queue_bytes == 0
    check(t, calls)


def test_release_of_an_idle_slot_keeps_it_idle_once() -> None:
    t = table(workers=1)
    start(t)
    for _ in range(3):
        assert t.release(0, now=0.0) == (None, [])
    assert t.idle == [0]
    check(t, [])


def test_release_settles_and_returns_expired_queued_calls() -> None:
    t = table(workers=1)
    start(t)
    running = call()
    late, due_now, fine, later = call(deadline=1.0), call(deadline=5.0), call(deadline=9.0), call(deadline=2.0)
    calls = [running, late, due_now, fine, later]
    admit_all(t, calls)
    t.settle(running)
    nxt, expired = t.release(0, now=5.0)  # a deadline equal to now has passed
    assert nxt is fine
    assert expired == [late, due_now]
    assert late.answered and due_now.answered and not fine.answered
    assert late.slot is None  # it never ran
    assert list(t.queue) == [later]  # the rest wait for the next release
    check(t, calls)
    t.settle(fine)
    assert t.release(0, now=5.0) == (None, [later])
    assert t.idle == [0]
    check(t, calls)


def test_release_skips_queued_calls_already_answered() -> None:
    t = table(workers=1)
    start(t)
    running, answered, waiting = call(), call(B, 4), call(C, 6)
    calls = [running, answered, waiting]
    admit_all(t, calls)
    t.settle(answered)  # answered elsewhere while it waited: nobody must answer it again
    check(t, calls)
    t.settle(running)
    assert t.release(0, now=0.0) == (waiting, [])  # skipped, and not reported as expired
    assert not t.queue and t.queue_bytes == 0 and t.queued_by == {}
    check(t, calls)


def test_a_retiring_slot_takes_nothing_until_reopened() -> None:
    t = table(workers=1)
    start(t)
    running, waiting = call(), call()
    admit_all(t, [running, waiting])
    assert t.retire(0) is False  # busy: it retires after this call
    t.settle(running)
    assert t.release(0, now=0.0) == (None, [])
    assert list(t.queue) == [waiting] and t.idle == [] and t.running == [None]
    check(t, [running, waiting])
    t.reopen(0)  # the new handler
    assert t.release(0, now=0.0) == (waiting, [])
    check(t, [running, waiting])


def test_a_retiring_slot_leaves_expired_calls_for_later() -> None:
    t = table(workers=1)
    start(t)
    running, late = call(), call(deadline=1.0)
    admit_all(t, [running, late])
    t.retire(0)
    t.settle(running)
    assert t.release(0, now=9.0) == (None, [])
    assert not late.answered  # expire() or the next handler's release answers it
    t.reopen(0)
    assert t.release(0, now=9.0) == (None, [late])
    check(t, [running, late])


# -- lost ------------------------------------------------------------------------------------


def test_lost_returns_the_unsettled_call_settled() -> None:
    t = table(workers=2)
    start(t)
    c = call()
    slot = t.admit(c)
    assert slot is not None
    assert t.lost(slot) is c
    assert c.answered and t.unanswered == 0
    assert t.running[slot] is None and slot not in t.idle  # no handler there until a new one starts
    check(t, [c])
    assert t.lost(slot) is None


def test_lost_after_the_call_was_answered_returns_nothing() -> None:
    t = table(workers=1)
    start(t)
    c = call(deadline=1.0)
    t.admit(c)
    assert t.expire(now=2.0) == ([c], [])  # answered CallTimeout; its handler is being stopped
    assert t.lost(0) is None
    assert t.running == [None] and t.unanswered == 0
    check(t, [c])


def test_lost_idle_handler_is_no_longer_idle() -> None:
    t = table(workers=2)
    start(t)
    assert t.lost(0) is None
    assert t.idle == [1]
    c = call()
    assert t.admit(c) == 1  # never the dead handler's slot
    check(t, [c])


def test_lost_leaves_the_queue_to_the_new_handler() -> None:
    t = table(workers=1)
    start(t)
    running, waiting = call(), call()
    admit_all(t, [running, waiting])
    assert t.lost(0) is running
    assert list(t.queue) == [waiting]
    start(t, 0)
    assert t.running[0] is waiting
    check(t, [running, waiting])


def test_a_stale_release_never_drops_a_call_owed_an_answer() -> None:
    t = table(workers=1)
    start(t)
    parked, other = call(A), call(B)
    assert t.admit(parked) == 0
    assert t.settle(parked)  # the handler replied; A reads slowly, so the reply is parked, the slot held
    assert t.lost(0) is None  # the handler died while it waited: nothing owed
    start(t, 0)  # its replacement
    assert t.admit(other) == 0  # another client's call runs on the new handler
    t.release(0, now=0.0)  # A drained: the router frees the slot the parked reply held
    assert t.running[0] is other
    check(t, [parked, other])


# -- retire and reopen ---------------------------------------------------------------


def test_retire_an_idle_slot() -> None:
    t = table(workers=1)
    start(t)
    assert t.retire(0) is True
    assert t.idle == [] and t.retiring == {0}
    c = call()
    assert t.admit(c) is None  # it waits for the new handler
    check(t, [c])
    start(t, 0)
    assert t.running[0] is c and t.retiring == set()
    check(t, [c])


def test_retire_twice_and_reopen_an_open_slot() -> None:
    t = table(workers=1)
    start(t)
    assert t.retire(0) is True
    assert t.retire(0) is False  # no longer idle
    t.reopen(0)
    t.reopen(0)
    assert t.retiring == set()


# -- expire ----------------------------------------------------------------------------------


def test_expire_running_and_queued_calls() -> None:
    t = table(workers=1)
    start(t)
    running = call(A, deadline=3.0)
    late, forever, fine = call(A, 5, deadline=2.0), call(B, 6), call(B, 7, deadline=10.0)
    calls = [running, late, forever, fine]
    admit_all(t, calls)
    assert t.expire(now=1.0) == ([], [])
    assert t.expire(now=3.0) == ([running], [late])
    assert running.answered and late.answered
    assert t.running[0] is running  # stays until its handler is stopped and lost()
    assert list(t.queue) == [forever, fine] and t.queue_bytes == 13 and t.queued_by == {B: [2, 13]}
    check(t, calls)
    assert t.expire(now=3.0) == ([], [])  # each once
    assert t.expire(now=1e9) == ([], [fine])  # no deadline: never
    check(t, calls)


def test_expire_leaves_queued_calls_already_answered_for_release() -> None:
    t = table(workers=1)
    start(t)
    running, answered = call(), call(deadline=1.0)
    admit_all(t, [running, answered])
    t.settle(answered)
    assert t.expire(now=5.0) == ([], [])
    check(t, [running, answered])


# -- forget ----------------------------------------------------------------------------------


def test_forget_drops_only_the_connections_queued_calls() -> None:
    t = table(workers=1)
    start(t)
    running = call(A)
    a1, b1, a2, n1 = call(A, 3), call(B, 4), call(A, 5), call(None, 6)
    calls = [running, a1, b1, a2, n1]
    admit_all(t, calls)
    assert t.forget(A) == 2
    assert a1.answered and a2.answered
    assert not running.answered and t.running[0] is running  # its answer still goes out (or nowhere)
    assert list(t.queue) == [b1, n1] and t.queue_bytes == 10 and t.queued_by == {B: [1, 4]}
    check(t, calls)
    assert t.forget(A) == 0
    assert t.forget("never seen") == 0
    check(t, calls)


def test_forget_counts_only_calls_it_settled() -> None:
    t = table(workers=1)
    start(t)
    running, a1, a2 = call(), call(A), call(A)
    admit_all(t, [running, a1, a2])
    t.settle(a1)
    assert t.forget(A) == 1
    assert not t.queue
    check(t, [running, a1, a2])


# -- close -----------------------------------------------------------------------------------


def test_close_returns_the_queued_calls_settled() -> None:
    t = table(workers=1)
    start(t)
    running, q1, q2, answered = call(), call(A), call(B), call(C)
    calls = [running, q1, q2, answered]
    admit_all(t, calls)
    t.settle(answered)
    assert t.close() == [q1, q2]
    assert not t.queue and t.queue_bytes == 0 and t.queued_by == {}
    assert t.unanswered == 1 and t.running[0] is running  # the running call still gets its answer
    check(t, calls)
    t.settle(running)
    assert t.release(0, now=0.0) == (None, [])
    assert t.close() == []
    check(t, calls)


# -- the fair share ------------------------------------------------------------------------


def test_over_share_by_calls() -> None:
    t = table(workers=1, max_pending=8)  # a share of 2 calls
    start(t)
    running = call(A)
    t.admit(running)
    assert t.share_calls == 2 and not t.over_share(A)
    t.admit(call(A))
    assert not t.over_share(A)
    t.admit(call(A))
    assert t.over_share(A) and not t.over_share(B)
    t.settle(running)
    t.release(0, now=0.0)
    assert not t.over_share(A)


def test_over_share_by_bytes() -> None:
    t = table(workers=1, max_queue_bytes=100)  # a share of 25 bytes
    start(t)
    t.admit(call(A))
    t.admit(call(A, 24))
    assert not t.over_share(A)
    t.admit(call(B, 25))
    assert t.over_share(B) and not t.over_share(A)


def test_the_smallest_share_is_one() -> None:
    t = table(workers=1, max_pending=1, max_queue_bytes=1)
    assert t.share_calls == 1 and t.share_bytes == 1
    start(t)
    t.admit(call(A))
    t.admit(call(A, 0))
    assert t.over_share(A)


# -- random sequences ---------------------------------------------------------------------

CONNECTIONS = [A, B, C, None]
UP, KILLING, DOWN = "up", "killing", "down"  # a slot's handler: serving, being stopped, none


class CallTableMachine(RuleBasedStateMachine):
    """The router's uses of the table in any order, with a clock of its own.

    A handler that is ``DOWN`` starts (reopen, release); one that is ``UP`` replies
    (settle, release) or is retired; any handler may be lost. ``answers`` counts how
    often each call was settled by a path that reports it, so the table must never
    settle a call twice or settle one without saying so.
    """

    def __init__(self) -> None:
        super().__init__()
        self.t = table()
        self.now = 0.0
        self.admitted: list[Call] = []
        self.answers: dict[int, int] = {}
        self.handlers: list[str] = []

    @initialize(
        workers=st.integers(1, 3),
        max_pending=st.integers(0, 6),
        max_queue_bytes=st.integers(1, 60),
        max_call_seconds=st.none() | st.floats(0.5, 5.0),
        started=st.booleans(),
    )
    def setup(self, workers: int, max_pending: int, max_queue_bytes: int, max_call_seconds: float | None, started: bool) -> None:
        self.t = CallTable(workers, max_pending, max_queue_bytes, max_call_seconds)
        self.handlers = [DOWN] * workers
        if started:
            for slot in range(workers):
                self.start_handler(slot)

    def answered(self, calls: Iterable[Call | None]) -> None:
        for c in calls:
            assert c is not None
            assert c.answered
            self.answers[id(c)] = self.answers.get(id(c), 0) + 1
            assert self.answers[id(c)] == 1, f"{c} settled twice"

    def take(self, slot: int, result: tuple[Call | None, list[Call]], queued_before: list[Call]) -> None:
        nxt, expired = result
        for c in expired:
            assert c.deadline is not None and self.now >= c.deadline
            assert c in queued_before
        self.answered(expired)
        if nxt is not None:
            assert nxt in queued_before and not nxt.answered and nxt.slot == slot
            assert nxt.deadline is None or self.now < nxt.deadline

    # -- calls in -----------------------------------------------------------------------

    @rule(
        connection=st.sampled_from(CONNECTIONS),
        size=st.integers(0, 30),
        timeout=st.none() | st.floats(0.0, 6.0),
    )
    def admit(self, connection: object, size: int, timeout: float | None) -> None:
        t = self.t
        c = call(connection, size, None if timeout is None else self.now + timeout, self.now)
        idle_before, queued_before, bytes_before = list(t.idle), len(t.queue), t.queue_bytes
        if t.closing:
            expected: type[Exception] | None = ServerShuttingDown
        elif idle_before:
            expected = None
        elif queued_before >= t.max_pending or (queued_before and bytes_before + size > t.max_queue_bytes):
            expected = ServerBusy
        else:
            expected = None
        try:
            slot = t.admit(c)
        except ServerBusy as exc:  # ServerShuttingDown is one too
            assert type(exc) is expected
            assert len(t.queue) == queued_before and t.idle == idle_before
            return
        assert expected is None
        self.admitted.append(c)
        if idle_before:
            assert slot in idle_before and t.running[slot] is c
        else:
            assert slot is None and t.queue[-1] is c
        if t.max_call_seconds is not None:
            assert c.deadline is not None and c.deadline <= c.received + t.max_call_seconds

    # -- handlers -------------------------------------------------------------------------

    def start_handler(self, slot: int) -> None:
        queued_before = list(self.t.queue)
        self.t.reopen(slot)
        self.take(slot, self.t.release(slot, self.now), queued_before)
        self.handlers[slot] = UP

    @rule(slot=st.integers(0, 2))
    def start(self, slot: int) -> None:
        slot %= len(self.handlers)
        if self.handlers[slot] == DOWN:
            self.start_handler(slot)

    @rule(slot=st.integers(0, 2))
    def reply(self, slot: int) -> None:
        """The handler answered its call: settle it (first and only answer), then release."""
        slot %= len(self.handlers)
        c = self.t.running[slot]
        if self.handlers[slot] != UP or c is None:
            return
        assert self.t.settle(c), "a serving handler's call was already answered"
        self.answered([c])
        retiring = slot in self.t.retiring
        queued_before = list(self.t.queue)
        result = self.t.release(slot, self.now)
        if retiring:
            assert result == (None, []) and slot not in self.t.idle
        self.take(slot, result, queued_before)

    @rule(slot=st.integers(0, 2))
    def lost(self, slot: int) -> None:
        slot %= len(self.handlers)
        if self.handlers[slot] == DOWN:
            return
        c = self.t.running[slot]
        gone = self.t.lost(slot)
        if gone is not None:
            assert gone is c
            self.answered([gone])
        else:
            assert c is None or c.answered
        self.handlers[slot] = DOWN

    @rule(slot=st.integers(0, 2))
    def retire(self, slot: int) -> None:
        slot %= len(self.handlers)
        if self.handlers[slot] != UP:
            return
        was_idle = slot in self.t.idle
        assert self.t.retire(slot) == was_idle
        assert slot not in self.t.idle

    # -- time and endings ---------------------------------------------------------------

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.floats(0.0, 3.0))
    def expire(self, dt: float) -> None:
        self.now += dt
        before = list(self.t.queue)
        running, queued = self.t.expire(self.now)
        for c in running + queued:
            assert c.deadline is not None and self.now >= c.deadline
        for c in queued:
            assert c in before and c not in self.t.queue
        self.answered(running + queued)
        for c in running:
            assert c.slot is not None and self.t.running[c.slot] is c
            self.handlers[c.slot] = KILLING  # its reply, if any, is ignored; it will be lost

    @rule(connection=st.sampled_from(CONNECTIONS))
    def forget(self, connection: object) -> None:
        owed = [c for c in self.t.queue if c.connection is connection and not c.answered]
        assert self.t.forget(connection) == len(owed)
        self.answered(owed)  # settled with nobody to answer
        assert not any(c.connection is connection for c in self.t.queue)

    @precondition(lambda self: not self.t.closing)
    @rule()
    def close(self) -> None:
        owed = [c for c in self.t.queue if not c.answered]
        assert self.t.close() == owed
        self.answered(owed)

    # -- after every step ---------------------------------------------------------------

    @invariant()
    def bookkeeping(self) -> None:
        check(self.t, self.admitted)
        for slot, state in enumerate(self.handlers):
            if state == DOWN:
                assert self.t.running[slot] is None and slot not in self.t.idle

    @invariant()
    def settled_once_and_reported(self) -> None:
        for c in self.admitted:
            assert self.answers.get(id(c), 0) == (1 if c.answered else 0), c

    def teardown(self) -> None:
        """Shut down: every call ever admitted ends with exactly one answer."""
        if not self.handlers:
            return
        if not self.t.closing:
            self.close()
        for slot in range(len(self.handlers)):
            if self.handlers[slot] == UP:
                self.reply(slot)
            if self.handlers[slot] != DOWN:
                self.lost(slot)
        check(self.t, self.admitted)
        assert self.t.unanswered == 0
        assert all(self.answers.get(id(c)) == 1 for c in self.admitted)


CallTableMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,  # the machine is loaded: time is no measure here
    derandomize=True,  # the same sequences every run: a failure here is a bug, never luck
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_call_table_state_machine = CallTableMachine.TestCase
