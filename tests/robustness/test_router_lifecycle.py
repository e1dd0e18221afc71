"""Close, reload, handler replacement and 5,000 connections, against the router; on both event loops."""

from __future__ import annotations

import hmac
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import rpc
from conftest import Baseline, settled_baseline, still_serves
from helpers import Gate, child_pids, framed, log_has, raw_connection, request, router_state, wait_for, write
from rpc import protocol

TESTS = str(Path(__file__).resolve().parents[1])


def test_close_answers_every_request_a_held_connection_sent(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_pending=4)  # share: one call
    gate = Gate(tmp_path)
    holder = server.client(timeout=30)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    greedy = raw_connection(server)
    write(greedy, b"".join(request(i, "add", i, 1) for i in range(10)))
    assert wait_for(lambda: router_state(server, lambda router: sum(c.held for c in list(router.connections))) == 1, 10)
    closer = threading.Thread(target=server.server.close, kwargs={"grace": 30})
    closer.start()
    answers: dict[int, list[str]] = {}
    try:
        while greedy.poll(30):
            response = protocol.decode_response(greedy.recv_bytes())
            answers.setdefault(response.id, []).append(response.error.code if response.error else response.result)
            gate.open()  # once close() has begun (the first answer is the queued call's)
    except (EOFError, OSError):
        pass
    finally:
        gate.open()
        closer.join(60)
        greedy.close()
        holder.close()
    assert running.result(10) is None
    assert answers == {i: ["server_shutting_down"] for i in range(10)}


def test_reload_returns_when_the_server_closes_meanwhile(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)
    holder = server.client(timeout=30)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    outcome: list[object] = []
    reloader = threading.Thread(target=lambda: outcome.append(server.server.reload()), daemon=True)
    reloader.start()
    assert wait_for(lambda: router_state(server, lambda router: 0 in router.table.retiring), timeout=30)
    gate.open()
    server.server.close(grace=10)
    assert running.result(10) is None
    holder.close()
    reloader.join(5)
    assert not reloader.is_alive(), "reload() is still waiting for a server that has closed"
    assert outcome == [False]



def test_a_handler_that_crashes_while_a_reload_waits_for_it_is_reported_as_crashed(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, lease=False)
    gate = Gate(tmp_path)
    holder = server.client(timeout=30)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    [pid] = server.handler_pids()
    outcome: list[object] = []
    reloader = threading.Thread(target=lambda: outcome.append(server.server.reload()), daemon=True)
    reloader.start()
    assert wait_for(lambda: router_state(server, lambda router: 0 in router.table.retiring), timeout=30)
    os.kill(pid, signal.SIGKILL)  # dies during its last call before the reload replaces it
    with pytest.raises(rpc.WorkerCrashed, match="SIGKILL"):
        running.result(30)
    reloader.join(60)
    assert outcome == [True]
    assert log_has(server, "handler_replaced")
    assert "handler_reloading" not in server.log_text()
    still_serves(server)

def test_reload_under_load_fails_no_call_and_answers_each_once(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name)
    before = set(server.handler_pids())
    stop = threading.Event()
    results: dict[int, list] = {i: [] for i in range(4)}
    errors: list[Exception] = []

    def load(client_id: int) -> None:
        with server.client(timeout=30) as client:
            calls = results[client_id]
            for call in range(100_000):
                if stop.is_set():
                    break
                try:
                    calls.append(client.identify(client_id, call)[:2])
                except Exception as exc:
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: all(len(calls) >= 20 for calls in results.values()) or errors, timeout=30)
        assert server.server.reload() is True
        assert server.server.reload() is True
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert all(calls == [[i, n] for n in range(len(calls))] for i, calls in results.items())
    assert not before & set(server.handler_pids())
    still_serves(server)


STARVABLE_SERVER = """
import resource, sys
sys.path.insert(0, sys.argv[2])
import rpc
server = rpc.Server("services:registry", address=sys.argv[1], authkey=None, workers=1, log_file=sys.argv[3],
                    log_format="json", event_loop=sys.argv[4], start_method="spawn")
server.start()
print("ready", flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
for line in sys.stdin:
    if line.strip() == "starve":  # no new descriptor can be made, as when a busy server runs out
        resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    elif line.strip() == "feed":
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(line.strip(), flush=True)
server.close()
"""


def test_a_handler_that_cannot_be_replaced_for_want_of_descriptors_is_retried(tmp_path, loop_name):
    address, log = str(tmp_path / "rpc.sock"), tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-c", STARVABLE_SERVER, address, TESTS, str(log), loop_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        [handler] = wait_for(lambda: child_pids(process.pid))
        process.stdin.write("starve\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "starve"
        os.kill(handler, signal.SIGKILL)
        assert wait_for(lambda: "handler_replaced" in log.read_text(), timeout=30)
        # The replacement cannot start now: that must be said, and retried.
        assert wait_for(lambda: "handler_start_failed" in log.read_text(), timeout=5), log.read_text()
        process.stdin.write("feed\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "feed"
        with rpc.connect(address, authkey=None, timeout=20) as client:
            assert client.add(2, 3) == 5
    finally:
        try:
            process.stdin.close()
            process.wait(30)
        except Exception:
            process.kill()
            process.wait()


FAILING_START = """
import errno, os, socket, sys, threading, types
sys.path.insert(0, sys.argv[2])
import rpc, rpc.arbiter

def out_of_descriptors(*args, **kwargs):
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

# What socketpair() raises when descriptors run out, for the arbiter only (the event loop makes its own).
rpc.arbiter.socket = types.SimpleNamespace(**{**vars(socket), "socketpair": out_of_descriptors})
server = rpc.Server("services:registry", address=sys.argv[1], workers=1, log_file=sys.argv[3], event_loop=sys.argv[4])
outcome = []

def start():
    try:
        server.start()
        outcome.append("started")
    except Exception as exc:
        outcome.append(type(exc).__name__)

starter = threading.Thread(target=start, daemon=True)
starter.start()
starter.join(5)
print(outcome[0] if outcome else "hangs", flush=True)
os._exit(0)
"""


def test_start_fails_clearly_when_a_handler_cannot_get_descriptors(tmp_path, loop_name):
    result = subprocess.run(
        [sys.executable, "-c", FAILING_START, str(tmp_path / "rpc.sock"), TESTS, str(tmp_path / "log"), loop_name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "StartupError", result.stdout + result.stderr[-2000:]


def test_5000_connections_at_once_are_each_served_or_refused_once(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, handshake_timeout=60.0)
    baseline = settled_baseline(server)
    count = 5000
    peers, buffers = [], []
    try:
        for _ in range(count):  # a blocking connect waits while the backlog is full
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(server.address)
            peer.settimeout(30)
            peers.append(peer)
            buffers.append(bytearray())
        own = b"{sha256}" + os.urandom(40)
        for i, peer in enumerate(peers):  # the whole client side of the handshake, a hello and a call: one write
            challenge = _frame(peer, buffers[i])
            digest = hmac.new(server.authkey, challenge[len(b"#CHALLENGE#") :], "sha256").digest()
            peer.sendall(
                framed(b"{sha256}" + digest)
                + framed(b"#CHALLENGE#" + own)
                + framed(b"#WELCOME#")
                + framed(protocol.encode_hello({}))
                + request(i, "add", i, 1)
            )
        assert router_state(server, lambda router: len(router.connections)) >= count
        served = refused = 0
        for i, peer in enumerate(peers):
            assert _frame(peer, buffers[i]) == b"#WELCOME#"
            _frame(peer, buffers[i])  # the server's answer to our challenge
            protocol.decode_hello(_frame(peer, buffers[i]))
            response = protocol.decode_response(_frame(peer, buffers[i]))
            assert response.id == i
            if response.error is None:
                assert response.result == i + 1
                served += 1
            else:
                assert response.error.code == "server_busy"  # 5,000 calls at once: the queue holds 1,024
                refused += 1
        assert served + refused == count and served >= 1024
        still_serves(server)
    finally:
        for peer in peers:
            peer.close()
    assert wait_for(lambda: router_state(server, lambda router: len(router.connections)) == 0, timeout=30)
    baseline.assert_restored(timeout=30)


def _frame(sock: socket.socket, buffer: bytearray) -> bytes:
    while True:
        if len(buffer) >= 4:
            size = struct.unpack_from("!i", buffer)[0]
            if len(buffer) >= 4 + size:
                payload = bytes(buffer[4 : 4 + size])
                del buffer[: 4 + size]
                return payload
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("the server closed the connection")
        buffer += data
