"""What the daemons of the HAProxy test serve; their handler processes import this module."""

from __future__ import annotations

import os
import time
from pathlib import Path

import rpc

registry = rpc.Registry()

HOLD_SECONDS = 60  # a held call gives up waiting after this: nothing outlives a test that died


@registry.expose
def work(token: str, gate: str) -> str:
    """The name of the daemon's host that ran this call (its LAB_HOST): a marker from the server.

    While the file ``gate`` exists and ``gate.release`` does not, the call is held:
    it first creates ``gate.held/TOKEN@HOST`` (so the test knows it runs, and where),
    then waits for ``gate.release``.
    """
    host = os.environ["LAB_HOST"]
    release = f"{gate}.release"
    if os.path.exists(gate) and not os.path.exists(release):
        Path(f"{gate}.held", f"{token}@{host}").touch()
        deadline = time.monotonic() + HOLD_SECONDS
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    return host
