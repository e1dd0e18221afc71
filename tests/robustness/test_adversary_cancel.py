"""Cancel messages attacked as a hostile or unlucky client would: every call is answered
exactly once, no handler is lost, and the server keeps serving others.

Raw connections count the answers per request id; real servers, real handler processes.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import rpc
import rpc.aio
from helpers import (
    Gate,
    framed,
    log_has,
    raw_connection,
    request,
    router_state,
    sigint_as_by_default,
    still_serves,
    wait_for,
    write,
)
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
                lambda r: r.table.unanswered == 0
                and not r.table.queue
                and not r.table.queued_ids
                and not r.table.queued_by
                and not r.table.by_id
                and all(p is not None for p in r.pipes),
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


def test_a_duplicate_id_in_flight_closes_the_connection_naming_it_and_never_runs(rpc_server, loop_name, tmp_path):
    """Two calls with one id could not be told apart by their answers: the second is refused with
    a connection-level error naming the id, and the first, left without a caller, is cancelled."""
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    gate, marker = Gate(tmp_path), tmp_path / "ran"
    conn = raw_connection(server)
    write(conn, request(7, "hold", *gate.args(), "one"))
    gate.wait_started()
    write(conn, request(7, "touch", str(marker)))
    assert conn.poll(20)
    response = protocol.decode_response(conn.recv_bytes())
    assert response.id is None and response.error.code == "protocol_error"
    assert "request id 7 is already in flight on this connection" in response.error.message
    assert eof(conn)
    assert log_has(server, "by its client going away")  # the held call, stopped: nobody waits for it
    assert settled(server)
    assert not marker.exists()
    still_serves(server)


def test_a_cancel_reaches_only_the_call_of_that_id_on_its_own_connection(rpc_server, loop_name, tmp_path):
    """Ids are per connection: two connections' queued calls 7, one cancelled."""
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False)
    gate = Gate(tmp_path)
    first, second = raw_connection(server), raw_connection(server)
    write(first, request(1, "hold", *gate.args()))
    gate.wait_started()
    write(first, request(7, "add", 1, 0) + request(8, "add", 2, 0))
    write(second, request(7, "add", 3, 0))
    assert wait_for(lambda: router_state(server, lambda r: len(r.table.queue)) == 3, timeout=20)
    write(first, cancel(7))
    ours = Answers(first).read(1)
    assert ours.by_id == {7: ["call_cancelled"]}
    gate.open()
    ours.read(2)
    assert ours.by_id == {7: ["call_cancelled"], 8: [2], 1: [None]}
    assert Answers(second).read(1).by_id == {7: [3]}
    assert settled(server)
    first.close()
    second.close()


def eof(conn, timeout: float = 20.0) -> bool:
    """The server closed ``conn`` (anything still arriving before the end is dropped)."""
    for _ in range(100):
        if not conn.poll(timeout):
            return False
        try:
            conn.recv_bytes()
        except (EOFError, OSError):
            return True
    return False


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


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_cancel_behind_a_pipelined_request_on_a_lent_socket(rpc_server, loop_name, tmp_path, transport):
    """The client sends another request, then cancels the lent call: the cancel is not at the
    head of the socket, but the call must still be stopped."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name, transport=transport)
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


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_client_that_pipelines_then_goes_away_on_a_lent_socket(rpc_server, loop_name, tmp_path, transport):
    """A request behind the running lent call hides the hang-up from a peek: still, the call
    is stopped after the grace, as a routed one is."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name, transport=transport)
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
    with id 2, then cancels id 2. A lent socket serves one call at a time, so the server never
    has both in flight: both are answered, once each. Routed instead (the lease had ended), the
    second call 2 is a duplicate in flight: the connection is closed with an error naming it."""
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
        assert conn.poll(15)
        first = protocol.decode_response(conn.recv_bytes())
        if first.id is None:  # it was routed: refused as a duplicate
            assert not inside, "a lent socket saw a duplicate id in flight"
            assert first.error.code == "protocol_error" and "request id 2 is already in flight" in first.error.message
            assert eof(conn)
            assert settled(server)
            conn = raw_connection(server)
            continue
        answers = Answers(conn)
        answers.by_id[first.id] = [first.error.code if first.error else first.result]
        answers.read(1, timeout=15)
        assert sorted(answers.by_id[2], key=str) in ([10, "call_cancelled"], ["call_cancelled", "held"], [10, "held"])  # (str order: "10" < "c" < "h")
        assert settled(server)
        ping_after(conn, answers)
        if inside:
            break
    conn.close()


# -- races: the answer, the handler's death, the server's close and reload -------------------------


def test_cancels_racing_their_answers_on_routed_and_lent_calls(rpc_server, loop_name):
    """Each call is cancelled right after it is sent, while it runs, answers or is lent: it is
    answered once, with its result or call_cancelled, and nothing else comes."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name)
    conn = raw_connection(server)
    answers = Answers(conn)
    for i in range(1, 121):
        write(conn, request(i, "add", i, 0))
        write(conn, cancel(i))
        answers.read(1)
        assert answers.by_id[i] in ([i], ["call_cancelled"])
    ping_after(conn, answers)
    assert settled(server)
    still_serves(server)
    conn.close()


def test_a_cancel_and_the_handler_dying_at_once_answer_the_call_once(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    conn = raw_connection(server)
    answers = Answers(conn)
    ids = range(1, 21)
    for i in ids:
        write(conn, request(i, "crash", "kill") + cancel(i))
    answers.read(len(ids))
    got = answers.once_each(ids)
    assert set(got.values()) <= {"call_cancelled", "worker_crashed"}
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


def test_a_cancel_while_the_server_closes(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False, shutdown_grace=30.0)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()) + request(2, "add", 1, 1))
    gate.wait_started()
    closer = threading.Thread(target=server.server.close)
    closer.start()
    try:
        answers = Answers(conn).read(1)  # the queued call fails at once: the close is under way
        assert answers.by_id == {2: ["server_shutting_down"]}
        write(conn, cancel(1) + cancel(2))
        answers.read(1)
        assert answers.by_id[1] == ["call_cancelled"]
        closer.join(60)
        assert not closer.is_alive(), "the close waited on, its last call cancelled"
    finally:
        gate.open()
        closer.join(60)
    assert server.handler_pids() == []
    conn.close()


def test_a_cancel_while_the_server_reloads(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()))
    gate.wait_started()
    old = set(server.handler_pids())
    reloader = threading.Thread(target=server.server.reload)
    reloader.start()
    try:
        # Its handler is retired (it would be replaced once its call ends), whichever slot goes first.
        def retired(r) -> bool:
            handlers = [r.arbiter.handlers[c.slot] for c in r.table.running if c is not None and c.id == 1]
            return any(h is not None and h.retired for h in handlers)

        assert wait_for(lambda: router_state(server, retired), timeout=30)
        write(conn, cancel(1))
        answers = Answers(conn).read(1)
        assert answers.by_id == {1: ["call_cancelled"]}
        reloader.join(60)
        assert not reloader.is_alive()
    finally:
        gate.open()
        reloader.join(60)
    assert log_has(server, "reload_finished")
    assert wait_for(lambda: not (old & set(server.handler_pids())) and len(server.handler_pids()) == 2, timeout=30)
    assert settled(server)
    ping_after(conn, answers)
    still_serves(server)
    conn.close()


def test_a_new_call_with_the_id_just_cancelled_is_answered(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(3, "hold", *gate.args()))
    gate.wait_started()
    write(conn, cancel(3) + request(3, "add", 2, 2))
    answers = Answers(conn).read(2)
    assert answers.by_id == {3: ["call_cancelled", 4]}
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


def test_cancels_of_notifications_and_of_ids_never_sent(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False)
    gate, marker = Gate(tmp_path), tmp_path / "notified"
    conn = raw_connection(server)
    notify = framed(protocol.encode_notification("touch", (str(marker),), {}))
    write(conn, request(1, "hold", *gate.args()) + notify + cancel(0) + cancel(2))
    gate.wait_started()
    gate.open()
    answers = Answers(conn).read(1)
    assert answers.by_id == {1: [None]}
    assert wait_for(marker.exists, timeout=20)  # the queued notification ran: no cancel reaches it
    ping_after(conn, answers)
    conn.close()


# -- the sync client: future.cancel() and Ctrl-C -----------------------------------------------------


def test_future_cancel_racing_the_answer_leaves_every_future_done(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name)
    with server.client(timeout=30) as client:
        for i in range(300):
            future = client.submit("add", i, 1)
            cancelled = future.cancel()
            assert cancelled == future.cancelled()
            if not cancelled:
                assert future.result(30) == i + 1
        assert client.add(2, 3) == 5
        assert client.submit("add", 3, 3).result(30) == 6
    assert settled(server)


def test_a_future_cancelled_twice_still_says_it_is_cancelled(rpc_server, tmp_path):
    """concurrent.futures: cancel() on a cancelled future returns True."""
    server = rpc_server("services:registry", workers=1)
    gate = Gate(tmp_path)
    with server.client(timeout=30) as client:
        future = client.submit("hold", *gate.args())
        gate.wait_started()
        assert future.cancel() is True
        assert future.cancel() is True
        assert future.cancelled()


def test_many_futures_cancelled_from_threads_while_the_reader_delivers(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=4096)
    with server.client(timeout=60) as client:
        futures = [client.submit("add", i, 0) for i in range(600)]
        start = threading.Barrier(4)

        def cancel_some(part: int) -> None:
            start.wait()
            for future in futures[part::4]:
                future.cancel()

        threads = [threading.Thread(target=cancel_some, args=(part,)) for part in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for i, future in enumerate(futures):
            assert future.cancelled() or future.result(60) == i  # every future ends, one way or the other
        assert client.add(4, 4) == 8
    assert settled(server)
    still_serves(server)


def test_cancel_after_the_connection_failed(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1)
    gate = Gate(tmp_path)
    client = server.client(timeout=30)
    future = client.submit("hold", *gate.args())
    gate.wait_started()
    client.close()
    assert future.cancel() is False  # it failed already: ConnectionClosed is its outcome
    with pytest.raises(rpc.ConnectionClosed):
        future.result(10)
    gate.open()
    assert settled(server)


def test_ctrl_c_while_a_large_request_is_half_sent_does_not_corrupt_the_next_call(rpc_server, tmp_path):
    """The server has read the header of a large request (and starves it for room in the receive
    budget) when Ctrl-C interrupts the send: the stream is mid-frame, so the next call must not be
    sent as the rest of it (it would never be answered)."""
    server = rpc_server("services:registry", workers=1, transport="tcp", max_receive_bytes=1 << 20)
    staller = raw_connection(server)  # takes the whole budget with a large request it never finishes
    big = protocol.encode_request(1, "echo", (b"x" * (1 << 20),), {}, None)
    write(staller, framed(big)[: 1 << 16])
    assert wait_for(lambda: router_state(server, lambda r: r.receive_budget.used) > 0, timeout=20)
    script = textwrap.dedent(
        f"""
        import rpc
        client = rpc.connect({server.address!r}, authkey={server.authkey!r}, timeout=60)
        print(client.add(1, 1), flush=True)
        try:
            client.echo(b"y" * (32 << 20))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        try:
            print(client.call("add", 2, 3, timeout=10), flush=True)
        except Exception as exc:
            print(type(exc).__name__, flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_by_default
    )
    try:
        assert child.stdout.readline().strip() == "2"
        # Its large request's header is read, and it waits for room: the rest is unsent.
        assert wait_for(lambda: router_state(server, lambda r: len(r.starved)) == 1, timeout=30)
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline().strip() == "interrupted"
        staller.close()  # room again: the server reads on
        out = child.stdout.readline()  # (readline throughout: communicate() would miss what it buffered)
    finally:
        child.kill()
        child.wait()
    assert out.strip() in ("5", "ConnectionClosed"), child.stderr.read()
    assert wait_for(lambda: router_state(server, lambda r: r.receive_budget.used) == 0, timeout=20)
    still_serves(server)


# -- rpc.aio: task cancellation ---------------------------------------------------------------------


def run_on(loop_name: str, coroutine) -> object:
    """Run ``coroutine`` on a fresh loop of the kind named (the server's kind), bounded against a hang."""
    factory = None
    if loop_name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coroutine, 120))


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    """Wait (without blocking the loop) until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


def aio_connect(server):
    return rpc.aio.connect(server.address, authkey=server.authkey, timeout=60)


def test_many_tasks_cancelled_at_once(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=256)
    count = 60

    async def body() -> None:
        async with aio_connect(server) as client:
            tasks = [asyncio.ensure_future(client.sleep(30, i)) for i in range(count)]
            await until(lambda: router_state(server, lambda r: r.table.unanswered) == count, "all calls taken")
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
            await until(lambda: server.log_text().count("call_cancelled") == count, "every call cancelled")
            assert await client.add(1, 2) == 3

    run_on(loop_name, body())
    assert settled(server)


def test_tasks_cancelled_in_the_turn_their_requests_are_written(rpc_server, loop_name):
    """The requests still wait in the client's outbox when their tasks are cancelled: request and
    cancel reach the server together, and every call is cancelled."""
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=256)
    count = 40

    async def body() -> None:
        async with aio_connect(server) as client:
            tasks = [asyncio.ensure_future(client.sleep(30, i)) for i in range(count)]
            await asyncio.sleep(0)  # each task registers its call and queues its request
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
            await until(lambda: server.log_text().count("call_cancelled") == count, "every call cancelled")
            assert await client.add(1, 2) == 3

    run_on(loop_name, body())
    assert settled(server)


def test_task_cancels_racing_their_answers(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=3, event_loop=loop_name)

    async def body() -> None:
        async with aio_connect(server) as client:
            for i in range(300):
                task = asyncio.ensure_future(client.add(i, 0))
                for _ in range(i % 5):
                    await asyncio.sleep(0)
                task.cancel()
                [outcome] = await asyncio.gather(task, return_exceptions=True)
                assert outcome == i or isinstance(outcome, asyncio.CancelledError)
            assert await client.add(2, 2) == 4
            assert await asyncio.gather(*(client.add(i, 1) for i in range(50))) == [i + 1 for i in range(50)]

    run_on(loop_name, body())
    assert settled(server)
    still_serves(server)


def test_a_timeout_around_an_aio_call_stops_it_on_the_server(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)  # never opened: only the cancel ends the call

    async def body() -> None:
        async with aio_connect(server) as client:
            [pid] = server.handler_pids()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(60) as bound:
                    call = asyncio.ensure_future(client.hold(*gate.args()))
                    await until(gate.started.exists, "the call runs")
                    bound.reschedule(asyncio.get_running_loop().time())
                    await call
            await until(lambda: server.handler_pids() not in ([], [pid]), "the stopped handler is replaced")
            assert await client.add(1, 2) == 3

    run_on(loop_name, body())
    assert settled(server)


def test_a_task_cancelled_after_its_connection_failed(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)

    async def body() -> None:
        client = await aio_connect(server)
        call = asyncio.ensure_future(client.hold(*gate.args()))
        await until(gate.started.exists, "the call runs")
        await client.close()
        call.cancel()  # too late: it failed with the connection
        [outcome] = await asyncio.gather(call, return_exceptions=True)
        assert isinstance(outcome, rpc.ConnectionClosed)

    run_on(loop_name, body())
    assert wait_for(lambda: "by its client going away" in server.log_text(), timeout=30)
    assert settled(server)


def test_a_cancelled_call_whose_handler_ignores_sigterm(rpc_server, loop_name):
    """Answered call_cancelled at once; its handler, deaf to SIGTERM, is killed and replaced; the
    other handler serves meanwhile."""
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, lease=False)
    conn = raw_connection(server)
    write(conn, request(1, "spin_ignoring_sigterm", 300))
    assert wait_for(lambda: router_state(server, lambda r: r.table.busy()) == 1, timeout=20)
    pids = set(server.handler_pids())
    write(conn, cancel(1))
    answers = Answers(conn).read(1)
    assert answers.by_id == {1: ["call_cancelled"]}
    still_serves(server)
    assert wait_for(lambda: len(set(server.handler_pids()) - pids) == 1, timeout=30)
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


def test_many_clients_going_away_with_calls_running_and_queued(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=256)
    conns = [raw_connection(server) for _ in range(20)]
    for i, conn in enumerate(conns):
        write(conn, b"".join(request(j, "sleep", 300, j) for j in range(3)) + cancel(2))
    assert wait_for(lambda: router_state(server, lambda r: r.table.busy()) == 2, timeout=20)
    pids = set(server.handler_pids())
    for conn in conns:
        conn.close()
    assert settled(server)
    # Both running calls' handlers are stopped, and replaced.
    assert wait_for(lambda: not pids & set(server.handler_pids()) and len(server.handler_pids()) == 2, timeout=30)
    assert settled(server)
    assert wait_for(lambda: router_state(server, lambda r: len(r.connections)) == 0, timeout=30)
    still_serves(server)


def test_a_cancel_behind_a_long_pipeline_on_a_lent_socket(rpc_server, loop_name, tmp_path):
    """Far behind other requests, the cancel may not be seen while the lent call runs (the router
    looks past a few frames only): either way, every call is answered once."""
    server = rpc_server("services:registry", workers=3, event_loop=loop_name, max_pending=1024)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    lent_call(server, conn, gate)
    write(conn, b"".join(request(i, "add", i, 0) for i in range(3, 300)) + cancel(2))
    gate.open()
    answers = Answers(conn).read(298)
    got = answers.once_each(range(2, 300))
    assert got[2] in ("held", "call_cancelled") and all(got[i] == i for i in range(3, 300))
    assert settled(server)
    ping_after(conn, answers)
    conn.close()


def test_random_requests_and_cancels_from_several_clients_are_each_answered_once(rpc_server, loop_name):
    """A seeded mix: calls short and long, cancels of recent, old and unknown ids, frames split
    anywhere across writes, on three connections (routed, queued and lent calls)."""
    import random

    rnd = random.Random(11)
    server = rpc_server("services:registry", workers=3, event_loop=loop_name, max_pending=4096)
    conns = [raw_connection(server) for _ in range(3)]
    sent: list[list[int]] = [[], [], []]
    answers = [Answers(conn) for conn in conns]
    next_id = 1
    for _ in range(300):
        c = rnd.randrange(3)
        data = b""
        for _ in range(rnd.randint(1, 4)):
            if rnd.random() < 0.5 or not sent[c]:
                if rnd.random() < 0.6:
                    data += request(next_id, "add", next_id, 0)
                else:
                    data += request(next_id, "sleep", rnd.choice([0, 0.001, 0.01, 0.04, 0.06]), next_id)
                sent[c].append(next_id)
                next_id += 1
            else:
                data += cancel(rnd.choice(sent[c][-5:]) if rnd.random() < 0.9 else rnd.randrange(10**6, 10**7))
        cut = rnd.randrange(len(data))
        write(conns[c], data[:cut])
        write(conns[c], data[cut:])
        for k in range(3):
            while conns[k].poll(0):
                answers[k].read(1)
    for k in range(3):
        answers[k].read(len(sent[k]) - answers[k].total())
        got = answers[k].once_each(sent[k])
        assert all(got[i] in (i, "call_cancelled") for i in sent[k])
        ping_after(conns[k], answers[k])
    assert settled(server)


def test_a_cancelled_future_counts_as_done_for_wait_and_as_completed(rpc_server, tmp_path):
    """concurrent.futures.wait() and as_completed() take a cancelled future as done, before and
    while they wait."""
    from concurrent.futures import FIRST_COMPLETED, as_completed, wait

    server = rpc_server("services:registry", workers=2)
    gate = Gate(tmp_path)
    with server.client(timeout=60) as client:
        early = client.submit("hold", *gate.args())
        gate.wait_started()
        assert early.cancel()
        done, _ = wait([early], timeout=10)
        assert early in done
        assert list(as_completed([early], timeout=10)) == [early]
        late = client.submit("sleep", 60)
        waiting = threading.Thread(target=lambda: results.append(wait([late], timeout=10, return_when=FIRST_COMPLETED)))
        results: list = []
        waiting.start()
        assert wait_for(lambda: late._waiters, timeout=10)  # wait() is waiting on it
        assert late.cancel()
        waiting.join(30)
        assert late in results[0].done
        assert client.add(1, 1) == 2


def test_a_cancel_of_a_lent_call_while_the_server_closes(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=3, event_loop=loop_name, shutdown_grace=30.0)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    lent_call(server, conn, gate)
    closer = threading.Thread(target=server.server.close)
    closer.start()
    try:
        assert wait_for(lambda: router_state(server, lambda r: r.closing and r.recalled), timeout=20)
        write(conn, cancel(2))
        answers = Answers(conn).read(1)
        assert answers.by_id == {2: ["call_cancelled"]}
        closer.join(60)
        assert not closer.is_alive()
    finally:
        gate.open()
        closer.join(60)
    assert server.handler_pids() == []
