"""Functions that misbehave (cases 14-19): one clear error for that call, nothing else lost."""

from __future__ import annotations

import threading
import time

import pytest

import rpc
from conftest import still_serves
from helpers import Gate, wait_for


@pytest.fixture
def client(server):
    with server.client(timeout=30) as connected:
        yield connected


def test_14_raised_exceptions_arrive_as_remote_errors_and_only_builtins_are_rebuilt(server, baseline, client):
    with pytest.raises(ZeroDivisionError) as builtin:
        client.fail("ZeroDivisionError", "x")
    assert isinstance(builtin.value, rpc.RemoteError)
    with pytest.raises(rpc.RemoteError) as custom:
        client.fail_custom()
    assert type(custom.value) is rpc.RemoteError and custom.value.type_name == "services.CustomError"
    with pytest.raises(rpc.RemoteError) as unprintable:
        client.fail_unprintable()
    assert "str() failed" in unprintable.value.message
    with pytest.raises(ValueError) as surrogate:
        client.fail_surrogate()
    assert "bad" in surrogate.value.message
    client.close()
    still_serves(server)
    baseline.assert_restored()


def test_15_unencodable_results_fail_that_call_and_keep_the_connection(server, baseline, client):
    with pytest.raises(rpc.SerializationError):
        client.unencodable()
    with pytest.raises(rpc.SerializationError):
        client.recursive_list()
    assert client.add(1, 2) == 3
    client.close()
    baseline.assert_restored()


@pytest.mark.parametrize("how", ["sys.exit", "SystemExit", "KeyboardInterrupt"])
def test_16_exit_requests_are_errors_to_the_caller_and_the_handler_stays(server, baseline, client, how):
    pids = set(server.handler_pids())
    with pytest.raises(rpc.RemoteError) as caught:
        client.leave(how)
    assert caught.value.type_name in ("SystemExit", "KeyboardInterrupt")
    assert not isinstance(caught.value, (SystemExit, KeyboardInterrupt))  # never stops the caller
    assert client.add(1, 2) == 3
    assert set(server.handler_pids()) == pids
    client.close()
    baseline.assert_restored()


@pytest.mark.parametrize("how", ["exit", "kill", "segfault"])
def test_17_a_dying_handler_fails_only_its_call_and_is_not_retried(server, baseline, how, tmp_path):
    other = server.client(timeout=30)
    result = {}
    gate = Gate(tmp_path)
    slow = threading.Thread(target=lambda: result.setdefault("v", other.hold(*gate.args(), "ok")))
    slow.start()
    gate.wait_started()
    with server.client(timeout=30) as client:
        with pytest.raises(rpc.WorkerCrashed):
            client.crash(how)
        assert client.add(1, 2) == 3
    gate.open()  # the other call ran on throughout
    slow.join(30)
    assert result == {"v": "ok"}
    other.close()
    assert wait_for(lambda: len(server.handler_pids()) == 2)
    assert server.log_text().count("reason=") >= 1
    baseline.assert_restored()


def test_18_a_loop_that_holds_the_gil_and_ignores_sigterm_is_killed_at_its_deadline(server, baseline, client):
    before = set(server.handler_pids())
    started = time.monotonic()
    with pytest.raises(rpc.CallTimeout):
        client.call("spin_ignoring_sigterm", 30, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 10  # not before the deadline; the upper bound catches a hang
    # SIGTERM is ignored, so SIGKILL follows; then the handler is replaced
    assert wait_for(lambda: "passed its deadline" in server.log_text(), timeout=10)
    assert wait_for(lambda: len(server.handler_pids()) == 2 and len(before - set(server.handler_pids())) == 1)
    # the late result is never delivered: the next answers on this connection are the right ones
    for i in range(20):
        assert client.add(i, 1) == i + 1
    client.close()
    baseline.assert_restored()


def test_19_a_call_that_expires_in_the_queue_never_runs(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1)
    busy, waiting = server.client(timeout=30), server.client()
    gate = Gate(tmp_path)
    blocker = threading.Thread(target=busy.hold, args=gate.args())
    blocker.start()
    gate.wait_started()
    marker = tmp_path / "ran"
    with pytest.raises(rpc.CallTimeout):
        waiting.call("touch", str(marker), timeout=0.3)
    gate.open()
    blocker.join(30)
    # The queue is first in, first out: had the expired call been kept, it would run before this one.
    assert busy.add(1, 2) == 3
    assert not marker.exists()
    still_serves(server)
