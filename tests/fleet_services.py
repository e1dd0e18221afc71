"""Registry of the fleet tests (several servers, go-away); handler processes import this module."""

from __future__ import annotations

import os
import time
from pathlib import Path

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    return x + y


@registry.expose
def mark(folder, call, seconds=0.0):
    """Record a run of ``call`` as it starts (a line in the file ``folder/call``: a call that ran
    twice has two), then take ``seconds``; returns the handler's pid (which server ran it)."""
    with open(os.path.join(folder, str(call)), "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


@registry.expose
def hold(started, release, value=None, timeout=60):
    """Create the file ``started``, return ``value`` once the file ``release`` exists."""
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} was never created")
        time.sleep(0.005)
    return value


@registry.expose
def count(n):
    """Yield 0 .. n-1 (a stream)."""
    yield from range(n)
