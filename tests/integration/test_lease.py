"""The latency fast path: a spare handler serves a one-call-at-a-time client's socket directly."""

from __future__ import annotations

import threading
import time

import pytest

import rpc
import services
from helpers import Gate, log_has, wait_for


def test_sequential_calls_are_served_on_a_lent_socket(rpc_server):
    server = rpc_server("services:registry", workers=2, access_log=True)
    with server.client() as client:
        assert [client.add(i, 1) for i in range(50)] == [i + 1 for i in range(50)]
    assert "leased=True" in server.log_text()


def test_no_lending_when_turned_off(rpc_server):
    server = rpc_server("services:registry", workers=2, access_log=True, lease=False)
    with server.client() as client:
        assert [client.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    assert "leased=True" not in server.log_text()


def test_a_waiting_call_gets_the_lent_handler_back(rpc_server, tmp_path):
    """Client A holds a lent handler; B keeps the other busy; C must not wait on A's lease."""
    server = rpc_server("services:registry", workers=2, access_log=True)
    a, b, c = (server.client(timeout=30) for _ in range(3))
    stop = threading.Event()
    a_results = []

    def steady() -> None:
        for _ in range(1_000_000):  # bounded; stopped long before
            if stop.is_set():
                return
            a_results.append(a.add(1, 1))

    steady_caller = threading.Thread(target=steady)
    steady_caller.start()
    assert log_has(server, "leased=True")  # A's socket is lent
    gate = Gate(tmp_path)
    busy = threading.Thread(target=b.hold, args=gate.args())
    busy.start()
    gate.wait_started()
    # Both handlers are taken (A's lease, B's call) and B's call is not let go:
    # C is served only if the server recalls A's lease.
    assert c.add(2, 2) == 4
    assert busy.is_alive()
    gate.open()
    stop.set()
    steady_caller.join(30)
    busy.join(30)
    assert a_results and set(a_results) == {2}


def test_pipelined_slow_calls_still_spread_over_handlers(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=2)
    with server.client(timeout=30) as client:
        pids = list(client.map("record", [str(tmp_path)] * 6, [0.1] * 6))
    assert len(set(pids)) == 2  # both handlers ran some of them


def test_a_call_sent_once_the_last_answer_is_read_keeps_the_lent_socket(rpc_server, tmp_path, monkeypatch):
    """A one-call-at-a-time client is not taken for a pipelining one when its next call
    is on the socket before the handler that answered the last has moved on (a loaded machine)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    monkeypatch.setenv(services.LEASE_HOOKS, str(hooks))
    # spawn: handlers start from this process's environment, so they install the hooks
    server = rpc_server("services:registry", workers=2, access_log=True, start_method="spawn")
    with server.client(timeout=30) as client:
        assert client.add(1, 1) == 2  # a connection's first call is routed
        (hooks / "hold-after-send").touch()
        assert client.sleep(0.01, "slept") == "slept"  # lent with its socket; a call that takes a while
        held = wait_for(lambda: sorted(hooks.glob("held-*")), timeout=30)
        assert held, "the lent handler never reached the hook"
        pid = int(held[0].name.split("-", 1)[1])
        future = client.submit("pid")  # on the socket before that handler looks at it again
        (hooks / "hold-after-send").unlink()
        assert future.result(30) == pid  # served by the same handler, on the socket it was lent
    # Both calls ran on the lent socket: the one lent with it, and the next, read from it.
    assert sorted(path.read_text() for path in hooks.glob("lent-*")) == [str(pid)] * 2


def test_a_crash_on_a_lent_socket_fails_that_call_and_the_socket_is_reused(rpc_server):
    server = rpc_server("services:registry", workers=2)
    with server.client(timeout=30) as client:
        assert client.add(1, 1) == 2  # the socket is lent now
        with pytest.raises(rpc.WorkerCrashed):
            client.crash("kill")
        assert [client.add(i, i) for i in range(10)] == [2 * i for i in range(10)]
    assert wait_for(lambda: len(server.handler_pids()) == 2)


def test_a_timeout_on_a_lent_socket_answers_at_the_deadline(rpc_server):
    server = rpc_server("services:registry", workers=2)
    with server.client() as client:
        assert client.add(1, 1) == 2
        started = time.monotonic()
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 10, timeout=0.3)
        assert time.monotonic() - started < 10  # a hang check: the deadline is 0.3 s
        assert client.add(2, 2) == 4


def test_a_socket_that_cannot_be_handed_over_ends_the_lease_and_the_call_is_answered(rpc_server, monkeypatch):
    """The lending message failed: the handler is stopped, and the router runs the call itself."""
    from rpc import lease

    server = rpc_server("services:registry", workers=2)
    failures = []
    send_lease = lease.send_lease

    def send_lease_failing_once(pipe_fd, frame, client_fd):
        if not failures:
            failures.append(frame)
            raise OSError("injected: the descriptor could not be sent")
        return send_lease(pipe_fd, frame, client_fd)

    monkeypatch.setattr(lease, "send_lease", send_lease_failing_once)
    with server.client(timeout=30) as client:
        assert [client.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]  # the second call is lent
        assert wait_for(lambda: "handler_replaced" in server.log_text() and len(server.handler_pids()) == 2)
        assert [client.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]  # and lent again, for real
    assert failures, "no socket was lent"
    assert "lease_failed" in server.log_text() and "Traceback" not in server.log_text()


def test_a_socket_with_part_of_a_reply_unsent_is_not_lent(rpc_server):
    """A reply still being written when the next request comes: lending the socket then would
    let the handler's reply land inside it (a pipelining client on a slow link read garbage)."""
    from rpc import protocol
    from helpers import raw_connection

    server = rpc_server("services:registry", workers=2, access_log=True)
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(2, "big", (8 << 20,), {}, None))  # a first call: never lent
        assert conn.poll(30)  # the 8 MiB reply is on its way, most of it unsent
        for request_id in range(3, 8):  # one at a time, as a lent socket's client would
            conn.send_bytes(protocol.encode_request(request_id, "add", (request_id, 1), {}, None))
            assert wait_for(lambda: f"id={request_id} " in server.log_text(), timeout=30)  # answered
        replies = [protocol.decode_response(conn.recv_bytes(16 << 20)) for _ in range(6)]
    finally:
        conn.close()
    by_id = {r.id: r.result for r in replies}  # whole frames, each with its own answer, in any order
    assert sorted(by_id) == [2, 3, 4, 5, 6, 7]
    assert by_id[2] == b"x" * (8 << 20)
    assert [by_id[i] for i in range(3, 8)] == [4, 5, 6, 7, 8]


def test_call_state_keeps_every_request_id_exactly():
    """Ids travel through the shared call state as 64-bit integers: 2**60 + 1 stays itself."""
    import multiprocessing

    from rpc import lease

    state = lease.CallState(multiprocessing.get_context("spawn").RawArray("q", lease.CallState.SIZE))
    for request_id in (0, 1, 2**53 + 1, 2**60 + 1, 2**63 - 1, 2**63, 2**64 - 1):
        state.running(request_id, 12345.678)
        what, deadline, got, _ = state.read()
        assert (what, got) == (lease.CallState.RUNNING, request_id)
        assert deadline is not None and abs(deadline - 12345.678) < 1e-6



def test_a_reload_asks_a_lent_socket_back(rpc_server, tmp_path):
    """A lease ends only when its client pauses: a client that never does would stall a reload."""
    server = rpc_server("services:registry", workers=2, log_level="debug")
    client = server.client(timeout=30)
    assert client.add(1, 1) == 2  # a connection's first call is never lent; the next ones are
    gate = Gate(tmp_path)
    held = threading.Thread(target=client.hold, args=gate.args())
    held.start()
    gate.wait_started()  # running on the lent socket: both handlers were idle
    reloaded = []
    reloader = threading.Thread(target=lambda: reloaded.append(server.server.reload()))
    reloader.start()
    try:
        assert log_has(server, "why=reload")  # asked back while its call runs, not waited out
    finally:
        gate.open()
        held.join(30)
        reloader.join(60)
    assert reloaded == [True]
    assert [client.add(i, 1) for i in range(10)] == [i + 1 for i in range(10)]
