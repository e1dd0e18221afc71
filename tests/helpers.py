"""Helpers shared by the tests: counting child processes, waiting for things to happen."""

from __future__ import annotations

import os
import socket
import struct
import time
from multiprocessing.connection import Client as RawClient
from pathlib import Path

from rpc import protocol


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def _is_helper(pid: int, table: dict[int, tuple[int, bytes]]) -> bool:
    parent, cmdline = table[pid]
    if b"resource_tracker" not in cmdline and b"forkserver import main" not in cmdline:
        return False
    # what a forkserver forks shares its command line; only the forkserver itself is the helper
    return table.get(parent, (0, b""))[1] != cmdline


def child_pids(pid: int | None = None) -> set[int]:
    """Descendant processes of ``pid`` (default: this process), zombies included.

    multiprocessing's helper processes are left out, but not what they start: the
    resource tracker and the forkserver live as long as the interpreter (the pytest
    plugin stops the forkserver when the session ends), while the handlers a
    forkserver forks are the server's own.
    """
    pid = os.getpid() if pid is None else pid
    table = _processes()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = set(), list(children.get(pid, []))
    while stack:
        current = stack.pop()
        if not _is_helper(current, table):
            found.add(current)
        stack.extend(children.get(current, []))
    return found


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Gate:
    """The two files of a held call (``services.hold``): it has started; it may finish."""

    def __init__(self, folder: Path, name: str = "gate") -> None:
        self.started = folder / f"{name}.started"
        self.release = folder / f"{name}.release"

    def args(self) -> tuple[str, str]:
        """The arguments of ``hold``."""
        return str(self.started), str(self.release)

    def wait_started(self, timeout: float = 30.0) -> None:
        assert wait_for(self.started.exists, timeout), f"the call held by {self.started.name} never started"

    def open(self) -> None:
        self.release.touch()


def queued_calls(test_server) -> int:
    """How many calls wait in the server's queue for a handler (read from the running server)."""
    return len(test_server.server._router.table.queue)


def log_has(test_server, text: str, timeout: float = 30.0) -> bool:
    """Wait until ``text`` appears in the server's log."""
    return bool(wait_for(lambda: text in test_server.log_text(), timeout))


def raw_connection(server):
    """An authenticated raw connection past the hello exchange, to send anything at all."""
    conn = RawClient(server.address, authkey=server.authkey)
    protocol.decode_hello(conn.recv_bytes())
    conn.send_bytes(protocol.encode_hello({}))
    return conn


def still_serves(server) -> None:
    """A valid client's call succeeds."""
    with server.client(timeout=10) as client:
        assert client.add(2, 3) == 5


def sigint_as_by_default() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT.

    A process started in the background (``cmd &`` with no job control, nohup) has
    SIGINT ignored, its children inherit that, and Python then installs no
    KeyboardInterrupt: reset it so the child behaves as when run from a terminal.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- raw frames on a connection, for tests that write what no client would ------------------


def framed(payload: bytes) -> bytes:
    """``payload`` with the length header of ``multiprocessing.connection``."""
    return struct.pack("!i", len(payload)) + payload


def request(request_id: int, method: str, *args, timeout: float | None = None) -> bytes:
    """A framed request, ready to be written raw."""
    return framed(protocol.encode_request(request_id, method, args, {}, timeout))


def write(conn, data: bytes) -> None:
    """Write raw bytes on a multiprocessing connection (several frames in one write)."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.sendall(data)
    finally:
        sock.detach()


def router_state(test_server, read):
    """``read(router)`` from the test's thread; retried if the loop changed a collection meanwhile."""
    for _ in range(100):
        try:
            return read(test_server.server._router)
        except RuntimeError:  # "changed size during iteration"
            continue
    raise AssertionError("the router's state kept changing")
