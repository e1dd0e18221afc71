"""Cancel messages and disconnects stop calls: a queued call never runs, a running one's handler
is stopped and replaced; on both event loops, on routed and lent calls."""

from __future__ import annotations

import pytest

from helpers import Gate, framed, log_has, raw_connection, request, wait_for, write
from rpc import protocol



@pytest.fixture(params=["unix", "tcp"])
def transport(request) -> str:
    return request.param

def cancel(request_id: int) -> bytes:
    return framed(protocol.encode_cancel(request_id))


def answers(conn, count: int) -> dict[int, protocol.Response]:
    received = [protocol.decode_response(conn.recv_bytes()) for _ in range(count)]
    return {response.id: response for response in received}


def replaced(server, pid: int) -> bool:
    return bool(wait_for(lambda: pid not in server.handler_pids() and len(server.handler_pids()) >= 1, timeout=30))


def test_a_cancelled_queued_call_never_runs(rpc_server, transport, loop_name, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=1, event_loop=loop_name, lease=False)
    gate, marker = Gate(tmp_path), tmp_path / "ran"
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()) + request(2, "touch", str(marker)))
    gate.wait_started()
    write(conn, cancel(2))
    [response] = answers(conn, 1).values()
    assert response.id == 2 and response.error is not None and response.error.code == "call_cancelled"
    gate.open()
    write(conn, request(3, "add", 1, 2))  # queued behind where call 2 was: it ran after 2 would have
    replies = answers(conn, 2)
    assert replies[1].error is None and replies[3].result == 3
    assert not marker.exists()
    assert log_has(server, "call_cancelled")
    conn.close()


def test_a_cancelled_running_call_stops_its_handler_which_is_replaced(rpc_server, transport, loop_name, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()))
    gate.wait_started()
    [pid] = server.handler_pids()
    write(conn, cancel(1))
    [response] = answers(conn, 1).values()
    assert response.id == 1 and response.error.code == "call_cancelled"
    assert replaced(server, pid)
    write(conn, request(2, "add", 2, 2))
    assert answers(conn, 1)[2].result == 4
    assert log_has(server, "was cancelled by its caller")  # the handler's replacement says why
    conn.close()


def test_a_cancelled_call_on_a_lent_socket_stops_its_handler(rpc_server, transport, loop_name, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=2, event_loop=loop_name, access_log=True)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "add", 1, 1))  # a connection's first call is not lent; the next are
    assert answers(conn, 1)[1].result == 2
    write(conn, request(2, "hold", *gate.args()))
    gate.wait_started()
    write(conn, cancel(2))
    response = answers(conn, 1)[2]
    assert response.error.code == "call_cancelled"
    assert log_has(server, "leased=True")  # it was the lent handler that was stopped
    write(conn, request(3, "add", 3, 3))
    assert answers(conn, 1)[3].result == 6
    conn.close()


def test_a_client_that_goes_away_cancels_its_running_call(rpc_server, transport, loop_name, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "hold", *gate.args()))
    gate.wait_started()
    [pid] = server.handler_pids()
    conn.close()
    assert replaced(server, pid)  # never released: only the cancel stops it
    assert log_has(server, "by its client going away")


def test_a_client_that_goes_away_cancels_its_call_on_a_lent_socket(rpc_server, transport, loop_name, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=2, event_loop=loop_name)
    gate = Gate(tmp_path)
    conn = raw_connection(server)
    write(conn, request(1, "add", 1, 1))
    assert answers(conn, 1)[1].result == 2
    pids = set(server.handler_pids())
    write(conn, request(2, "hold", *gate.args()))
    gate.wait_started()
    conn.close()
    assert wait_for(lambda: len(set(server.handler_pids()) - pids) == 1, timeout=30)
    assert log_has(server, "by its client going away")


def test_a_cancel_for_a_call_already_answered_or_unknown_changes_nothing(rpc_server, transport, loop_name):
    server = rpc_server("services:registry", transport=transport, workers=1, event_loop=loop_name)
    conn = raw_connection(server)
    write(conn, request(1, "add", 1, 1))
    assert answers(conn, 1)[1].result == 2
    pids = server.handler_pids()
    write(conn, cancel(1) + cancel(99) + request(2, "add", 2, 2))
    assert answers(conn, 1)[2].result == 4  # the next answer is call 2's: nothing answered the cancels
    assert server.handler_pids() == pids
    assert "call_cancelled" not in server.log_text()
    conn.close()
