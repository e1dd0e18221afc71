"""The go-away a draining server sends, read frame by frame on raw connections.

What the wire promises (rpc.protocol, "Go-away"): the message goes to a client that asked for
it in its hello, and to no other; it names the highest request id read; a request read after
it never runs and is answered server_shutting_down; calls running finish as usual; a
draining server refuses new connections.
"""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Client as RawClient

import pytest

from helpers import Gate, framed, request, wait_for, write
from rpc import protocol

HANG = 30.0


def connect(server, go_away: bool):
    """An authenticated raw connection past the hellos; its hello asks for a go-away or not."""
    conn = RawClient(server.address, authkey=server.authkey)
    protocol.decode_hello(conn.recv_bytes())
    conn.send_bytes(protocol.encode_hello({"go_away": True} if go_away else {}))
    return conn


def frames(conn, until):
    """Decode what the server sends until ``until(message)`` is true of one (or the end)."""
    received = []
    while conn.poll(HANG):
        try:
            message = protocol.decode_answer(conn.recv_bytes())
        except (EOFError, OSError):
            break
        received.append(message)
        if until(message):
            break
    return received


def closing(server) -> threading.Thread:
    closer = threading.Thread(target=server.server.close, kwargs={"grace": HANG})
    closer.start()
    assert wait_for(lambda: server.server._router.closing, timeout=HANG)
    return closer


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_client_that_asks_is_told_which_requests_were_read_and_later_ones_never_run(rpc_server, tmp_path, transport):
    server = rpc_server("services:registry", workers=1, lease=False, transport=transport)
    gate = Gate(tmp_path)
    conn = connect(server, go_away=True)
    write(conn, framed(protocol.encode_request(7, "hold", gate.args(), {"value": "held"}, None)))
    gate.wait_started()
    write(conn, request(8, "add", 1, 2))  # queued behind the held call
    assert wait_for(lambda: len(server.server._router.table.queue) == 1, timeout=HANG)
    closer = closing(server)
    try:
        before = frames(conn, lambda m: isinstance(m, protocol.GoAway))
        assert [(m.id, m.error.code) for m in before if isinstance(m, protocol.Response)] == [(8, "server_shutting_down")]
        assert before[-1] == protocol.GoAway(8, "the server is shutting down")
        # Read after the go-away: never run, whatever the method.
        marker = tmp_path / "ran"
        write(conn, request(9, "add", 1, 2) + request(10, "touch", str(marker)))
        after = frames(conn, lambda m: getattr(m, "id", None) == 10)
        assert [(m.id, m.error.code) for m in after] == [(9, "server_shutting_down"), (10, "server_shutting_down")]
        gate.open()  # the call running before the go-away is answered as usual
        [held] = frames(conn, lambda m: True)
        assert (held.id, held.error, held.result) == (7, None, "held")
        assert frames(conn, lambda m: False) == []  # then the drain ends, and the connection with it
        assert not marker.exists()
    finally:
        gate.open()
        closer.join(HANG)
        conn.close()


def test_a_go_away_with_nothing_read_names_no_request(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1)
    gate = Gate(tmp_path)
    holder = server.client(timeout=HANG)
    held = holder.submit("hold", *gate.args())
    gate.wait_started()  # keeps the server draining
    conn = connect(server, go_away=True)
    closer = closing(server)
    try:
        assert frames(conn, lambda m: isinstance(m, protocol.GoAway)) == [protocol.GoAway(None, "the server is shutting down")]
    finally:
        gate.open()
        held.result(HANG)
        closer.join(HANG)
        conn.close()


def test_a_client_that_does_not_ask_gets_no_go_away(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, lease=False)
    gate = Gate(tmp_path)
    conn = connect(server, go_away=False)
    write(conn, framed(protocol.encode_request(1, "hold", gate.args(), {"value": "held"}, None)))
    gate.wait_started()
    closer = closing(server)
    try:
        write(conn, request(2, "add", 1, 2))
        answered = frames(conn, lambda m: getattr(m, "id", None) == 2)
        gate.open()
        answered += frames(conn, lambda m: False)
        assert [(m.id, m.error.code if m.error else m.result) for m in answered] == [(2, "server_shutting_down"), (1, "held")]
    finally:
        gate.open()
        closer.join(HANG)
        conn.close()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_draining_server_refuses_new_connections(rpc_server, tmp_path, transport):
    server = rpc_server("services:registry", workers=1, transport=transport)
    gate = Gate(tmp_path)
    holder = server.client(timeout=HANG)
    held = holder.submit("hold", *gate.args())
    gate.wait_started()
    closer = closing(server)
    try:
        family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(HANG)
            with pytest.raises(ConnectionRefusedError):
                probe.connect(server.address)
    finally:
        gate.open()
        held.result(HANG)
        closer.join(HANG)


def test_the_go_away_counts_the_requests_a_lent_handler_read(rpc_server, tmp_path):
    """Requests a handler read from a lent socket are the server's reading too: the go-away names
    the last of them, though the lease ended before the drain began."""
    from rpc import lease

    server = rpc_server("services:registry", workers=2)
    router = server.server._router

    def answered_in_lease() -> int:
        for slot in list(router.lent):
            return lease.CallState(router.arbiter.handlers[slot].call_state).read()[3]
        return 0

    conn = connect(server, go_away=True)
    served_by_handler = False
    for request_id in range(1, 400):  # calls one at a time: after the first, a handler serves the socket
        write(conn, request(request_id, "add", request_id, 1))
        [answer] = frames(conn, lambda m: True)
        assert (answer.id, answer.result) == (request_id, request_id + 1)
        if answered_in_lease() >= 2:  # it read a request from the socket itself, past the one it was lent with
            served_by_handler = True
            break
    assert served_by_handler, "no call was served on a lent socket"
    assert wait_for(lambda: not router.lent, timeout=HANG)  # the lease ends (idle) before the drain
    gate = Gate(tmp_path)
    holder = server.client(timeout=HANG)
    held = holder.submit("hold", *gate.args())
    gate.wait_started()  # keeps the server draining
    closer = closing(server)
    try:
        assert frames(conn, lambda m: isinstance(m, protocol.GoAway)) == [protocol.GoAway(request_id, "the server is shutting down")]
    finally:
        gate.open()
        held.result(HANG)
        closer.join(HANG)
        conn.close()
