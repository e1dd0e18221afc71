"""Load and lifecycle (cases 20-25): every call answered exactly once, clean stops, no leaks."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rpc
from conftest import Baseline, still_serves
from helpers import Gate, wait_for

TESTS = str(Path(__file__).resolve().parents[1])


def test_20_200_clients_times_100_calls_each_get_their_own_answers(rpc_server):
    server = rpc_server("services:registry", workers=2)  # the default queue holds 1024 waiting calls
    still_serves(server)
    baseline = Baseline()
    answers: dict[int, list] = {}
    errors = []

    def run(client_id: int) -> None:
        try:
            with server.client(timeout=60) as client:
                answers[client_id] = [client.identify(client_id, call)[:2] for call in range(100)]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert answers == {i: [[i, call] for call in range(100)] for i in range(200)}
    baseline.assert_restored(timeout=30)


def test_21_overload_gets_server_busy_quickly_and_accepted_calls_complete(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, max_pending=4)
    outcomes = []
    gate = Gate(tmp_path)

    def call(i: int) -> None:
        try:
            with server.client(timeout=60) as client:
                outcomes.append(client.hold(*gate.args(), i))
        except rpc.ServerBusy as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    # One call runs and four wait; the other fifteen are refused while the running
    # call is still held: refused at once, not after waiting for a handler.
    busy = lambda: [o for o in outcomes if isinstance(o, rpc.ServerBusy)]  # noqa: E731
    assert wait_for(lambda: len(busy()) == 15, timeout=60), outcomes
    assert not [o for o in outcomes if isinstance(o, int)]
    gate.open()
    for t in threads:
        t.join(60)
    done = [o for o in outcomes if isinstance(o, int)]
    assert len(busy()) == 15 and len(done) == 5
    still_serves(server)  # service recovers when load drops


@pytest.mark.slow
def test_22_soak_killing_a_handler_every_second_fails_only_their_calls(rpc_server):
    seconds = float(os.environ.get("RPC_SOAK_SECONDS", "30"))
    server = rpc_server("services:registry", workers=2)
    stop = threading.Event()
    ok, crashed = [0] * 4, [0] * 4
    unexpected: list[tuple[int, int, Exception]] = []
    snapshots: list[str] = []
    # Far more calls than a client makes in the soak; the loop ends at the first surprise anyway.
    max_calls = int(seconds * 50_000) + 10_000

    def load(i: int) -> None:
        with server.client(timeout=30) as client:
            for call in range(max_calls):
                if stop.is_set():
                    return
                try:
                    assert client.identify(i, call)[:2] == [i, call]
                    ok[i] += 1
                except rpc.WorkerCrashed:
                    crashed[i] += 1
                except Exception as exc:  # ConnectionClosed (or anything else) ends this client
                    unexpected.append((i, call, exc))
                    snapshots.append(_server_state(server))  # while the call is still lost, if it is
                    stop.set()
                    return
            unexpected.append((i, max_calls, RuntimeError("the soak never ended")))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    kills = 0
    while not stop.wait(1.0) and time.monotonic() < end:  # the pace of the kills, not a synchronisation
        pids = server.handler_pids()
        if pids:
            try:
                os.kill(random.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client is still calling"
    log = server.log_text()
    assert unexpected == [], f"{unexpected} after {kills} kills; dropped: {_lines(log, 'client_dropped')}\n{snapshots[0]}"
    assert sum(ok) > 100 and sum(crashed) <= kills
    assert "Traceback" not in log
    still_serves(server)


def _server_state(test_server) -> str:
    """The handler slots and the connections as the server sees them, and every thread's stack: for a failure report."""
    import faulthandler
    import tempfile

    router = test_server.server._router
    table = router.table
    lines = []
    for slot, call in enumerate(list(table.running)):
        handler = router.arbiter.handlers[slot]
        lines.append(f"slot {slot} pid {handler and handler.pid} running {call!r}")
    lines.append(f"idle {list(table.idle)} queued {len(table.queue)} unanswered {table.unanswered}")
    for conn in list(router.connections):
        lines.append(f"connection {conn.peer} state {conn.state} parked {len(conn.parked)} end {conn.end_reason}")
    with tempfile.TemporaryFile("w+") as stacks:
        faulthandler.dump_traceback(stacks, all_threads=True)
        stacks.seek(0)
        lines.append(stacks.read())
    return "\n".join(lines)


def _lines(log: str, word: str) -> list[str]:
    return [line for line in log.splitlines() if word in line]


def _daemon(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    env = {
        **os.environ,
        "RPC_AUTHKEY": "k" * 40,
        "RPC_ADDRESS": str(tmp_path / "rpc.sock"),
        "RPC_LOG_FORMAT": "json",
        "PYTHONPATH": TESTS,
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "rpc", "serve", *args], env=env, stdout=log, stderr=log)
    assert wait_for(lambda: "listening" in (tmp_path / "serve.log").read_text() or process.poll() is not None, 30)
    return process, env


def _children(pid: int) -> set[int]:
    from helpers import child_pids

    return child_pids(pid)


def test_23_sigterm_finishes_running_calls_and_refuses_queued_ones(tmp_path):
    process, env = _daemon(tmp_path, "--workers", "1", "services:registry")
    handlers = wait_for(lambda: _children(process.pid))
    # reconnect=False: the server's own answers (a client that reconnects makes the refused calls
    # again at the daemon's next start: see tests/daemon/test_daemon_fleet.py).
    clients = [
        rpc.connect(env["RPC_ADDRESS"], authkey=env["RPC_AUTHKEY"].encode(), timeout=30, reconnect=False) for _ in range(4)
    ]
    gate = Gate(tmp_path)
    running = clients[0].submit("hold", *gate.args(), 0)
    gate.wait_started()
    # Sent (submit returns once the request is written); the server queues them behind the first.
    queued = [clients[i].submit("sleep", 0, i) for i in (1, 2, 3)]
    process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "shutdown_begun" in (tmp_path / "serve.log").read_text(), 30)
    gate.open()  # the running call finishes within the grace period
    outcomes: dict[int, object] = {}
    for i, future in enumerate([running, *queued]):
        try:
            outcomes[i] = future.result(30)
        except rpc.RPCError as exc:
            outcomes[i] = exc
    assert process.wait(30) == 0
    assert outcomes[0] == 0
    assert all(isinstance(outcomes[i], rpc.ServerShuttingDown) for i in (1, 2, 3)), outcomes
    assert not [pid for pid in handlers if Path(f"/proc/{pid}").exists()]
    assert not Path(env["RPC_ADDRESS"]).exists()


def test_24_when_the_supervisor_is_killed_handlers_exit_and_clients_learn_at_once(tmp_path):
    process, env = _daemon(tmp_path, "--workers", "2", "services:registry")
    handlers = wait_for(lambda: len(_children(process.pid)) >= 2 and _children(process.pid))
    client = rpc.connect(env["RPC_ADDRESS"], authkey=env["RPC_AUTHKEY"].encode(), timeout=30)
    outcome = []
    gate = Gate(tmp_path)  # never opened
    waiting = threading.Thread(target=lambda: outcome.append(_try(client.hold, *gate.args())))
    waiting.start()
    gate.wait_started()
    process.kill()
    process.wait()
    waiting.join(10)  # well before the call's 30 s timeout
    assert isinstance(outcome[0], rpc.ConnectionClosed)
    assert wait_for(lambda: not [p for p in handlers if Path(f"/proc/{p}").exists()], timeout=5)


def _try(function, *args):
    try:
        return function(*args)
    except rpc.RPCError as exc:
        return exc


LIMITED_SERVER = """
import resource, sys
sys.path.insert(0, sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
import rpc
server = rpc.Server("services:registry", address=sys.argv[1], workers=1, log_format="json")
server.start()
print("ready", flush=True)
server.serve_forever()
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_25_running_out_of_descriptors_backs_off_and_recovers(tmp_path):
    address = str(tmp_path / "rpc.sock")
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-c", LIMITED_SERVER, address, TESTS], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        hogs = []
        for _ in range(80):  # far more than the server's 48 descriptors
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(1)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                break
            hogs.append(sock)
        assert wait_for(lambda: "accept_failed" in log.read_text(), timeout=10)
        cpu_before = _cpu_seconds(process.pid)
        time.sleep(2)  # a window to measure CPU use over, not a synchronisation
        # Backing off, not spinning: a busy machine only lowers what the server gets.
        assert _cpu_seconds(process.pid) - cpu_before < 0.5
        for sock in hogs:
            sock.close()
        # descriptors come back as the handshake deadline drops the idle sockets
        with rpc.connect(address, timeout=10, connect_timeout=15) as client:
            assert client.add(1, 2) == 3
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
