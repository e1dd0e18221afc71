"""Cancelling from the sync client: future.cancel() and a KeyboardInterrupt stop the call on the server."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from concurrent.futures import CancelledError

import pytest

from helpers import Gate, log_has, wait_for



@pytest.fixture(params=["unix", "tcp"])
def transport(request) -> str:
    return request.param

def test_cancelling_a_queued_call_means_it_never_runs(rpc_server, transport, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=1)
    gate, marker = Gate(tmp_path), tmp_path / "ran"
    with server.client(timeout=30) as client:
        running = client.submit("hold", *gate.args())
        gate.wait_started()
        queued = client.submit("touch", str(marker))
        assert queued.cancel() is True
        assert queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(0)
        gate.open()
        assert running.result(30) is None
        assert running.cancel() is False  # finished: too late
        assert client.add(1, 2) == 3  # queued after where the cancelled call was: it would have run first
        assert log_has(server, "call_cancelled")
    assert not marker.exists()


def test_cancelling_a_running_call_stops_its_handler(rpc_server, transport, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=1)
    gate = Gate(tmp_path)  # never opened: only the cancel ends the call
    with server.client(timeout=30) as client:
        [pid] = server.handler_pids()
        future = client.submit("hold", *gate.args())
        gate.wait_started()
        assert future.cancel() is True
        with pytest.raises(CancelledError):
            future.result(0)
        assert wait_for(lambda: server.handler_pids() not in ([], [pid]), timeout=30)
        assert client.add(2, 3) == 5
    assert log_has(server, "was cancelled by its caller")


def test_a_cancelled_future_is_never_completed_by_a_late_answer(rpc_server, transport, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=2)
    with server.client(timeout=30) as client:
        futures = [client.submit("add", i, 1) for i in range(200)]
        cancelled = [f for f in futures[::2] if f.cancel()]
        results = [f.result(30) for f in futures[1::2]]
        assert results == [i + 1 for i in range(1, 200, 2)]
        assert all(f.cancelled() for f in cancelled)  # (answers that came after cancel() were dropped)
        assert client.add(1, 1) == 2


def test_ctrl_c_during_a_call_stops_it_on_the_server(rpc_server, transport, tmp_path):
    server = rpc_server("services:registry", transport=transport, workers=2)
    gate = Gate(tmp_path)  # never opened
    script = textwrap.dedent(
        f"""
        import rpc
        client = rpc.connect({server.address!r}, authkey={server.authkey!r}, timeout=60)
        print(client.add(1, 1), flush=True)
        try:
            client.hold(*{gate.args()!r})
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(client.add(2, 3), flush=True)
        """
    )
    pids = set(server.handler_pids())
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        gate.wait_started()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert out.split() == ["2", "interrupted", "5"]
    assert log_has(server, "call_cancelled")
    assert wait_for(lambda: len(set(server.handler_pids()) - pids) >= 1, timeout=30)  # its handler was replaced
