"""A daemon whose log output goes away keeps serving: `rpc serve 2>&1 | head`, a closed terminal."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rpc
from helpers import child_pids, wait_for

# `python -m rpc`, and a launcher that restored SIGPIPE's default action (which kills).
LAUNCHERS = {
    "python -m rpc": ["-m", "rpc"],
    "SIGPIPE restored": [
        "-c",
        "import signal, sys; signal.signal(signal.SIGPIPE, signal.SIG_DFL); "
        "from rpc.cli import main; sys.exit(main(sys.argv[1:]))",
    ],
}


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    """Bytes read from ``fd`` until ``marker`` appears (fails after ``timeout``, a hang guard)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in: {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"the daemon closed its stderr before {marker!r}: {seen!r}"
            seen += chunk
    return seen


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_daemon_whose_stderr_reader_left_still_answers_reloads_and_stops_cleanly(daemon, launcher):
    env = {**daemon.env, "RPC_ACCESS_LOG": "true"}
    process = subprocess.Popen(
        [sys.executable, *LAUNCHERS[launcher], "serve", "--workers", "2", "services:registry"],
        cwd=daemon.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon.process = process  # the fixture kills it if the test fails
    assert process.stderr is not None
    _read_until(process.stderr.fileno(), b"listening")
    process.stderr.close()  # the reader goes away: every later log write gets EPIPE

    key = (Path(env["XDG_CONFIG_HOME"]) / "rpc" / "authkey").read_bytes().strip()
    with rpc.connect(env["RPC_ADDRESS"], authkey=key, timeout=30.0) as client:
        # one client's calls in a row: the supervisor logs the first, a handler the lent ones
        assert [client.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
        assert client.chatter("nobody listens") == "done"  # its prints, logging, warnings: dropped

    before = child_pids(process.pid)
    process.send_signal(signal.SIGHUP)  # logs signal_received, then each handler replaced
    wait_for(lambda: not (child_pids(process.pid) & before), timeout=60)
    for _ in range(3):  # fresh connections, after the reload
        with rpc.connect(env["RPC_ADDRESS"], authkey=key, timeout=30.0) as client:
            assert client.add(2, 3) == 5

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
