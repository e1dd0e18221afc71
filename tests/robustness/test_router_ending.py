"""Connections the router ends: after a protocol error, for not reading, at close(); on both event loops.

After a frame it cannot answer by id, the router sends an error, half-closes the
connection (``write_eof``) and discards input for a second before closing it
(``ClientConnection._linger``). Calls of that connection may still be running or
queued then. And a connection is closed with ``transport.close()``, which first
waits for the peer to take every unsent byte.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading

import pytest

from conftest import Baseline, settled_baseline, still_serves
from helpers import Gate, framed, log_has, raw_connection, wait_for, write
from rpc import protocol

GARBAGE = struct.pack("!i", 1) + b"\xc1"  # a frame whose id cannot be read: the connection is ended
BIG_REPLY = 4 << 20  # more than the socket buffers hold, less than max_outbox_bytes (16 MiB)

LINGER_WRITE = (
    "ClientConnection.send writes to a transport that _linger half-closed with write_eof(): "
    "RuntimeError('Cannot call write() after write_eof()')"
)
CLOSE_WAITS_FOR_FLUSH = (
    "ClientConnection._end closes with transport.close(), which waits until the peer has read every "
    "unsent byte; no timer is left to abort it"
)


def read_until_eof(conn, timeout: float) -> bool:
    """Read and drop what comes until the server closes; False if it did not within ``timeout``."""
    sock = socket.socket(fileno=conn.fileno())
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.detach()


def nil_id_error(conn) -> str:
    response = protocol.decode_response(conn.recv_bytes())
    assert response.id is None
    return response.error.code


def test_a_deadline_passing_while_the_connection_closes_after_an_error_still_stops_the_handler(
    rpc_server, loop_name, tmp_path
):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    before = server.handler_pids()
    conn = raw_connection(server)
    try:
        # In one write: a call that is past its deadline at once, then a frame the server cannot answer.
        # The deadline is a loop timer due within 50 ms, well before the second the connection lingers.
        call = protocol.encode_request(1, "hold", gate.args(), {}, 0)
        write(conn, framed(call) + GARBAGE)
        assert nil_id_error(conn) == "protocol_error"
        # The call passed its deadline: its handler must be stopped and replaced.
        assert wait_for(lambda: server.handler_pids() not in ([], before), timeout=5), server.log_text()
        assert "housekeeping_failed" not in server.log_text()
    finally:
        gate.open()
        conn.close()
    still_serves(server)


def test_a_handler_crashing_while_the_connection_closes_after_an_error_is_replaced(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    before = server.handler_pids()
    conn = raw_connection(server)
    try:
        # In one write: a call whose handler dies at once, then a frame the server cannot answer,
        # so the crash is reported while the connection lingers (a second, against milliseconds).
        write(conn, framed(protocol.encode_request(1, "crash", ("exit",), {}, None)) + GARBAGE)
        assert nil_id_error(conn) == "protocol_error"
        assert wait_for(lambda: server.handler_pids() not in ([], before), timeout=5), "no handler was started again"
    finally:
        conn.close()
    still_serves(server)


def test_a_reply_arriving_while_the_connection_closes_after_an_error_costs_no_handler(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, access_log=True)
    gate = Gate(tmp_path)
    before = server.handler_pids()
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(1, "hold", gate.args(), {}, None))
        gate.wait_started()
        write(conn, GARBAGE)
        assert nil_id_error(conn) == "protocol_error"  # the connection now lingers for a second
        gate.open()  # the reply comes back within that second
        assert wait_for(lambda: "router_error" in server.log_text() or "method=hold" in server.log_text(), 10)
        assert "router_error" not in server.log_text()
        assert server.handler_pids() == before
    finally:
        gate.open()
        conn.close()
    still_serves(server)


def test_close_while_a_connection_with_a_queued_call_closes_after_an_error(rpc_server, loop_name, tmp_path):
    # What a first server leaves for the life of the process (the shared-memory arena of the
    # handlers' call states, multiprocessing's resource tracker) is not this test's business.
    rpc_server("services:registry", workers=1, event_loop=loop_name).server.close()
    baseline = Baseline()
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    handlers = server.handler_pids()
    holder = server.client(timeout=30)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    conn = raw_connection(server)
    opener = threading.Thread(target=lambda: log_has(server, "shutdown_begun", 30) and gate.open())
    opener.start()
    try:
        write(conn, framed(protocol.encode_request(1, "add", (1, 2), {}, None)) + GARBAGE)  # queued behind `running`
        assert nil_id_error(conn) == "protocol_error"
        server.server.close(grace=30)  # within the second the connection lingers
        assert running.result(10) is None
    finally:
        gate.open()
        opener.join(30)
        conn.close()
        holder.close()
        if not server.server._closed.is_set():  # close() raised: stop what it left running
            for pid in handlers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            server.server._closed.set()
    baseline.assert_restored()


def test_a_client_that_stops_reading_under_max_outbox_bytes_is_really_dropped(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, send_timeout=1.0, idle_timeout=1.0)
    baseline = settled_baseline(server)
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(1, "big", (BIG_REPLY,), {}, None))  # never read
        # "client_dropped" is logged once the connection is gone (connection_lost).
        assert wait_for(lambda: "stopped reading its replies" in server.log_text(), timeout=6), (
            "neither send_timeout nor idle_timeout ended it"
        )
    finally:
        conn.close()
    still_serves(server)
    baseline.assert_restored()


def test_a_connection_ended_after_an_error_is_released_even_if_its_peer_never_reads(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, send_timeout=1.0, idle_timeout=1.0)
    baseline = settled_baseline(server)
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(1, "big", (BIG_REPLY,), {}, None))
        assert conn.poll(30)  # the reply is being sent; the rest of it waits in the server
        write(conn, GARBAGE)  # then read nothing more
        assert wait_for(lambda: "client_dropped" in server.log_text(), timeout=6), "the connection was never released"
    finally:
        conn.close()
    still_serves(server)
    baseline.assert_restored()


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_close_disconnects_a_client_that_is_not_reading(rpc_server, loop_name):
    baseline = Baseline()
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(1, "big", (BIG_REPLY,), {}, None))
        assert conn.poll(30)  # the reply is being sent when the server closes
        server.server.close(grace=1.0)
        assert read_until_eof(conn, timeout=6), "the server's end of the connection was left open"
    finally:
        conn.close()
    baseline.assert_restored()


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_close_disconnects_clients_that_connected_just_before_it(rpc_server, loop_name):
    baseline = Baseline()
    # A race by nature: three rounds of 32 connections, each a fresh server. (Against the asyncio
    # loop, every round of 20 tried left some of the 32 connected.)
    for _ in range(3):
        server = rpc_server("services:registry", workers=1, event_loop=loop_name, handshake_timeout=60.0)
        peers = []
        for _ in range(32):
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(server.address)
            peers.append(peer)
        server.server.close()
        for peer in peers:
            peer.settimeout(5)
            try:
                while peer.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass
            except socket.timeout:
                pytest.fail("a client that connected just before close() was left connected")
            finally:
                peer.close()
    baseline.assert_restored()
