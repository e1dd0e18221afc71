"""Bad clients and failing functions: the caller gets a clear error, others keep being served."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client as RawClient
from pathlib import Path

import pytest

import rpc
from helpers import Gate, child_pids, log_has, queued_calls, sigint_as_by_default, wait_for
from rpc import protocol
from rpc.testing import serve


@pytest.fixture(scope="module")
def server(rpc_server_module):
    return rpc_server_module("services:registry", workers=2, handshake_timeout=1.0, transport="tcp")


def test_wrong_authkey_is_refused_and_others_are_served(server):
    with pytest.raises(rpc.AuthenticationError):
        rpc.connect(server.address, authkey=b"wrong key")
    with server.client() as client:
        assert client.add(1, 2) == 3


def test_missing_authkey_against_a_keyed_server_is_an_authentication_error(server):
    with pytest.raises(rpc.AuthenticationError, match="requires an authkey"):
        rpc.connect(server.address)
    with server.client() as client:
        assert client.add(1, 2) == 3


def test_an_authkey_against_a_keyless_server_is_refused():
    """A client with a key will not talk to a server that cannot prove it has it."""
    with rpc.Server("services:registry", address=("127.0.0.1", 0), workers=1) as server:
        with pytest.raises(rpc.AuthenticationError, match="without one"):
            rpc.connect(server.address, authkey=b"k")
        with rpc.connect(server.address) as client:
            assert client.add(1, 2) == 3


def test_a_silent_client_delays_nobody_and_is_dropped_at_the_handshake_deadline(rpc_server):
    running = rpc_server("services:registry", workers=2, handshake_timeout=3.0, transport="tcp")
    started = time.monotonic()  # before connecting: the server's deadline counts from its accept, later
    silent = socket.create_connection(running.address)
    try:
        with running.client() as client:
            assert client.add(1, 2) == 3
        # Served while the silent client still held its place: it is dropped only later.
        assert "handshake timed out" not in running.log_text()
        silent.settimeout(30)
        data = silent.recv(1024)  # the server's challenge
        assert data[4:].startswith(b"#CHALLENGE#")
        assert silent.recv(1024) == b""  # then EOF: dropped at the deadline
        assert time.monotonic() - started >= 2.9  # not before it
        assert log_has(running, "handshake timed out")
    finally:
        silent.close()


def _authenticated_raw(server):
    """A raw multiprocessing connection past the handshake and hello exchange."""
    conn = RawClient(server.address, authkey=server.authkey)
    protocol.decode_hello(conn.recv_bytes())
    conn.send_bytes(protocol.encode_hello({}))
    return conn


def test_a_frame_over_max_message_bytes_is_refused_and_the_server_keeps_serving(rpc_server):
    running = rpc_server("services:registry", workers=1, max_message_bytes=10_000)
    with running.client() as client:
        # the client knows the server's limit and refuses before sending
        with pytest.raises(rpc.MessageTooLarge):
            client.echo(b"x" * 20_000)
        assert client.add(1, 2) == 3
    raw = _authenticated_raw(running)
    raw.send_bytes(protocol.encode_request(1, "echo", (b"x" * 20_000,), {}, None))
    response = protocol.decode_response(raw.recv_bytes())
    assert response.id is None and response.error.code == "message_too_large"
    with pytest.raises(EOFError):
        raw.recv_bytes()
    raw.close()
    with running.client() as client:
        assert client.add(1, 2) == 3


@pytest.mark.parametrize("length", [2**31 - 1, 2**62])
def test_huge_length_headers_close_the_connection_without_allocating(server, length):
    raw = _authenticated_raw(server)
    header = struct.pack("!i", length) if length < 2**31 else struct.pack("!iQ", -1, length)
    sock = socket.socket(fileno=raw.fileno())
    try:
        sock.sendall(header)
    finally:
        sock.detach()
    response = protocol.decode_response(raw.recv_bytes())
    assert response.error.code == "message_too_large"
    raw.close()
    with server.client() as client:
        assert client.add(1, 2) == 3


def test_garbage_with_a_readable_id_gets_an_error_reply_on_a_usable_connection(server):
    raw = _authenticated_raw(server)
    raw.send_bytes(protocol.encode_value([0, 42, b"not a str", [], {}, {}]))
    response = protocol.decode_response(raw.recv_bytes())
    assert response.id == 42 and response.error.code == "protocol_error"
    raw.send_bytes(protocol.encode_request(43, "add", (1, 2), {}, None))
    assert protocol.decode_response(raw.recv_bytes()) == protocol.Response(43, None, 3)
    raw.send_bytes(b"\xc1 not msgpack")
    response = protocol.decode_response(raw.recv_bytes())
    assert response.id is None and response.error.code == "protocol_error"
    with pytest.raises(EOFError):
        raw.recv_bytes()
    raw.close()


@pytest.mark.parametrize("how", ["exit", "exit0", "kill", "segfault"])
def test_a_handler_dying_mid_call_fails_that_call_only(rpc_server, how):
    running = rpc_server("services:registry", workers=2)
    with running.client(timeout=30) as client:
        before = set(running.handler_pids())
        with pytest.raises(rpc.WorkerCrashed):
            client.crash(how)
        assert client.add(1, 2) == 3
        assert wait_for(lambda: len(running.handler_pids()) == 2 and set(running.handler_pids()) != before)


def test_a_handler_exiting_with_code_0_unasked_is_said_to_have(rpc_server):
    """Only the supervisor ends a handler cleanly (by ending its pipe): a code 0 otherwise says so."""
    running = rpc_server("services:registry", workers=1)
    with running.client(timeout=30) as client:
        with pytest.raises(rpc.WorkerCrashed, match="exited with code 0 without being asked to"):
            client.crash("exit0")
        assert client.add(1, 2) == 3
    assert "exited with code 0 without being asked to" in running.log_text()


def test_other_calls_survive_a_crash_on_another_handler(rpc_server, tmp_path):
    running = rpc_server("services:registry", workers=2)
    slow_client, crash_client = running.client(timeout=30), running.client(timeout=30)
    result = {}
    gate = Gate(tmp_path)
    slow = threading.Thread(target=lambda: result.setdefault("v", slow_client.hold(*gate.args(), "done")))
    slow.start()
    gate.wait_started()
    with pytest.raises(rpc.WorkerCrashed):
        crash_client.crash("exit")
    gate.open()
    slow.join(30)
    assert result == {"v": "done"}


def test_a_call_past_its_timeout_fails_and_its_handler_is_replaced(rpc_server):
    running = rpc_server("services:registry", workers=1)
    with running.client() as client:
        (old,) = running.handler_pids()
        started = time.monotonic()
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 30, timeout=0.3)
        assert time.monotonic() - started < 10  # a hang check: the deadline is 0.3 s
        assert client.call("add", 1, 2, timeout=30) == 3  # the next call succeeds
        assert old not in running.handler_pids()


def test_the_server_enforces_max_call_seconds(rpc_server):
    running = rpc_server("services:registry", workers=1, max_call_seconds=1.0)
    with running.client() as client:
        with pytest.raises(rpc.CallTimeout):
            client.sleep(30)
        # The next call waits for the replacement handler; under load its start could take
        # longer than the limit (which counts from the call's arrival), so wait for it first.
        assert wait_for(lambda: running.log_text().count("handler_started") >= 2, timeout=60)
        assert client.add(1, 2) == 3


def test_handlers_run_calls_concurrently(rpc_server, tmp_path):
    """2 handlers, 2 clients, 0.5 s each: the recorded executions overlap."""
    running = rpc_server("services:registry", workers=2)
    clients = [running.client(timeout=30) for _ in range(2)]
    threads = [threading.Thread(target=c.record, args=(str(tmp_path), 0.5)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spans = [tuple(map(float, p.read_text().split())) for p in tmp_path.iterdir()]
    assert len(spans) == 2
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end  # the two executions overlapped


def test_a_full_queue_answers_server_busy_at_once(rpc_server, tmp_path):
    running = rpc_server("services:registry", workers=1, max_pending=1)
    first, second, third = (running.client(timeout=30) for _ in range(3))
    gate = Gate(tmp_path)
    running_call = threading.Thread(target=first.hold, args=gate.args())
    running_call.start()
    gate.wait_started()
    queued = threading.Thread(target=second.sleep, args=(0.0,))
    queued.start()
    assert wait_for(lambda: queued_calls(running) == 1)
    with pytest.raises(rpc.ServerBusy):
        third.add(1, 2)  # at once: the running call has not been let go
    assert running_call.is_alive()  # refused while the only handler was still busy
    gate.open()
    running_call.join(30)
    queued.join(30)
    assert third.add(1, 2) == 3  # service recovers when load drops


def test_calls_fail_with_connection_closed_when_the_server_goes_away(rpc_server, tmp_path):
    running = rpc_server("services:registry", workers=1)
    client = running.client(connect_timeout=1)  # (the last call tries to reconnect for this long)
    result = {}
    gate = Gate(tmp_path)  # never opened: the call is cut off

    def call() -> None:
        try:
            client.hold(*gate.args())
        except rpc.RPCError as exc:
            result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    gate.wait_started()
    running.server.close(grace=0.1)
    thread.join(10)
    assert isinstance(result["error"], (rpc.ConnectionClosed, rpc.WorkerCrashed, rpc.ServerShuttingDown))
    with pytest.raises(rpc.ConnectionClosed):
        client.add(1, 2)


def test_close_lets_calls_in_flight_finish_and_leaves_no_child_process(rpc_server, tmp_path):
    before = child_pids()
    running = rpc_server("services:registry", workers=2)
    assert set(running.handler_pids()) <= child_pids()
    client = running.client(timeout=30)
    result = {}
    gate = Gate(tmp_path)
    thread = threading.Thread(target=lambda: result.setdefault("v", client.hold(*gate.args(), "finished")))
    thread.start()
    gate.wait_started()
    closing = threading.Thread(target=running.server.close)
    closing.start()
    assert log_has(running, "shutdown_begun")
    gate.open()  # the call finishes while the server is closing
    closing.join(30)
    thread.join(30)
    assert result == {"v": "finished"}
    assert child_pids() <= before
    assert not child_pids() - before


def test_the_unix_socket_file_is_removed_on_close(rpc_server):
    running = rpc_server("services:registry", workers=1, transport="unix")
    path = running.address
    assert os.path.exists(path)
    running.close()
    assert not os.path.exists(path)


def test_a_live_unix_socket_is_not_stolen_and_a_stale_one_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    with rpc.Server("services:registry", address=path, workers=1):
        with pytest.raises(rpc.StartupError, match="another server"):
            rpc.Server("services:registry", address=path, workers=1).start()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with rpc.Server("services:registry", address=path, workers=1) as server:
        with rpc.connect(server.address) as client:
            assert client.add(1, 2) == 3


def test_a_registry_that_cannot_be_imported_fails_start_with_the_reason():
    before = child_pids()
    with pytest.raises(rpc.StartupError, match="not an rpc.Registry"):
        with serve("services:broken", workers=2):
            pass
    assert not child_pids() - before


def test_sigterm_to_a_handler_is_reported_as_a_crash(rpc_server, tmp_path):
    running = rpc_server("services:registry", workers=1)
    client = running.client(timeout=30)
    (pid,) = running.handler_pids()
    thread_result = {}
    gate = Gate(tmp_path)

    def call() -> None:
        try:
            client.hold(*gate.args())
        except rpc.RPCError as exc:
            thread_result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    gate.wait_started()
    os.kill(pid, signal.SIGTERM)
    thread.join(10)
    assert isinstance(thread_result["error"], rpc.WorkerCrashed)
    assert "SIGTERM" in str(thread_result["error"])
    assert client.add(1, 2) == 3


def test_close_waits_until_answers_are_sent_not_just_computed(rpc_server, tmp_path):
    """Calls finishing right as close() begins all get their answers."""
    running = rpc_server("services:registry", workers=2)
    clients = [running.client(timeout=30) for _ in range(2)]
    results, errors = [], []
    gates = [Gate(tmp_path, f"call{i}") for i in range(2)]

    def call(client, gate) -> None:
        try:
            results.append(client.hold(*gate.args(), "done"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=pair) for pair in zip(clients, gates)]
    for t in threads:
        t.start()
    for gate in gates:
        gate.wait_started()
    closing = threading.Thread(target=running.server.close)
    closing.start()
    assert log_has(running, "shutdown_begun")
    for gate in gates:
        gate.open()
    closing.join(30)
    for t in threads:
        t.join(30)
    assert errors == [] and results == ["done", "done"]


def test_a_client_leaving_with_queued_calls_does_not_hold_up_close(rpc_server, tmp_path):
    running = rpc_server("services:registry", workers=1)
    busy = running.client(timeout=30)
    gate = Gate(tmp_path)
    blocker = threading.Thread(target=busy.hold, args=gate.args())
    blocker.start()
    gate.wait_started()
    leaving = running.client()
    threads = [threading.Thread(target=lambda: _ignore(leaving.sleep, 0.1)) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_for(lambda: queued_calls(running) == 3)
    leaving.close()  # its three queued calls are dropped with the connection
    assert wait_for(lambda: queued_calls(running) == 0)
    gate.open()
    blocker.join(30)
    running.server.close()
    # Nothing left to wait for: close did not sit out its grace period for the dropped calls.
    assert "unfinished_calls=0" in running.log_text()


def _ignore(function, *args):
    try:
        function(*args)
    except rpc.RPCError:
        pass


SERVE_FOREVER = r"""
import signal, sys, tempfile, threading, os
import rpc

def interrupt_from_another_thread(server):
    server._started_event.wait()
    other = next(t for t in threading.enumerate() if t.name == "rpc-router")
    signal.pthread_kill(other.ident, signal.SIGINT)  # the kernel may pick any thread; pick one

if __name__ == "__main__":
    folder = tempfile.mkdtemp()
    server = rpc.Server("services:registry", address=os.path.join(folder, "s.sock"), workers=1, log_level="warning")
    server._started_event = threading.Event()
    threading.Thread(target=interrupt_from_another_thread, args=(server,), daemon=True).start()
    server.start()
    server._started_event.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    server.close()
    print("closed", flush=True)
"""


def test_ctrl_c_stops_serve_forever_whichever_thread_the_signal_reaches(tmp_path):
    """SIGINT handled by one of the server's threads must still interrupt serve_forever in the main one."""
    script = tmp_path / "serve.py"
    script.write_text(SERVE_FOREVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, preexec_fn=sigint_as_by_default
    )
    assert result.stdout.split() == ["interrupted", "closed"], result.stderr[-3000:]
