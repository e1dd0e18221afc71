"""A handler killed at each point of serving a lent socket (case 26): its call fails, no other.

The soak (case 22) kills handlers at random moments; these tests stop a handler at
one chosen point (see ``services._install_lease_hooks``), kill it there, and check
what its client gets: the server must know from the shared call state whether the
client already has its answer, lacks one, or holds half a reply.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import rpc
import services
from helpers import raw_connection, still_serves, wait_for
from rpc import protocol

CALLS = 60  # a one-call-at-a-time client's socket is lent within a few calls


@pytest.fixture
def hooks(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "hooks"
    folder.mkdir()
    monkeypatch.setenv(services.LEASE_HOOKS, str(folder))
    return folder


@pytest.fixture
def server(rpc_server, hooks):
    # spawn: handlers start from this process's environment, so they install the hooks
    return rpc_server("services:registry", workers=2, start_method="spawn")


def _stopped_pid(folder: Path, what: str) -> int:
    found = wait_for(lambda: sorted(folder.glob(f"{what}-*")), timeout=30)
    assert found, f"no handler reached the hook ({what})"
    return int(found[0].name.split("-", 1)[1])


def _calls(client: rpc.Client, method: str, make_args) -> tuple[threading.Thread, list]:
    """Make CALLS calls one at a time in a thread; each outcome is a result or the exception."""
    outcomes: list = []

    def run() -> None:
        for i in range(CALLS):
            try:
                outcomes.append(getattr(client, method)(*make_args(i)))
            except rpc.RPCError as exc:
                outcomes.append(exc)
                if isinstance(exc, rpc.ConnectionClosed):
                    return

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes


def test_26a_killed_before_writing_its_reply_that_call_gets_worker_crashed(server, hooks):
    (hooks / "pause-before-send").touch()
    with server.client(timeout=30) as client:
        thread, outcomes = _calls(client, "add", lambda i: (i, i))
        os.kill(_stopped_pid(hooks, "paused"), signal.SIGKILL)
        thread.join(60)
    crashed = [i for i, o in enumerate(outcomes) if isinstance(o, rpc.WorkerCrashed)]
    assert len(crashed) == 1, outcomes
    assert [o for i, o in enumerate(outcomes) if i not in crashed] == [2 * i for i in range(CALLS) if i not in crashed]
    assert "client_dropped" not in server.log_text()
    still_serves(server)


def test_26b_killed_after_writing_its_whole_reply_nothing_fails(server, hooks):
    (hooks / "pause-after-send").touch()
    with server.client(timeout=30) as client:
        thread, outcomes = _calls(client, "add", lambda i: (i, i))
        # The client has that reply and sends its next call, which waits for the socket.
        os.kill(_stopped_pid(hooks, "paused"), signal.SIGKILL)
        thread.join(60)
    assert outcomes == [2 * i for i in range(CALLS)]
    assert "client_dropped" not in server.log_text()
    still_serves(server)


def test_26c_killed_before_running_a_request_it_peeked_the_server_runs_it(server, hooks):
    done = hooks / "done"
    done.mkdir()
    with server.client(timeout=30) as client:
        for i in range(3):
            client.touch(str(done / f"warm-{i}"))
        (hooks / "pause-decode").touch()
        thread, outcomes = _calls(client, "touch", lambda i: (str(done / str(i)),))
        os.kill(_stopped_pid(hooks, "paused"), signal.SIGKILL)
        thread.join(60)
    # The killed handler had the request decoded, perhaps not taken off the socket:
    # either way the call is answered (never lost, which would end in CallTimeout).
    assert len(outcomes) == CALLS, outcomes
    crashed = [i for i, o in enumerate(outcomes) if isinstance(o, rpc.WorkerCrashed)]
    assert len(crashed) <= 1 and all(o is None for i, o in enumerate(outcomes) if i not in crashed), outcomes
    assert all((done / str(i)).exists() for i in range(CALLS) if i not in crashed)
    still_serves(server)


def test_26d_killed_halfway_through_a_reply_the_client_is_dropped_with_the_reason(server, hooks):
    conn = raw_connection(server)
    try:
        size = 4 << 20  # far more than the socket buffers hold: the handler blocks mid-reply
        for request_id in range(1, 50):
            conn.send_bytes(protocol.encode_request(request_id, "big", (size,), {}, None))
            lent = hooks / f"lent-{request_id}"
            if wait_for(lambda: lent.exists() or conn.poll(0), timeout=30) and lent.exists():
                break
            conn.recv_bytes()  # served by the server itself this time: try again
        else:
            pytest.fail("no call was served on a lent socket")
        assert wait_for(lambda: conn.poll(0), timeout=30)  # part of the reply has arrived
        os.kill(int(wait_for(lent.read_text)), signal.SIGKILL)
        with pytest.raises((EOFError, OSError)):
            conn.recv_bytes()
    finally:
        conn.close()
    assert wait_for(lambda: "client_dropped" in server.log_text(), timeout=30)
    log = server.log_text()
    assert "killed by SIGKILL while writing a reply on the lent socket" in log, log
    still_serves(server)


def test_26e_over_tcp_a_reply_that_may_be_cut_drops_the_client_with_the_reason(rpc_server, hooks):
    # Over TCP a send may go out in part, so the server cannot tell whether a
    # handler killed while writing left half a frame: it drops the connection.
    server = rpc_server("services:registry", workers=2, start_method="spawn", transport="tcp")
    (hooks / "pause-before-send").touch()
    with server.client(timeout=30) as client:
        thread, outcomes = _calls(client, "add", lambda i: (i, i))
        os.kill(_stopped_pid(hooks, "paused"), signal.SIGKILL)
        thread.join(60)
    assert isinstance(outcomes[-1], rpc.ConnectionClosed), outcomes
    assert all(o == 2 * i for i, o in enumerate(outcomes[:-1]))
    assert wait_for(lambda: "client_dropped" in server.log_text(), timeout=30)
    assert "while writing a reply on the lent socket, 0 of its" in server.log_text()
    still_serves(server)
