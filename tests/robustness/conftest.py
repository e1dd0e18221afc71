"""Shared tools of the adversarial suite: resource baselines and raw connections."""

from __future__ import annotations

import os
import threading

import pytest

from helpers import child_pids, raw_connection, still_serves, wait_for  # noqa: F401 (used by the tests)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Baseline:
    """Open descriptors, threads and child processes of this process (which runs the server)."""

    def __init__(self) -> None:
        self.fds, self.threads, self.children = fd_count(), threading.active_count(), len(child_pids())

    def now(self) -> tuple[int, int, int]:
        return fd_count(), threading.active_count(), len(child_pids())

    def assert_restored(self, timeout: float = 15.0) -> None:
        """Wait until descriptors and threads are back to (at most) the baseline, and children equal it.

        Fewer is fine: something that was running when the baseline was taken
        (a thread of the test runner, say) may have ended since.
        """
        expected = (self.fds, self.threads, self.children)

        def restored() -> bool:
            fds, threads, children = self.now()
            return fds <= self.fds and threads <= self.threads and children == self.children

        wait_for(restored, timeout=timeout)
        assert restored(), f"(fds, threads, children) {self.now()} exceeds baseline {expected}"


@pytest.fixture
def server(rpc_server):
    """A fresh server per test: 2 handlers, TCP, short deadlines so attacks resolve quickly."""
    return rpc_server(
        "services:registry", workers=2, transport="tcp", handshake_timeout=1.0, send_timeout=1.0, max_pending=64
    )


@pytest.fixture
def baseline(server):
    """Resources with the server up and idle; the test checks they come back."""
    return settled_baseline(server)


def settled_baseline(server) -> Baseline:
    """Resources once ``server`` is up and has served a call (first-use threads and imports)."""
    with server.client() as client:
        client.add(1, 2)
    wait_for(lambda: threading.active_count() == Baseline().threads, timeout=2)
    return Baseline()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request) -> str:
    """The router's event loop, for tests that run on each."""
    return request.param
