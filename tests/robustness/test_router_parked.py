"""Replies parked for a slow reader, with the handler that made them; on both event loops.

Once a connection's unsent replies pass twice ``max_outbox_bytes``, the router
keeps its next reply in ``ClientConnection.parked`` together with the slot whose
handler made it, and gives that handler no new call until the client drains
(``Router.unpark``) or goes away (``Router.forget``). These tests kill that
handler, trickle the reads, reload, close and let idle timers run meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import settled_baseline, still_serves
from helpers import Gate, framed, log_has, raw_connection, request, router_state, wait_for, write
from rpc import protocol


def parked_replies(test_server) -> int:
    return router_state(test_server, lambda router: sum(len(c.parked) for c in list(router.connections)))


def park_a_reply(test_server, conn, size: int = 1 << 20) -> None:
    """Make ``conn`` a slow reader with one reply parked in its handler: a large reply fills its
    outbox past twice max_outbox_bytes (64 KiB here), and a small one behind it must wait."""
    write(conn, request(1, "big", size) + request(2, "add", 1, 2))
    assert wait_for(lambda: parked_replies(test_server) == 1, timeout=30), "no reply was parked"


def answers(conn, count: int, timeout: float = 10.0) -> dict[int, list]:
    """The next ``count`` responses on ``conn``, as id -> [result or error code, ...]."""
    found: dict[int, list] = {}
    for _ in range(count):
        assert conn.poll(timeout), f"only {sum(map(len, found.values()))} of {count} answers came: {found}"
        response = protocol.decode_response(conn.recv_bytes())
        found.setdefault(response.id, []).append(response.error.code if response.error else response.result)
    return found


def drain(conn, count: int, timeout: float = 30.0) -> list[int | None]:
    """Read ``count`` responses (large ones included); their ids."""
    ids = []
    for _ in range(count):
        assert conn.poll(timeout), f"{len(ids)} of {count} answers came"
        ids.append(protocol.decode_response(conn.recv_bytes()).id)
    return ids


def test_a_handler_killed_while_its_reply_is_parked_leaves_every_later_reply_with_its_own_caller(
    rpc_server, loop_name, tmp_path
):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_outbox_bytes=65536, send_timeout=60.0)
    slow = raw_connection(server)
    park_a_reply(server, slow)
    [old] = server.handler_pids()
    os.kill(old, signal.SIGKILL)  # the handler holding the parked reply
    assert wait_for(lambda: server.handler_pids() not in ([], [old]), timeout=30)
    gate = Gate(tmp_path)
    other = raw_connection(server)
    other.send_bytes(protocol.encode_request(7777, "hold", gate.args(), {}, None))  # runs on the new handler
    gate.wait_started()
    # The slow client reads at last: the parked reply goes out (or an error for it: its handler died).
    assert drain(slow, 2) == [1, 2]
    third = raw_connection(server)
    third.send_bytes(protocol.encode_request(1, "add", (2, 3), {}, None))
    gate.open()
    try:
        assert answers(third, 1) == {1: [5]}  # not the reply to id 7777 of another connection
        assert answers(other, 1) == {7777: [None]}
    finally:
        gate.open()
        for conn in (slow, other, third):
            conn.close()
        server.server.close(grace=1.0)  # (a call left unanswered would hold close() for its whole grace)


def test_a_client_trickling_its_reads_holds_the_only_handler_no_longer_than_send_timeout(rpc_server, loop_name):
    # A send_timeout long enough that the trickle surely makes progress within each one, even on a busy machine.
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_outbox_bytes=65536, send_timeout=2.0)
    slow = raw_connection(server)
    park_a_reply(server, slow, size=16 << 20)  # about 12 s of trickle
    stop = threading.Event()

    def trickle() -> None:
        sock = socket.socket(fileno=slow.fileno())
        sock.settimeout(1.0)
        try:
            while not stop.is_set():
                if not sock.recv(64 << 10):
                    return
                time.sleep(0.05)  # the attacker's pace (about 1.3 MB/s), not a synchronisation
        except OSError:
            return
        finally:
            sock.detach()

    reader = threading.Thread(target=trickle)
    reader.start()
    try:
        with server.client(timeout=6.0) as victim:  # three times send_timeout
            assert victim.add(2, 3) == 5
    finally:
        stop.set()
        reader.join(10)
        slow.close()


def test_a_client_that_stops_reading_holds_the_only_handler_about_send_timeout_at_most(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_outbox_bytes=65536, send_timeout=1.0)
    baseline = settled_baseline(server)
    slow = raw_connection(server)
    park_a_reply(server, slow, size=8 << 20)
    try:
        with server.client(timeout=10.0) as victim:
            assert victim.add(2, 3) == 5
        assert log_has(server, "stopped reading its replies", timeout=10)
    finally:
        slow.close()
    assert parked_replies(server) == 0
    still_serves(server)
    baseline.assert_restored()


def test_reload_with_a_reply_parked_and_calls_queued_fails_no_call(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_outbox_bytes=65536, send_timeout=60.0)
    slow = raw_connection(server)
    park_a_reply(server, slow)
    [old] = server.handler_pids()
    outcome: list[bool] = []
    reloader = threading.Thread(target=lambda: outcome.append(server.server.reload()))
    reloader.start()
    assert wait_for(lambda: router_state(server, lambda router: 0 in router.table.retiring), timeout=30)
    queued = raw_connection(server)
    write(queued, b"".join(request(i, "add", i, 1) for i in range(5)))
    assert wait_for(lambda: router_state(server, lambda router: len(router.table.queue)) == 5, timeout=10)
    assert drain(slow, 2) == [1, 2]  # the slow client drains: the old handler may go
    reloader.join(60)
    assert outcome == [True]
    assert answers(queued, 5) == {i: [i + 1] for i in range(5)}
    assert server.handler_pids() not in ([], [old])
    for conn in (slow, queued):
        conn.close()
    still_serves(server)


def test_idle_timeout_spares_connections_with_a_call_running_queued_or_parked(rpc_server, loop_name, tmp_path):
    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, idle_timeout=0.5, max_outbox_bytes=65536, send_timeout=60.0
    )
    gate = Gate(tmp_path)
    running = raw_connection(server)
    running.send_bytes(protocol.encode_request(1, "hold", gate.args(), {}, None))
    gate.wait_started()
    slow = raw_connection(server)
    park_a_reply(server, slow)  # holds the other handler
    queued = raw_connection(server)
    queued.send_bytes(protocol.encode_request(3, "add", (1, 2), {}, None))
    assert wait_for(lambda: router_state(server, lambda router: len(router.table.queue)) == 1, timeout=10)
    # A connection opened after all three, with nothing to do: once it is dropped as idle,
    # each of the three has had at least one idle check while busy.
    idle = raw_connection(server)
    try:
        assert log_has(server, "idle for longer than idle_timeout", timeout=10)
        assert idle.poll(10) and not _alive(idle)
        assert server.log_text().count("idle for longer than idle_timeout") == 1
        gate.open()
        assert answers(running, 1) == {1: [None]}
        assert drain(slow, 2) == [1, 2]
        assert answers(queued, 1) == {3: [3]}
    finally:
        gate.open()
        for conn in (running, slow, queued, idle):
            conn.close()
    still_serves(server)


def _alive(conn) -> bool:
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        return False
    return True


def test_close_delivers_the_parked_replies_of_a_client_reading_within_the_grace_period(rpc_server, loop_name):
    server = rpc_server(
        "services:registry", workers=1, event_loop=loop_name, max_outbox_bytes=65536, send_timeout=60.0, shutdown_grace=30.0
    )
    slow = raw_connection(server)
    park_a_reply(server, slow)
    closer = threading.Thread(target=server.server.close)
    closer.start()
    try:
        assert log_has(server, "shutdown_begun", timeout=10)
        received = []
        try:
            for _ in range(2):
                received.append(protocol.decode_response(slow.recv_bytes()).id)
        except (EOFError, OSError):
            pass
        assert received == [1, 2], "the replies of calls that ran were cut off by close()"
    finally:
        closer.join(60)
        slow.close()
