"""Cancel messages attacked as a hostile or unlucky client would: every call is answered
exactly once, no handler is lost, and the server keeps serving others.

Raw connections count the answers per request id; real servers, real handler processes.
"""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import still_serves
from helpers import Gate, framed, log_has, raw_connection, request, router_state, wait_for, write
from rpc import protocol


def cancel(request_id: int) -> bytes:
    return framed(protocol.encode_cancel(request_id))


class Answers:
    """Every response read on a connection, by id: [(result or error code), ...]."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.by_id: dict[int | None, list[object]] = {}

    def read(self, count: int, timeout: float = 20.0) -> Answers:
        for _ in range(count):
            assert self.conn.poll(timeout), f"{self.total()} answers ({self.by_id}), then nothing for {timeout} s"
            response = protocol.decode_response(self.conn.recv_bytes())
            entry = response.error.code if response.error else response.result
            self.by_id.setdefault(response.id, []).append(entry)
        return self

    def total(self) -> int:
        return sum(map(len, self.by_id.values()))

    def once_each(self, ids) -> dict:
        """Each of ``ids`` answered exactly once, and nothing else: id -> its answer."""
        assert sorted(self.by_id, key=repr) == sorted(ids, key=repr), f"answers {self.by_id} for ids {list(ids)}"
        twice = {i: a for i, a in self.by_id.items() if len(a) != 1}
        assert not twice, f"answered more than once: {twice}"
        return {i: a[0] for i, a in self.by_id.items()}


def settled(server) -> bool:
    """Nothing unanswered, nothing queued, and every handler slot has a live handler."""
    return bool(
        wait_for(
            lambda: router_state(
                server,
                lambda r: r.table.unanswered == 0 and not r.table.queue and all(p is not None for p in r.pipes),
            ),
            timeout=30,
        )
    )


def ping_after(conn, answers: Answers, marker_id: int = 10**9) -> None:
    """Nothing more is owed on ``conn``: a call sent now is the next thing answered."""
    write(conn, request(marker_id, "add", 1, 1))
    assert conn.poll(20)
    response = protocol.decode_response(conn.recv_bytes())
    assert response.id == marker_id, f"an extra answer: {response}"


# -- ids reused, duplicated, cancelled twice ----------------------------------------------------


def test_a_reused_id_is_cancelled_again_while_the_first_handler_is_replaced(rpc_server, loop_name, tmp_path):
    """A client reuses an id once its first call is answered (call_cancelled), then cancels the
    new call too: the new call must not run, though the stopped handler still holds the old one."""
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False)
    gate, marker = Gate(tmp_path), tmp_path / "ran"
    conn = raw_connection(server)
    write(conn, request(5, "hold", *gate.args()))
    gate.wait_started()
    # One write: the router reads all three before the stopped handler can be collected.
    write(conn, cancel(5) + request(5, "touch", str(marker)) + cancel(5))
    answers = Answers(conn).read(2)
    assert answers.by_id == {5: ["call_cancelled", "call_cancelled"]}
    assert settled(server)
    ping_after(conn, answers)
    assert not marker.exists()
    conn.close()


def test_duplicate_ids_in_flight_one_cancelled_each_answered_once(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    first, second = Gate(tmp_path, "first"), Gate(tmp_path, "second")
    conn = raw_connection(server)
    write(conn, request(7, "hold", *first.args(), "one") + request(7, "hold", *second.args(), "two"))
    first.wait_started()
    second.wait_started()
    write(conn, cancel(7))
    answers = Answers(conn).read(1)
    assert answers.by_id == {7: ["call_cancelled"]}
    first.open()
    second.open()
    answers.read(1)
    assert sorted(answers.by_id[7], key=str) in (["call_cancelled", "one"], ["call_cancelled", "two"])
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


def test_a_cancel_storm_for_unknown_and_repeated_ids_changes_nothing(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False, max_pending=400)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()) + b"".join(request(i, "add", i, 0) for i in range(2, 60)))
    gate.wait_started()
    # Unknown ids, the running call's id over and over, ids past 64 bits' worth of msgpack ints.
    storm = b"".join(cancel(10_000 + i) for i in range(20_000))
    storm += b"".join(cancel(40) for _ in range(2_000)) + cancel(-1) + cancel(2**63) + cancel(2**64 - 1)
    sender = threading.Thread(target=write, args=(conn, storm))
    sender.start()
    answers = Answers(conn).read(1)  # call 40, cancelled once however often it was asked
    assert answers.by_id == {40: ["call_cancelled"]}
    with server.client(timeout=30) as other:
        other.ping()  # the router answers another client meanwhile (its only handler is held)
    sender.join(30)
    gate.open()
    still_serves(server)
    answers.read(58)
    got = answers.once_each(range(1, 60))
    assert got == {1: None, 40: "call_cancelled", **{i: i for i in range(2, 60) if i != 40}}
    ping_after(conn, answers)
    conn.close()


def test_a_cancel_in_the_same_read_as_its_request(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name)
    conn = raw_connection(server)
    ids = range(1, 41)
    write(conn, b"".join(request(i, "sleep", 5, i) + cancel(i) for i in ids))
    answers = Answers(conn).read(len(ids))
    assert answers.once_each(ids) == {i: "call_cancelled" for i in ids}
    assert settled(server)
    ping_after(conn, answers)
    still_serves(server)
    conn.close()


def test_a_cancel_split_across_reads(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()))
    gate.wait_started()
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if sock.family != socket.AF_UNIX else None
        for byte in cancel(1):
            sock.sendall(bytes([byte]))
    finally:
        sock.detach()
    answers = Answers(conn).read(1)
    assert answers.by_id == {1: ["call_cancelled"]}
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


# -- the lent socket ------------------------------------------------------------------------------


def lent_call(server, conn, gate: Gate, request_id: int = 2) -> None:
    """Make ``request_id`` a held call on a lent socket (a connection's first call is not lent)."""
    write(conn, request(1, "add", 1, 1))
    assert Answers(conn).read(1).by_id == {1: [2]}
    write(conn, request(request_id, "hold", *gate.args(), "held"))
    gate.wait_started()
    assert router_state(server, lambda r: len(r.lent)) == 1


def test_a_cancel_behind_a_pipelined_request_on_a_lent_socket(rpc_server, loop_name, tmp_path):
    """The client sends another request, then cancels the lent call: the cancel is not at the
    head of the socket, but the call must still be stopped."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    lent_call(server, conn, gate)
    write(conn, request(3, "add", 3, 3) + cancel(2))
    try:
        answers = Answers(conn).read(2, timeout=15)
        assert answers.once_each([2, 3]) == {2: "call_cancelled", 3: 6}
    finally:
        gate.open()
    assert settled(server)
    conn.close()


def test_a_client_that_pipelines_then_goes_away_on_a_lent_socket(rpc_server, loop_name, tmp_path):
    """A request behind the running lent call hides the hang-up from a peek: still, the call
    is stopped after the grace, as a routed one is."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    lent_call(server, conn, gate)
    write(conn, request(3, "add", 3, 3))
    conn.close()
    try:
        assert log_has(server, "by its client going away", timeout=15)
    finally:
        gate.open()
    assert settled(server)


def lent_answered(server) -> int:
    """Calls the lent handler has answered in its current lease (0 if nothing is lent)."""
    from rpc import lease

    def read(router):
        for slot in router.lent:
            handler = router.arbiter.handlers[slot]
            return lease.CallState(handler.call_state).read()[3]
        return 0

    return router_state(server, read)


def test_a_duplicate_id_behind_the_lent_call_then_a_cancel(rpc_server, loop_name, tmp_path):
    """The lent handler runs call 2 (not the first of its lease); the client sends another call
    with id 2, then cancels id 2: both calls with that id are answered, once each."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name)
    conn = raw_connection(server)
    write(conn, request(1, "add", 1, 1))
    assert Answers(conn).read(1).by_id == {1: [2]}
    for attempt in range(20):  # until the held call is served inside a lease already under way
        gate = Gate(tmp_path, f"gate{attempt}")
        write(conn, request(2, "add", 2, 2))
        assert Answers(conn).read(1).by_id == {2: [4]}
        write(conn, request(2, "hold", *gate.args(), "held"))  # within the lease's idle time, usually
        gate.wait_started()
        inside = lent_answered(server) > 0
        since = server.log_size()
        write(conn, request(2, "add", 5, 5) + cancel(2))
        # Either the router stops the held call for the cancel, or it leaves the cancel to be read
        # later (then it applies to the second call 2, or to none): give it the chance, then go on.
        wait_for(lambda: "call_cancelled" in server.log_text(since), timeout=2)
        gate.open()
        answers = Answers(conn).read(2, timeout=15)
        assert sorted(answers.by_id[2], key=str) in (["call_cancelled", 10], ["call_cancelled", "held"], [10, "held"])
        assert settled(server)
        ping_after(conn, answers)
        if inside:
            break
    conn.close()
