"""Client processes: many clients calling at once, and many idle connections.

Every wait is bounded: a client process that does not report in time is killed
and the measurement fails with a message saying what did not happen.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rpc

from .callers import connect
from .procs import raise_nofile, read_cpu
from .servers import AUTHKEY, CTX, START_TIMEOUT, BenchError, wait_for_report

WARM_UP_CALLS = 50
JOIN_TIMEOUT = 30.0


def _collect(reports: Any, processes: list[Any], timeout: float, what: str) -> list[Any]:
    """A report from each of ``processes`` within ``timeout`` s; a report that is text is an error.

    Every process stays alive until told to stop, so one that has ended owes a report it will never send.
    """
    deadline = time.monotonic() + timeout
    got = []
    count = len(processes)
    for i in range(count):
        try:
            item = wait_for_report(reports, processes, max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"{count - i} of {count} client processes did not {what} within {timeout:g} s") from None
        except ChildProcessError as exc:
            raise BenchError(f"a client process failed to {what}: {exc}") from None
        if isinstance(item, str):
            raise BenchError(f"a client process failed to {what}: {item}")
        got.append(item)
    return got


def _stop(processes: list[Any]) -> None:
    for process in processes:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join(5)


# -- many clients calling at once ---------------------------------------------------------------


@dataclass
class Load:
    """One throughput run: calls made in the window, their rate, CPU seconds by group of processes."""

    calls: int
    rate: float  # calls/s: the sum of each client's own rate
    cpu: dict[str, float]  # CPU seconds in the window; "clients" is all the client processes


def _caller(kind: str, address: Any, seconds: float, ready: Any, start: Any, results: Any, done: Any) -> None:
    try:
        caller = connect(kind, address)
        for _ in range(WARM_UP_CALLS):
            caller.call()
    except Exception as exc:
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    if start.wait(START_TIMEOUT) and not done.is_set():
        cpu, begin = time.process_time(), time.perf_counter()
        deadline, count = begin + seconds, 0
        try:
            while count == 0 or time.perf_counter() < deadline:  # at least one call, however late we woke
                caller.call()
                count += 1
        except Exception as exc:
            results.put(f"{type(exc).__name__}: {exc}")
            return
        results.put((count, time.perf_counter() - begin, time.process_time() - cpu))
        done.wait(START_TIMEOUT)  # connections stay open until the server's CPU time is read
    caller.close()


def run_clients(
    kind: str,
    address: Any,
    clients: int,
    seconds: float,
    groups: dict[str, list[int]],
    caller: Callable[..., None] = _caller,
    caller_first: tuple[Any, ...] = (),
) -> Load:
    """``clients`` processes calling ``add(1, 2)`` in a loop for ``seconds``, all started at once.

    The CPU time of ``groups`` (the server's processes) is read just before the
    start and once every client has reported, before any connection closes.
    Each process runs ``caller`` (by default this module's), with ``caller_first``
    before the arguments it gives ``_caller``: a wrapper that prepares the process.
    """
    ready, results, start, done = CTX.Queue(), CTX.Queue(), CTX.Event(), CTX.Event()
    processes = [
        CTX.Process(target=caller, args=(*caller_first, kind, address, seconds, ready, start, results, done), daemon=True)
        for _ in range(clients)
    ]
    for process in processes:
        process.start()
    try:
        _collect(ready, processes, START_TIMEOUT, "connect and warm up")
        before = read_cpu(groups)
        start.set()
        reports = _collect(results, processes, seconds + 60, "finish calling")
        after = read_cpu(groups)
    finally:
        done.set()
        start.set()
        _stop(processes)
    cpu = {name: after[name] - before[name] for name in groups}
    cpu["clients"] = sum(client_cpu for _, _, client_cpu in reports)
    return Load(
        calls=sum(count for count, _, _ in reports),
        rate=sum(count / elapsed for count, elapsed, _ in reports),
        cpu=cpu,
    )


# -- many idle connections ----------------------------------------------------------------------------

MAX_CONNECT_FAILURES = 20  # per client process: then it stops trying and says why
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 30.0


def _told_to_go(go: Any, done: Any, parent: int) -> bool:
    """Wait for ``go``; False if told ``done`` first, or if the bench has gone."""
    while not go.wait(0.5):
        if done.is_set() or os.getppid() != parent:
            return False
    return True


def _holder(address: Any, count: int, seconds: float, reports: Any, go: Any, done: Any) -> None:
    """Open ``count`` connections and report; on ``go``, one call on each and report; hold until ``done``."""
    parent = os.getppid()
    soft, _ = raise_nofile(count + 64)
    clients: list[rpc.Client] = []
    failures, why = 0, ""
    deadline = time.monotonic() + seconds
    while len(clients) < count and failures < MAX_CONNECT_FAILURES:
        if time.monotonic() > deadline:
            why = why or f"ran out of time ({seconds:g} s)"
            break
        try:
            clients.append(rpc.connect(address, authkey=AUTHKEY, timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT))
        except Exception as exc:
            failures += 1
            why = why or f"{type(exc).__name__}: {exc}"
    reports.put((len(clients), failures, why, soft))
    if _told_to_go(go, done, parent):
        answered, why = 0, ""
        deadline = time.monotonic() + seconds
        for client in clients:
            if time.monotonic() > deadline:
                why = why or f"ran out of time ({seconds:g} s)"
                break
            try:
                answered += client.add(1, 2) == 3
            except Exception as exc:
                why = why or f"{type(exc).__name__}: {exc}"
        reports.put((answered, why))
        done.wait(seconds)
    for client in clients:
        client.close()


@dataclass
class Opened:
    count: int
    failures: int
    why: str  # the first error, or why fewer than asked were opened
    nofile: int  # the smallest soft RLIMIT_NOFILE of the client processes


@dataclass
class Answered:
    count: int
    why: str


class IdleConnections:
    """``total`` connections held open by client processes; :meth:`opened`, then :meth:`call_each`.

    ``seconds`` bounds opening them, and again calling on each.
    """

    def __init__(self, address: Any, total: int, processes: int, seconds: float) -> None:
        self.seconds = seconds
        self._reports: Any = CTX.Queue()
        self._go, self._done = CTX.Event(), CTX.Event()
        shares = [total // processes + (i < total % processes) for i in range(processes)]
        self._processes = [
            CTX.Process(target=_holder, args=(address, share, seconds, self._reports, self._go, self._done), daemon=True)
            for share in shares
            if share
        ]

    def __enter__(self) -> IdleConnections:
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        _stop(self._processes)

    def opened(self) -> Opened:
        reports = _collect(self._reports, self._processes, START_TIMEOUT + self.seconds + CONNECT_TIMEOUT, "open its connections")
        return Opened(
            count=sum(r[0] for r in reports),
            failures=sum(r[1] for r in reports),
            why="; ".join(sorted({r[2] for r in reports if r[2]})),
            nofile=min(r[3] for r in reports),
        )

    def call_each(self) -> Answered:
        self._go.set()
        reports = _collect(self._reports, self._processes, self.seconds + CALL_TIMEOUT + 10, "call on each connection")
        return Answered(count=sum(r[0] for r in reports), why="; ".join(sorted({r[1] for r in reports if r[1]})))
