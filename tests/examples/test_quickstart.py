"""The quickstart example runs as its README says: server in one process, client in another."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import sigint_as_by_default

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def test_quickstart_server_and_client():
    # PYTHONFAULTHANDLER: a server that does not stop is made to print every thread's stack.
    env = {**os.environ, "RPC_AUTHKEY": secrets.token_hex(32), "PYTHONFAULTHANDLER": "1"}
    server = subprocess.Popen(
        [sys.executable, "server.py"],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_by_default,  # the test stops it with Ctrl-C's signal
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("serving on"):
            server.kill()
            pytest.fail(f"server did not start: {line}{server.stderr.read()}")
        result = subprocess.run(
            [sys.executable, "client.py"], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "add(2, 3) = 5" in result.stdout
        assert "HI HI" in result.stdout
        assert "remote error: TypeError" in result.stdout
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGABRT)  # faulthandler prints the stacks, then the process ends
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    assert server.returncode == 0, server.stderr.read()
    assert env["RPC_AUTHKEY"] not in server.stderr.read()
